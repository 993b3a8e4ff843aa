"""A price table for estimating what LLM calls cost.

Prices are US dollars per million input and output tokens, as the providers list them for
standard (not batch, not cached) use.  They change: treat the figures as an estimate, and
pass ``prices={...}`` to a provider to correct or extend them.  A model name matches its
own entry, else the longest entry it starts with (``gpt-4o-mini-2024-07-18`` is priced
as ``gpt-4o-mini``); a model with no match has no cost.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._errors import ConfigError
from ._types import Price

__all__ = ["BATCH_DISCOUNT", "DEFAULT_PRICES", "PriceTable"]

BATCH_DISCOUNT = 0.5
"""What a call through a provider batch job costs, as a share of the standard price (both
OpenAI's Batch API and Anthropic's Message Batches charge half)."""

DEFAULT_PRICES: Mapping[str, Price] = {
    # OpenAI
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4o-mini": Price(0.15, 0.60),
    "gpt-4.1": Price(2.00, 8.00),
    "gpt-4.1-mini": Price(0.40, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.40),
    "gpt-5": Price(1.25, 10.00),
    "gpt-5-mini": Price(0.25, 2.00),
    "gpt-5-nano": Price(0.05, 0.40),
    "o3": Price(2.00, 8.00),
    "o3-mini": Price(1.10, 4.40),
    "o4-mini": Price(1.10, 4.40),
    # Anthropic
    "claude-opus-4": Price(15.00, 75.00),
    "claude-sonnet-4": Price(3.00, 15.00),
    "claude-3-7-sonnet": Price(3.00, 15.00),
    "claude-3-5-sonnet": Price(3.00, 15.00),
    "claude-3-5-haiku": Price(0.80, 4.00),
    "claude-haiku-4-5": Price(1.00, 5.00),
    "claude-3-haiku": Price(0.25, 1.25),
}


class PriceTable:
    """Model name -> :class:`Price`, with prefix matching and user overrides."""

    def __init__(self, overrides: Mapping[str, Any] | None = None) -> None:
        table = dict(DEFAULT_PRICES)
        for model, price in (overrides or {}).items():
            table[model] = _price(model, price)
        self._table = table
        # Longest first, so that gpt-4o-mini wins over gpt-4o.
        self._prefixes = sorted(table, key=len, reverse=True)
        self._cache: dict[str, Price | None] = {}

    def lookup(self, model: str) -> Price | None:
        try:
            return self._cache[model]
        except KeyError:
            pass
        price = self._table.get(model)
        if price is None:
            price = next((self._table[p] for p in self._prefixes if model.startswith(p)), None)
        self._cache[model] = price
        return price


def _price(model: str, value: Any) -> Price:
    if isinstance(value, Price):
        return value
    if isinstance(value, tuple | list) and len(value) == 2:
        try:
            return Price(float(value[0]), float(value[1]))
        except (TypeError, ValueError):
            pass
    raise ConfigError(
        f"the price of {model!r} must be a Price or an (input, output) pair, not {value!r}",
        hint="Write prices={'my-model': fd.llm.Price(input=0.5, output=1.5)}, in dollars "
        "per million tokens",
    )
