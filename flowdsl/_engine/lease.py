"""One driver per run: the run lease as the engine takes, keeps and gives it up.

A process that drives a run (runs its scheduler: real time or batch) holds the run's lease
in the store (:meth:`~flowdsl.backends.base.Store.acquire_lease`), renewed every third of
its length while it drives.  A second process that starts or resumes the same run finds
the lease held and executes nothing: it waits for the result, or says who drives the run.

The lease's owner is a string that says which process holds it::

    host:pid:started:machine:nonce

``started`` is the process's start time (Linux: ``/proc/PID/stat``), so that a pid the
kernel gave to a new process does not pass for the old one; ``machine`` is a digest of the
host name, the kernel's boot id and the pid namespace: where two owners share it, a pid
means the same process for both, and a taker can look.  So on one machine a holder whose
process is gone (SIGKILLed, say) is replaced at once, without waiting out its lease; from
another machine (or another container) only the lease's expiry tells, a few seconds.

Within one process the keepers alive are known (:data:`_LIVE`): a lease whose owner names
this very process but no live keeper was left by a driver that is gone (a context closed
or dropped without releasing it) and is taken over at once too.

A store that only this process can see (:attr:`~flowdsl.backends.base.Store.process_local`,
the memory store) needs no expiry and no renewal: its leases are taken for good and the
in-process check above is the whole story.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
import uuid
import weakref
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING, Final

import anyio
import attrs

from .._errors import BackendUnavailable
from .._records import Lease

if TYPE_CHECKING:
    from ..backends.base import Store

__all__ = [
    "DEFAULT_TTL",
    "LeaseKeeper",
    "Owner",
    "mark_alive",
    "mark_gone",
    "new_owner",
    "process_alive",
    "process_gone",
]

log = logging.getLogger("flowdsl.lease")

#: Seconds a run's lease lasts unless renewed (every third of it): how long another
#: machine waits before it takes over from a driver that vanished.
DEFAULT_TTL: Final = 5.0
# A process-local store's leases never run out: only the in-process check replaces them.
_FOREVER: Final = 10.0 * 365 * 24 * 3600

# What is alive in this process under an owner's name: lease keepers, and batch workers
# (named as owners are, so that a resume can tell whether the worker holding a task runs).
_LIVE: weakref.WeakValueDictionary[str, object] = weakref.WeakValueDictionary()


def mark_alive(name: str, holder: object) -> None:
    """*holder* (a keeper, a worker) runs in this process under *name* until
    :func:`mark_gone` (or until it is garbage)."""
    _LIVE[name] = holder


def mark_gone(name: str) -> None:
    _LIVE.pop(name, None)


@attrs.frozen
class Owner:
    """A lease owner's parts (see the module docstring)."""

    host: str
    pid: int
    started: str
    machine: str
    nonce: str

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}:{self.started}:{self.machine}:{self.nonce}"

    @classmethod
    def parse(cls, text: str) -> Owner | None:
        """The parts of an owner string; ``None`` for one flowdsl did not make."""
        parts = text.rsplit(":", 4)
        if len(parts) != 5 or not parts[1].isdigit():
            return None
        host, pid, started, machine, nonce = parts
        return cls(host, int(pid), started, machine, nonce)

    def describe(self) -> str:
        """For error messages: ``process 1234 on host 'build-7'``."""
        return f"process {self.pid} on host {self.host!r}"


def describe_owner(text: str) -> str:
    owner = Owner.parse(text)
    return owner.describe() if owner is not None else repr(text)


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux); ``None`` when there is
    no such process, ``""`` when the system does not say."""
    if not os.path.isdir("/proc/self"):
        return ""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    # Fields after the command name (which may hold spaces and parentheses): the 3rd field
    # of the line, the state, is the first after it; the 22nd, starttime, the 20th.
    fields = stat.rpartition(")")[2].split()
    if fields and fields[0] in ("Z", "X"):
        return None  # killed, not yet reaped by its parent: gone all the same
    return fields[19] if len(fields) > 19 else ""


@cache
def _machine() -> str:
    """Where a pid names the same process: host, boot, pid namespace."""
    boot = _read("/proc/sys/kernel/random/boot_id")
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    text = f"{socket.gethostname()}|{boot}|{namespace}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def new_owner() -> Owner:
    """A fresh owner for this process (each keeper has its own)."""
    host = socket.gethostname().replace(":", "-") or "?"
    pid = os.getpid()
    return Owner(host, pid, _start_time(pid) or "", _machine(), uuid.uuid4().hex[:8])


def _runs(owner: Owner) -> bool | None:
    """Whether the process *owner* names runs: ``None`` when that cannot be told here
    (another machine or container)."""
    if owner.machine != _machine():
        return None
    started = _start_time(owner.pid)
    if started is None:
        return False
    if started and owner.started:
        return started == owner.started
    try:
        os.kill(owner.pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, as another user
    return True


def process_gone(text: str) -> bool:
    """Whether the process that *text* names as a lease's owner is certainly gone: on this
    machine, its pid runs no more (or runs another process), or it is this process and
    none of its live keepers has that name.  ``False`` when it cannot be told (another
    machine, an owner flowdsl did not make): then only the lease's expiry tells."""
    owner = Owner.parse(text)
    if owner is None:
        return False
    if owner.pid == os.getpid() and owner.machine == _machine():
        return text not in _LIVE
    return _runs(owner) is False


def process_alive(text: str) -> bool:
    """Whether what *text* names (a worker's name) certainly still runs: on this machine,
    its pid runs the same process, and in this process, it is still at work.  ``False``
    when it cannot be told."""
    owner = Owner.parse(text)
    if owner is None:
        return False
    if owner.pid == os.getpid() and owner.machine == _machine():
        return text in _LIVE  # a worker of a context that ended is gone, if we are not
    return _runs(owner) is True


class LeaseKeeper:
    """The leases of the runs one context drives, under one owner, renewed together.

    :meth:`take` takes a run's lease (replacing a holder whose process is gone);
    :meth:`keep` renews every held lease every third of *ttl* until cancelled, calling a
    run's ``on_lost`` when its lease went to another driver; :meth:`release` gives one up.
    """

    def __init__(self, store: Store, *, ttl: float = DEFAULT_TTL) -> None:
        self.store = store
        self.local = store.process_local
        self.ttl = _FOREVER if self.local else ttl
        self.every = ttl / 3
        self.owner = str(new_owner())
        self._held: dict[str, Callable[[], None] | None] = {}
        self._takes = 0  # leases taken so far: which came after a renewal set out
        self._taken: dict[str, int] = {}
        self._renewed = 0.0  # time.monotonic() of the last renewal
        mark_alive(self.owner, self)

    def __repr__(self) -> str:
        return f"<LeaseKeeper {self.owner} holding {len(self._held)}>"

    @property
    def held(self) -> list[str]:
        return list(self._held)

    async def take(self, run_id: str, on_lost: Callable[[], None] | None = None) -> Lease | None:
        """Take *run_id*'s lease: ``None`` when taken, else the lease of its live driver."""
        held = await self.store.acquire_lease(run_id, self.owner, self.ttl)
        if held is not None and process_gone(held.owner):
            # Its driver died here (a SIGKILL, say): no need to wait out its lease.
            held = await self.store.acquire_lease(
                run_id, self.owner, self.ttl, replacing=held.owner
            )
        if held is None:
            self._held[run_id] = on_lost
            self._takes += 1
            self._taken[run_id] = self._takes
        return held

    async def release(self, run_id: str) -> None:
        if run_id in self._held:
            del self._held[run_id]
            del self._taken[run_id]
            await self.store.release_lease(run_id, self.owner)

    async def renew(self) -> list[str]:
        """Renew every held lease once; the run ids whose lease went to another driver
        (their ``on_lost`` has been called)."""
        if not self._held or self.local:
            return []
        self._renewed = time.monotonic()
        takes = self._takes
        answer = await self.store.renew_leases(self.owner, list(self._held), self.ttl)
        # A run that ended while the renewal was on its way released its lease, and the
        # store finds it gone: that is no loss, nor is it one if the run's lease was taken
        # again since (a resume in this process).
        lost = [r for r in answer if r in self._held and self._taken[r] <= takes]
        for run_id in lost:
            log.warning("lost the lease of run %s: another process drives it now", run_id)
            on_lost = self._held.pop(run_id)
            del self._taken[run_id]
            if on_lost is not None:
                on_lost()
        return lost

    async def keep(self) -> None:
        """Renew the held leases every third of the lease, until cancelled.

        Several loops may keep one keeper (each run of a context that is not entered has
        one): a loop that wakes just after another renewed lets it be, so the leases are
        renewed about once a period whatever the number of loops."""
        if self.local:
            return
        while True:
            await anyio.sleep(self.every)
            if time.monotonic() - self._renewed < self.every / 2:
                continue
            try:
                await self.renew()
            except (BackendUnavailable, OSError) as exc:
                # The store is away: its leases wait too, and the next round tells.
                log.warning("cannot renew run leases: %s", exc)

    def close(self) -> None:
        """This keeper drives nothing more: its leases may be taken over at once."""
        mark_gone(self.owner)
