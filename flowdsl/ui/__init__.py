"""The run inspector: ``flowdsl ui``, a web page over a store.

:func:`create_app` builds the ASGI app (Starlette), :func:`serve` runs it with uvicorn.
``views`` turns store records into what the page shows, ``driver`` does the actions
(resume, cancel, signal), ``security`` guards every request.  Needs ``flowdsl[ui]``.
"""

from __future__ import annotations

from .._errors import ConfigError

try:
    import starlette as _starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ConfigError(
        "the run inspector needs Starlette and uvicorn",
        hint="pip install 'flowdsl[ui]'",
    ) from exc

from .app import collect_flows as collect_flows
from .app import create_app as create_app
from .serve import serve as serve

__all__ = ["collect_flows", "create_app", "serve"]
