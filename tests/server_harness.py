"""A real uvicorn server on a loopback port, in a thread: started by a test fixture, stopped after it."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from nabla_lc.server import ServerSettings, create_app, serving

API_KEY = "test-key-0123456789"


@contextmanager
def running_server(engine: object, **settings: object) -> Iterator[str]:
    """The base URL (``http://127.0.0.1:PORT/v1``) of a server over ``engine`` while the block runs."""
    app = create_app(engine, ServerSettings(**{"api_key": API_KEY, "model_name": "tiny", **settings}))  # type: ignore[arg-type]
    with serving(app) as url:
        yield url
