"""Loading a provider's SDK on first use, and keeping one SDK client per event loop.

``import flowdsl`` never imports ``openai`` or ``anthropic``: a provider imports its SDK
when it is constructed, and a missing SDK is a :class:`~flowdsl.ConfigError` naming the
extra to install.  An SDK client owns a connection pool bound to the event loop that
first used it, so each loop gets its own client (a run variable), made on first use.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any, ClassVar, Generic, TypeVar

import anyio.lowlevel

from .._errors import ConfigError
from ._base import BaseProvider, Exchange, Turn
from ._errors import LLMError

__all__ = ["LoopClient", "SDKJobs", "SSEParser", "create_args", "import_sdk"]

C = TypeVar("C")


def import_sdk(module: str, provider: str) -> ModuleType:
    """Import *module* (``openai``, ``anthropic``), or explain how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"fd.llm.{provider} needs the {module!r} package, which is not installed",
            hint=f"Install it with `pip install 'flowdsl[{module}]'`",
        ) from exc


class LoopClient(Generic[C]):
    """One SDK client per event loop, made by *factory* when a loop first needs one."""

    def __init__(self, factory: Callable[[], C], close: Callable[[C], Any]) -> None:
        self._factory = factory
        self._close = close
        self._var: anyio.lowlevel.RunVar[C | None] = anyio.lowlevel.RunVar(
            "flowdsl_llm_client", default=None
        )

    def get(self) -> C:
        client = self._var.get()
        if client is None:
            client = self._factory()
            self._var.set(client)
        return client

    async def aclose(self) -> None:
        client = self._var.get()
        if client is not None:
            self._var.set(None)
            await self._close(client)


class SSEParser:
    """Server-sent events, fed one line at a time (``event:`` and ``data:`` fields).

    The SDKs' own stream objects leave inner async generators unfinished after
    OpenAI's ``[DONE]``, which trio reports as a ResourceWarning; reading the lines
    ourselves, to the end of the body, keeps every generator finished and skips
    building a model object per chunk.
    """

    __slots__ = ("_data", "_event")

    def __init__(self) -> None:
        self._event: str | None = None
        self._data: list[str] = []

    def feed(self, line: str) -> tuple[str | None, str] | None:
        """The event that *line* completes, as ``(event name, data)``, else ``None``."""
        if not line:
            if not self._data:
                self._event = None
                return None
            event = (self._event, "\n".join(self._data))
            self._event, self._data = None, []
            return event
        if line.startswith(":"):
            return None  # a comment, used as a keep-alive
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        return None

    def flush(self) -> tuple[str | None, str] | None:
        """The last event, when the body ended without a blank line after it."""
        return self.feed("")


def create_args(body: Mapping[str, Any], named: Sequence[str]) -> dict[str, Any]:
    """Arguments for an SDK's ``create``: the fields it requires by name, the rest as
    ``extra_body``, which the SDK merges into the request's JSON as it is."""
    args = {key: body[key] for key in named if key in body}
    rest = {key: value for key, value in body.items() if key not in args}
    if rest:
        args["extra_body"] = rest
    return args


class SDKProvider(BaseProvider):
    """What the providers on an official SDK share: one SDK client per event loop
    (closed by :meth:`aclose`), a base URL shown in the repr, and the retry count the
    SDK is given."""

    base_url: str | None = None

    def _connect(self, make: Callable[[], Any], *, base_url: str | None, max_retries: int) -> None:
        if max_retries < 0:
            raise ConfigError(f"max_retries must be 0 or more, not {max_retries}")
        self.base_url = base_url
        self.max_retries = max_retries
        self._client: LoopClient[Any] = LoopClient(make, lambda client: client.close())

    def _repr_fields(self) -> dict[str, Any]:
        return {"base_url": self.base_url} if self.base_url else {}

    # --- one request, the providers' parts of it ------------------------------------------

    #: Where a request that is not streamed is posted, under the base URL.
    _path: ClassVar[str]

    async def _send(self, exchange: Exchange) -> Turn:
        body = self._body(exchange)
        client = self._client.get()
        try:
            if exchange.stream:
                return await self._stream(client, body, exchange)
            # The SDK's generic request (its documented way to reach any endpoint) keeps
            # its auth, retries and errors, and skips re-validating our body and building
            # response models we would only take apart again: a tenth of a local call.
            raw = await client.post(self._path, cast_to=bytes, body=body)
            return self._turn_of(json.loads(raw), exchange)
        except Exception as exc:
            error = self._translate(exc, exchange.model)
            if error is None:
                raise
            raise error from exc

    def _body(self, exchange: Exchange) -> dict[str, Any]:
        """The request's JSON body."""
        raise NotImplementedError

    def _turn_of(self, reply: Any, exchange: Exchange) -> Turn:
        """The turn a reply's parsed JSON says."""
        raise NotImplementedError

    async def _stream(self, client: Any, body: dict[str, Any], exchange: Exchange) -> Turn:
        """The turn a streamed request gives, read as it comes."""
        raise NotImplementedError

    def _translate(self, exc: BaseException, model: str) -> LLMError | None:
        """The flowdsl error an SDK's exception means, or None for one it does not know."""
        raise NotImplementedError

    async def aclose(self) -> None:
        await self._client.aclose()


class SDKJobs:
    """What the SDK providers' batch APIs (``_batch.Jobs``) take from their provider: a
    result line's turn, read as a reply is, and what an SDK's exception means."""

    def __init__(self, provider: Any) -> None:
        self.provider = provider

    def turn(self, body: Any, exchange: Exchange) -> Turn:
        turn: Turn = self.provider._turn_of(body, exchange)
        return turn

    def _error(self, exc: BaseException, model: str) -> BaseException:
        error = self.provider._translate(exc, model)
        return exc if error is None else error
