"""A real uvicorn server on a loopback port, in a thread: started by a test fixture, stopped after it."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import uvicorn

from nabla_lc.server import ServerSettings, create_app

API_KEY = "test-key-0123456789"


@contextmanager
def running_server(engine: object, **settings: object) -> Iterator[str]:
    """The base URL (``http://127.0.0.1:PORT/v1``) of a server over ``engine`` while the block runs."""
    app = create_app(engine, ServerSettings(**{"api_key": API_KEY, "model_name": "tiny", **settings}))  # type: ignore[arg-type]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
