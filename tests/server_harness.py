"""A real uvicorn server on a loopback port, in a thread: started by a test fixture, stopped after it; and what the
server tests share (the key, its header, greedy decoding, the in-process result of a request)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

from nabla_lc import Engine
from nabla_lc.engine.types import Result
from nabla_lc.server import ServerSettings, create_app, serving

if TYPE_CHECKING:
    import openai

API_KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
GREEDY = {"nabla": {"method": "greedy"}}
"""The ``extra_body`` of a greedy request."""


@contextmanager
def running_server(engine: object, **settings: object) -> Iterator[str]:
    """The base URL (``http://127.0.0.1:PORT/v1``) of a server over ``engine`` while the block runs."""
    app = create_app(engine, ServerSettings(**{"api_key": API_KEY, "model_name": "tiny", **settings}))  # type: ignore[arg-type]
    with serving(app) as url:
        yield url


def openai_client(url: str) -> openai.OpenAI:
    """An OpenAI client of the server at ``url`` with the test key, no retries."""
    import openai

    return openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0, timeout=60)


def alone(engine: Engine, prompt: str, *, chat: bool = True, seed: int | None = None, max_new_tokens: int | None = None, **config: object) -> Result:
    """The result of the same request decoded in-process."""
    request = engine.request(prompt, chat=chat, seed=seed, max_new_tokens=max_new_tokens)
    [result] = engine.generate([request], engine.config.replace(**config))
    return result
