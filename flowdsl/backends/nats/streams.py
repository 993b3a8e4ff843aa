"""The NATS broker's streams, made on its first open with flowdsl's settings (an existing
stream is kept as it is, see :func:`~flowdsl.backends.nats.link.ensure_stream`; the tasks
stream must still queue one message per node, or nothing would stop a node being queued
twice)."""

from __future__ import annotations

from typing import Final

from ..._errors import ConfigError
from .link import NatsLink, ensure_stream, storage_type
from .url import NatsOptions

__all__ = ["ensure_streams"]

_DUPLICATE_WINDOW: Final = 60.0  # seconds a Nats-Msg-Id is remembered (retried publishes)


async def ensure_streams(link: NatsLink, o: NatsOptions, url: str) -> None:
    """The tasks, log and dead-letter streams under *o*'s prefix (see the broker's module
    docstring for their layout)."""
    from nats.js.api import DiscardPolicy, RetentionPolicy, StreamConfig

    p = o.prefix
    storage = storage_type(o)
    tasks = await ensure_stream(
        link,
        StreamConfig(
            name=f"{p}_tasks",
            description="flowdsl tasks: one message per queued or held node",
            subjects=[f"{p}.tasks.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            discard=DiscardPolicy.NEW,
            discard_new_per_subject=True,
            max_msgs_per_subject=1,
            storage=storage,
            num_replicas=o.replicas,
            duplicate_window=_DUPLICATE_WINDOW,
        ),
    )
    config = tasks.config
    if config.retention != RetentionPolicy.WORK_QUEUE or config.max_msgs_per_subject != 1:
        raise ConfigError(
            f"the stream {p}_tasks on {url} exists with other settings than flowdsl's "
            "(work-queue retention, one message per subject)",
            hint="Delete it (nats stream rm) or use another prefix= for flowdsl",
        )
    await ensure_stream(
        link,
        StreamConfig(
            name=f"{p}_log",
            description="flowdsl completions and events",
            subjects=[f"{p}.log.>"],
            retention=RetentionPolicy.LIMITS,
            max_age=o.max_age or None,
            storage=storage,
            num_replicas=o.replicas,
            duplicate_window=_DUPLICATE_WINDOW,
        ),
    )
    await ensure_stream(
        link,
        StreamConfig(
            name=f"{p}_dead",
            description="flowdsl dead-lettered tasks",
            subjects=[f"{p}.dead.>"],
            retention=RetentionPolicy.LIMITS,
            storage=storage,
            num_replicas=o.replicas,
            duplicate_window=_DUPLICATE_WINDOW,
        ),
    )
