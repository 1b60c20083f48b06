"""LangChain's standard integration tests (``langchain-tests``) on ChatNablaReasoner over the embedded
SmolLM2-135M-Instruct, greedy, constructed as the suite constructs chat models (its standard parameters), with
``tool_use="call_then_answer"`` (the documented setting for small models: docs/frontends.md, "Tools").

An xfail here names a limit of this 135M model, never an interface bug; the counts are in docs/frontends.md.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_tests.integration_tests import ChatModelIntegrationTests

from nabla_lc import Engine
from nabla_lc.loading import load_engine

from .test_langchain_standard import Capabilities

pytestmark = pytest.mark.real_model

MODEL = "embedded:SmolLM2-135M-Instruct"


@functools.cache
def smollm2() -> Engine:
    """The embedded policy without a reward (greedy needs none), loaded once for the module."""
    return load_engine("embedded", "none")


class TestChatNablaReasonerIntegration(Capabilities, ChatModelIntegrationTests):
    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"engine": smollm2(), "model": MODEL, "method": "greedy", "tool_use": "call_then_answer"}

