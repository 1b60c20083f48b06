"""The OpenAI-server conformance suite's fixtures: the real server (uvicorn on 127.0.0.1, in a thread) over the tiny
engine, and over the scripted fake engine, each started once for the package (as vLLM's ``RemoteOpenAIServer``
fixtures are); and OpenAI clients of them. Tests that need other settings start their own with ``running_server``."""

from __future__ import annotations

from typing import Iterator

import openai
import pytest

from nabla_lc import Engine

from ..fake_engine import FakeEngine
from ..server_harness import openai_client, running_server


@pytest.fixture(scope="package")
def url(tiny_engine: Engine) -> Iterator[str]:
    """The base URL (``.../v1``) of the server over the tiny engine, served as ``tiny``."""
    with running_server(tiny_engine) as base:
        yield base


@pytest.fixture(scope="package")
def fake_engine() -> FakeEngine:
    """The scripted engine (its replies are known text: ``Answer to Q (seed S, sample K). STOP here. The end.``)."""
    return FakeEngine()


@pytest.fixture(scope="package")
def fake_url(fake_engine: FakeEngine) -> Iterator[str]:
    """The base URL of the server over :func:`fake_engine`, served as ``tiny``."""
    with running_server(fake_engine) as base:
        yield base


@pytest.fixture(scope="package")
def client(url: str) -> openai.OpenAI:
    return openai_client(url)


@pytest.fixture(scope="package")
def fake_client(fake_url: str) -> openai.OpenAI:
    return openai_client(fake_url)
