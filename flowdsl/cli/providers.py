"""``--llm MODULE:ATTR``: the LLM provider of a command (``flowdsl worker``, ``flowdsl runs
cancel``), an object of a module the operator gave with ``--import``.

Like a step, a provider is found only in the modules the operator named: ``MODULE`` must be
one of them, and nothing is imported because of the name (see docs/security.md).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import click

from .._define.units import find_ref
from .._errors import ConfigError
from .main import usage_error

__all__ = ["llm_option", "provider_of"]

llm_option = click.option(
    "--llm",
    "llm_ref",
    metavar="MODULE:ATTR",
    help="The LLM provider of the steps (fd.Context(llm=...)): ATTR, an object such as "
    "fd.llm.OpenAI(batch_api=True), in MODULE, one of the --import modules.",
)


def provider_of(ref: str | None, modules: Sequence[str]) -> Any:
    """The provider *ref* names among the imported *modules* (``None`` without a ref)."""
    if ref is None:
        return None
    module, colon, attr = ref.partition(":")
    if not colon or not module or not attr:
        usage_error(f"--llm {ref}: give MODULE:ATTR, e.g. --llm app.flows:llm")
    if module not in modules:
        usage_error(
            f"--llm {ref}: module {module!r} is not one of the --import modules "
            f"({', '.join(modules) or 'none'}); give it with --import {module}"
        )
    try:  # an --import module: importing it is what the operator asked for
        importlib.import_module(module)
    except Exception as exc:
        raise ConfigError(
            f"--llm {ref}: importing {module!r} failed: {type(exc).__name__}: {exc}",
            hint="Check the module name and the import path (--path DIR, PYTHONPATH)",
        ) from exc
    provider = find_ref(ref, what="the LLM provider", otherwise=f"check --llm {ref}")
    if not callable(getattr(provider, "chat", None)):
        raise ConfigError(
            f"--llm {ref} is a {type(provider).__name__}, not an LLM provider",
            hint="Name an fd.llm provider object, e.g. llm = fd.llm.OpenAI(batch_api=True)",
        )
    return provider
