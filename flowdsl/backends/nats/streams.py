"""The NATS broker's streams, made on its first open with flowdsl's settings (an existing
stream is kept as it is, see :func:`~flowdsl.backends.nats.link.ensure_stream`; the tasks
stream must still queue one message per node, or nothing would stop a node being queued
twice)."""

from __future__ import annotations

from typing import Any, Final

from ..._errors import ConfigError
from .link import NatsLink, ensure_stream, storage_type
from .url import NatsOptions

__all__ = ["ensure_streams", "stream_name"]

_DUPLICATE_WINDOW: Final = 60.0  # seconds a Nats-Msg-Id is remembered (retried publishes)


def stream_name(prefix: str, kind: str) -> str:
    """The name of the stream of *kind* (``tasks``, ``log``, ``dead``) under *prefix*."""
    return f"{prefix}_{kind}"


async def ensure_streams(link: NatsLink, o: NatsOptions, url: str) -> None:
    """The tasks, log and dead-letter streams under *o*'s prefix (see the broker's module
    docstring for their layout)."""
    from nats.js.api import DiscardPolicy, RetentionPolicy, StreamConfig

    p = o.prefix
    storage = storage_type(o)

    def config(kind: str, description: str, retention: Any, **more: Any) -> Any:
        return StreamConfig(
            name=stream_name(p, kind),
            description=description,
            subjects=[f"{p}.{kind}.>"],
            retention=retention,
            storage=storage,
            num_replicas=o.replicas,
            duplicate_window=_DUPLICATE_WINDOW,
            **more,
        )

    tasks = await ensure_stream(
        link,
        config(
            "tasks",
            "flowdsl tasks: one message per queued or held node",
            RetentionPolicy.WORK_QUEUE,
            discard=DiscardPolicy.NEW,
            discard_new_per_subject=True,
            max_msgs_per_subject=1,
        ),
    )
    settings = tasks.config
    if settings.retention != RetentionPolicy.WORK_QUEUE or settings.max_msgs_per_subject != 1:
        raise ConfigError(
            f"the stream {stream_name(p, 'tasks')} on {url} exists with other settings than "
            "flowdsl's (work-queue retention, one message per subject)",
            hint="Delete it (nats stream rm) or use another prefix= for flowdsl",
        )
    log = config(
        "log",
        "flowdsl completions and events",
        RetentionPolicy.LIMITS,
        max_age=o.max_age or None,
    )
    await ensure_stream(link, log)
    await ensure_stream(link, config("dead", "flowdsl dead-lettered tasks", RetentionPolicy.LIMITS))
