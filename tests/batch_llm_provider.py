"""The LLM providers of ``flowdsl worker --llm`` in the provider batch API tests.

The worker imports this module (``--import batch_llm_provider``) and takes one of these
objects (``--llm batch_llm_provider:openai``); the test server's URLs and the batch options
come from the environment the test gives the worker.
"""

from __future__ import annotations

import os

import flowdsl as fd

__all__ = ["anthropic", "openai"]

_options = fd.llm.BatchAPI(
    flush_after=float(os.environ.get("BATCH_LLM_FLUSH_AFTER", "3600")),
    poll_every=float(os.environ.get("BATCH_LLM_POLL_EVERY", "0.05")),
    max_requests=int(os.environ.get("BATCH_LLM_MAX_REQUESTS", "2")),
)
openai = fd.llm.OpenAI(
    api_key="k",
    base_url=os.environ.get("BATCH_LLM_OPENAI_URL", "http://127.0.0.1:9/v1"),
    model="gpt-4o-mini",
    batch_api=_options,
)
anthropic = fd.llm.Anthropic(
    api_key="k",
    base_url=os.environ.get("BATCH_LLM_ANTHROPIC_URL", "http://127.0.0.1:9"),
    model="claude-3-5-haiku-latest",
    batch_api=_options,
)
