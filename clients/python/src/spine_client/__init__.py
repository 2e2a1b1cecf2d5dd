"""Python client of Spine's HTTP API: submit jobs to a dispatcher from a web app or a
script, wait for their outputs, follow their events, fan out with batches and map/reduce.

    import spine_client
    digest = spine_client.Client().run("hash.sha256", input=b"hello")

``Client`` blocks (Flask, Django, scripts); ``AsyncClient`` is its asyncio twin. Errors are
the typed exceptions of this package (all are :class:`SpineError`).
"""

from ._async import AsyncClient, AsyncJob
from ._common import INLINE_LIMIT, Event
from ._errors import *  # noqa: F401,F403  (the exception classes, listed in __all__)
from ._errors import __all__ as _error_names
from ._sync import DEFAULT_URL, Client, Job

__version__ = "0.1.0"

__all__ = [
    "Client",
    "AsyncClient",
    "Job",
    "AsyncJob",
    "Event",
    "DEFAULT_URL",
    "INLINE_LIMIT",
    *_error_names,
]
