"""LLM providers, reached from inside steps: ``await fd.llm.chat(prompt, model=...)``.

How it stacks: :func:`chat` finds the provider (``llm=``, or the running step's context)
and reports streamed text and usage to the step; a provider (:class:`OpenAI`,
:class:`Anthropic`, :class:`flowdsl.testing.FakeLLM`, or anything implementing
:class:`Provider`) turns one call into requests.  :class:`BaseProvider` holds what they
share: the tool loop, structured output, the limits on requests in flight and tokens per
minute, and the price table.  With ``batch_api=``, the calls of batch runs go through
the providers' batch APIs (:class:`BatchAPI`, ``_batch``).  The SDKs are imported when a
provider is constructed, never by ``import flowdsl``.

See ``docs/llm.md`` for a guide.
"""

from __future__ import annotations

from ._anthropic import Anthropic as Anthropic
from ._base import BaseProvider as BaseProvider
from ._base import Exchange as Exchange
from ._base import Turn as Turn
from ._batch import BatchAPI as BatchAPI
from ._chat import chat as chat
from ._errors import LLMError as LLMError
from ._errors import StructuredOutputError as StructuredOutputError
from ._openai import OpenAI as OpenAI
from ._prices import BATCH_DISCOUNT as BATCH_DISCOUNT
from ._prices import DEFAULT_PRICES as DEFAULT_PRICES
from ._types import Message as Message
from ._types import Price as Price
from ._types import Provider as Provider
from ._types import Reply as Reply
from ._types import ToolCall as ToolCall
from ._types import Usage as Usage

__all__ = [
    "BATCH_DISCOUNT",
    "DEFAULT_PRICES",
    "Anthropic",
    "BaseProvider",
    "BatchAPI",
    "Exchange",
    "LLMError",
    "Message",
    "OpenAI",
    "Price",
    "Provider",
    "Reply",
    "StructuredOutputError",
    "ToolCall",
    "Turn",
    "Usage",
    "chat",
]


def _fixup_module_metadata() -> None:
    # Tracebacks and reprs say `flowdsl.llm.LLMError`, not `flowdsl.llm._errors.LLMError`.
    for name in __all__:
        obj = globals()[name]
        if isinstance(obj, type) and obj.__module__.startswith(f"{__name__}._"):
            obj.__module__ = __name__


_fixup_module_metadata()
del _fixup_module_metadata
