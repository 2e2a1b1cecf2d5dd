"""A real farm and the app as a real HTTP server for the example's tests.

`spine_url` is the Python client's own fixture (clients/python/tests/conftest.py: one
`spine up` on free loopback ports, stopped by its PID), loaded from that file rather than
copied. `serve` runs an app built by `app.create_app` with werkzeug's server on a free
loopback port in a thread, and shuts it down at the end of the test.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from werkzeug.serving import make_server

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(HERE.parent))

_spec = importlib.util.spec_from_file_location(
    "spine_client_test_fixtures", REPO / "clients/python/tests/conftest.py"
)
assert _spec is not None and _spec.loader is not None
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)

spine_url = _fixtures.spine_url


@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    """``serve(flask_app)`` → the base URL it answers on (``http://127.0.0.1:PORT``)."""
    servers: list = []

    def start(flask_app) -> str:
        server = make_server("127.0.0.1", 0, flask_app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server, thread in servers:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()
