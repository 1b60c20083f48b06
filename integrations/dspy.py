"""DSPy front-end: a ``dspy.LM`` whose engine is a nabla-lc engine (DSPy 3.4's engine contract).

DSPy owns caching, retries, history and the fan-out of ``n`` candidates (one ``complete`` call per
candidate). This module only translates one ``dspy.lm15.Request`` into one engine request and the
engine's result into one ``dspy.lm15.Response``::

    lm = dspy_lm(FrontEndSettings(engine, engine.config.replace(method="nabla"), "my-model"))
    # or, from a LangChain LLM over the same engine: NablaReasonerLLM(engine=engine).as_dspy_lm()
    dspy.configure(lm=lm)

Tools and ``response_format`` reach the engine through the grammar (:mod:`nabla_lc.tool_calls`): a JSON
schema (DSPy's ``JSONAdapter`` sends its output fields' schema) or JSON mode constrains the reply, so it always
parses; tools are rendered by the chat template when it renders them, else by the project's tool prompt, and the
reply's ``<tool_call>`` blocks come back as ``ToolCallPart``s (a ``required`` tool choice is a grammar too).

Seeds: a request that sets ``seed`` decodes deterministically with it. A request without one gets the
next seed of a generator seeded with the config's ``seed``, so ``n > 1`` and DSPy's ``rollout_id``
give different samples (as they do with a sampling provider); the seed used is in
``provider_data["seed"]``, so any answer can be reproduced.
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import hashlib
import json
import logging
import random
import re
import threading
import typing
from typing import Any, AsyncIterator, Iterator, Mapping

import dspy
import pydantic
from dspy.lm15 import (
    Config,
    InvalidRequestError,
    Message,
    Request,
    Response,
    StreamDeltaEvent,
    StreamEndEvent,
    StreamStartEvent,
    TextPart,
    ToolCallPart,
    ToolResultPart,
    UnsupportedFeatureError,
    Usage,
)
from dspy.lm15 import TextDelta as DSPyTextDelta

from nabla_lc.config import NablaConfig
from nabla_lc.engine.types import Constraint, Result, TextDelta
from nabla_lc.engine.types import Request as EngineRequest
from nabla_lc.frontend import FrontEndSettings, call_config
from nabla_lc.tool_calls import ToolCall, ToolChoice, conversation, filled, parse_tool_calls, response_format_schema, tool_call_constraint

__all__ = ["AsyncNablaDSPyEngine", "GrammarJSONAdapter", "NablaDSPyEngine", "dspy_lm", "server_lm"]

log = logging.getLogger(__name__)

JSON_MODE_HINT = (
    "a DSPy request in JSON mode (response_format json_object) constrains the reply to some JSON object, not to the "
    "signature's fields: dspy.JSONAdapter sends it for signatures with dict outputs (ReAct's next_tool_args), and "
    "DSPy's ChatAdapter falls back to it when a reply does not parse; a small model often misses the fields then and "
    "the parse fails. dspy.configure(adapter=nabla_lc.integrations.dspy.GrammarJSONAdapter()) sends the fields' "
    "schema instead, so the reply parses"
)
"""Logged (once per engine) when JSON mode arrives: where the embedded model's DSPy parses failed."""

SUPPORTED_CONFIG: frozenset[str] = frozenset({"max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "response_format", "tool_choice", "extensions"})
"""``dspy.lm15.Config`` fields this engine carries; any other field that is set is refused. Of ``extensions``, only
``"nabla"`` (NablaConfig fields for this call, as the server's ``nabla`` object)."""

_OWN_FIELDS = {"max_new_tokens": "max_tokens", "max_tokens": "max_tokens", "seed": "seed", "stop": "stop"}
"""NablaConfig fields (and aliases) that ``Config`` carries itself, so refused in ``extensions["nabla"]``."""

_ROLES = {"user": "user", "assistant": "assistant", "developer": "system", "tool": "tool"}


class NablaDSPyEngine:
    """DSPy's synchronous engine contract (``complete``, ``stream``, ``close``) over a nabla-lc engine and its settings.

    Thread-safe: the nabla engine's scheduler batches concurrent decoding, and the seed generator has its own lock.
    """

    supported_params: frozenset[str] = SUPPORTED_CONFIG
    """Read by DSPy's adapters as the engine's capability hints."""
    supports_function_calling: bool = True
    """Native tool calls (``Request.tools``), through the tool prompt or the chat template."""
    supports_response_schema: bool = True
    """``response_format`` JSON schemas, enforced by the grammar."""

    def __init__(self, settings: FrontEndSettings) -> None:
        self.settings = settings
        self._seeds = random.Random(settings.config.seed)
        self._seed_lock = threading.Lock()
        self._hinted = False

    def complete(self, request: Request) -> Response:
        """Decode one candidate."""
        engine_request, config, seed = self.translate(request)
        [result] = self.settings.engine.generate([engine_request], config)
        message, finish_reason = self.reply(result, request)
        return Response(
            id=None,
            model=request.model,
            message=message,
            finish_reason=finish_reason,
            usage=usage(result),
            provider_data=self.provider_data(result, config, seed),
        )

    def reply(self, result: Result, request: Request) -> tuple[Message, str]:
        """The assistant message (text, then the tool calls read from it when tools were sent) and finish reason."""
        if not request.tools:
            return Message.assistant(result.text), result.finish_reason
        reply = parse_tool_calls(result.text, _offered_tools(request))
        invalid = "\n".join(f"<tool_call>{c.text}</tool_call>" for c in reply.invalid)  # why: DSPy has no invalid calls; kept as text
        text = "\n".join(t for t in (reply.content, invalid) if t)
        parts: list[Any] = ([TextPart(text)] if text else []) + [ToolCallPart(c.id, c.name, c.arguments) for c in reply.calls]
        return Message.assistant(parts or [TextPart("")]), "tool_call" if reply.calls else result.finish_reason

    def stream(self, request: Request) -> Iterator[StreamStartEvent | StreamDeltaEvent | StreamEndEvent]:
        """Stream one candidate: text as the decoder commits it, then the end event with usage and statistics.

        Requests with tools are refused: a partial ``<tool_call>`` block is not text (use ``complete``)."""
        if request.tools:
            raise UnsupportedFeatureError("nabla-lc does not stream tool calls", feature="tools")
        engine_request, config, seed = self.translate(request)
        yield StreamStartEvent(model=request.model)
        for event in self.settings.engine.stream(engine_request, config):
            if isinstance(event, TextDelta):
                yield StreamDeltaEvent(delta=DSPyTextDelta(text=event.text))
            else:
                yield StreamEndEvent(
                    finish_reason=event.result.finish_reason,
                    usage=usage(event.result),
                    provider_data=self.provider_data(event.result, config, seed),
                )

    def close(self) -> None:
        """Nothing to release: the engine is borrowed."""

    # --- translation -----------------------------------------------------------------------
    def translate(self, request: Request) -> tuple[EngineRequest, NablaConfig, int | None]:
        """The engine request, the config and the seed for a DSPy request; unsupported features raise."""
        options = request.config
        for name in (f.name for f in dataclasses.fields(Config)):
            if name not in SUPPORTED_CONFIG and getattr(options, name) not in (None, ()):
                raise UnsupportedFeatureError(f"nabla-lc does not support Config.{name}", feature=f"config.{name}")
        tools = _offered_tools(request)
        choice = _tool_choice(options)
        constraint = tool_call_constraint(tools, choice) if tools else None
        if options.response_format is not None:
            if options.response_format == {"type": "json_object"} and not self._hinted:
                self._hinted = True
                log.warning(JSON_MODE_HINT)
            if constraint is not None:
                raise UnsupportedFeatureError("a required tool call and response_format cannot both constrain one reply", feature="config.response_format")
            constraint = Constraint.json_schema(response_format_schema(options.response_format))
        if choice == "none":
            tools = []
        turns = ([{"role": "system", "content": _text(request.system, "system")}] if request.system is not None else []) + [
            _turn(m, i) for i, m in enumerate(request.messages)
        ]
        chat = conversation(turns, tools, self.settings.engine.policy.renders_tools)
        seed = options.seed if options.seed is not None else self._next_seed()
        try:
            config = call_config(self.settings.config, _call_options(options))
        except (TypeError, ValueError) as err:  # why: an lm15 error reaches the caller as DSPy's LMInvalidRequestError, not retried
            raise InvalidRequestError(str(err), code="invalid_value") from None
        engine_request = self.settings.engine.request_from_messages(
            chat.messages,
            seed=seed,
            max_new_tokens=options.max_tokens,
            stop=self.settings.stop_strings(options.stop),
            tools=chat.tools,
            constraint=constraint,
            question=chat.question,
        )
        return engine_request, config, seed

    def provider_data(self, result: Result, config: NablaConfig, seed: int | None) -> dict[str, Any]:
        """The ∇ statistics under ``"nabla"``, with the method, seed, reward and (when asked) the trace."""
        data: dict[str, Any] = {"nabla": result.stats.to_dict(), "method": config.method, "seed": seed, "reward": result.reward}
        trace = self.settings.trace(result)
        if trace is not None:
            data["trace"] = trace
        return json.loads(json.dumps(data))  # tuples become lists: provider_data must be plain JSON

    def _next_seed(self) -> int | None:
        if self.settings.config.seed is None:
            return None
        with self._seed_lock:
            return self._seeds.randrange(2**31)


def _call_options(options: Config) -> dict[str, Any]:
    """This call's NablaConfig changes: ``temperature``, ``top_p``, ``top_k``, then ``Config.extensions["nabla"]``.

    A field that ``Config`` carries itself is refused in ``nabla``, and one set in both must agree."""
    extensions = dict(options.extensions or {})
    nabla = extensions.pop("nabla", None) or {}
    if extensions:
        raise UnsupportedFeatureError(f"nabla-lc reads only Config.extensions['nabla'], got {sorted(extensions)}", feature="config.extensions")
    if not isinstance(nabla, Mapping):
        raise TypeError(f"Config.extensions['nabla'] must be an object of NablaConfig fields, got {type(nabla).__name__}")
    for name in nabla:
        if name in _OWN_FIELDS:
            raise ValueError(f"Config.extensions['nabla'].{name}: set Config.{_OWN_FIELDS[name]} instead")
    changes = dict(nabla)
    for name in ("temperature", "top_p", "top_k"):
        value = getattr(options, name)
        if value is None:
            continue
        if name in changes and changes[name] != value:
            raise ValueError(f"Config.extensions['nabla'].{name} disagrees with Config.{name} ({changes[name]!r} != {value!r})")
        changes[name] = value
    return changes


class AsyncNablaDSPyEngine:
    """DSPy's async engine contract: the synchronous engine run in worker threads, off the event loop."""

    supported_params: frozenset[str] = SUPPORTED_CONFIG
    supports_function_calling: bool = True
    supports_response_schema: bool = True

    def __init__(self, sync: NablaDSPyEngine) -> None:
        self.sync = sync

    async def complete(self, request: Request) -> Response:
        return await asyncio.to_thread(self.sync.complete, request)

    async def stream(self, request: Request) -> AsyncIterator[StreamStartEvent | StreamDeltaEvent | StreamEndEvent]:
        events = self.sync.stream(request)
        done = object()
        while (event := await asyncio.to_thread(next, events, done)) is not done:
            yield event  # type: ignore[misc]

    async def aclose(self) -> None:
        """Nothing to release: the engine is borrowed."""


def dspy_lm(settings: FrontEndSettings, *, model: str | None = None, **kwargs: Any) -> dspy.LM:
    """A ``dspy.LM`` that decodes with ``settings``' engine and settings.

    ``model`` defaults to ``"nabla-lc/<model_id>@<settings hash>"``: DSPy's response cache keys on the
    model string and the request, so the hash keeps answers of different settings apart. ``kwargs``
    go to ``dspy.LM`` (``cache``, ``temperature``, ``max_tokens``, ``num_retries``, ...).
    """
    sync = NablaDSPyEngine(settings)
    return dspy.LM(model or default_model_name(settings), engine=sync, async_engine=AsyncNablaDSPyEngine(sync), **kwargs)


class GrammarJSONAdapter(dspy.JSONAdapter):
    """``dspy.JSONAdapter`` that sends a JSON schema also for signatures with open-ended mapping fields.

    ``JSONAdapter`` falls back to JSON mode (any JSON object) when an output field is a ``dict`` (``ReAct``'s
    ``next_tool_args``), because OpenAI's strict structured outputs need every property declared. This engine's
    grammar takes any JSON schema, so here such a field is an open object and the other fields keep their types
    (``next_tool_name`` one of the tools' names): the reply always parses. For ``ReAct``'s step, whose tools DSPy
    passes in the signature's instructions (``(1) name, whose description is ... It takes arguments {...}.``), the
    schema is one choice per tool: its name, and its own arguments' schema (:func:`react_step_schema`).
    """

    def _prepare_response_format(self, lm: Any, lm_kwargs: dict[str, Any], signature: type[dspy.Signature]) -> None:
        super()._prepare_response_format(lm, lm_kwargs, signature)
        if lm_kwargs.get("response_format") == {"type": "json_object"}:
            step = react_step_schema(signature)
            if step is not None:
                lm_kwargs["response_format"] = {"type": "json_schema", "json_schema": {"name": "ReActStep", "schema": step}}
                return
            fields = {name: (field.annotation, ...) for name, field in signature.output_fields.items()}
            lm_kwargs["response_format"] = pydantic.create_model("DSPyProgramOutputs", **fields)  # type: ignore[call-overload]


REACT_STEP = ("next_thought", "next_tool_name", "next_tool_args")
_REACT_TOOL = re.compile(r"^\(\d+\) ([A-Za-z_][\w-]*)(?:, whose description is <desc>.*</desc>)?\. It takes arguments (\{.*\})\.$")


def react_step_schema(signature: type[dspy.Signature]) -> dict[str, Any] | None:
    """The JSON schema of a ``dspy.ReAct`` step: ``anyOf`` one object per tool, with ``next_tool_name`` that tool's
    name and ``next_tool_args`` its arguments (all required; strings never empty: :func:`~nabla_lc.tool_calls.filled`). None for another signature, or when a tool named in
    ``next_tool_name`` is not described in the instructions (then the step keeps the open-object schema)."""
    if tuple(signature.output_fields) != REACT_STEP:
        return None
    names = typing.get_args(signature.output_fields["next_tool_name"].annotation)
    described: dict[str, dict[str, Any]] = {}
    for line in (signature.instructions or "").splitlines():
        match = _REACT_TOOL.match(line.strip())
        if match:
            try:
                args = ast.literal_eval(match.group(2))
            except (ValueError, SyntaxError):
                continue
            if isinstance(args, dict):
                described[match.group(1)] = args
    if not names or any(name not in described for name in names):
        return None
    steps = [
        {
            "type": "object",
            "properties": {
                "next_thought": {"type": "string"},
                "next_tool_name": {"const": name},
                "next_tool_args": filled({"type": "object", "properties": described[name], "required": list(described[name])}),
            },
            "required": list(REACT_STEP),
        }
        for name in names
    ]
    return steps[0] if len(steps) == 1 else {"anyOf": steps}


SERVER_PROVIDER = "nabla-lc"
"""The lm15 provider id :func:`server_lm` registers for a ``nabla-lc serve`` endpoint."""


def server_lm(model: str, api_base: str, api_key: str | None = None, **kwargs: Any) -> dspy.LM:
    """A ``dspy.LM`` of a ``nabla-lc serve`` endpoint that sends its JSON schemas, so the server's grammar holds
    the reply to the signature (``nabla-lc/<model>``; ``kwargs`` are ``dspy.LM``'s).

    Why: ``dspy.LM("openai/<model>", api_base=...)`` cannot know that a local server takes schemas (its model
    catalogue does not list the model), so DSPy's adapters send none, or JSON mode, and a small model's reply often
    does not parse. This registers the endpoint as an OpenAI-compatible lm15 provider (vLLM's dialect) that states
    response schemas and function calling (``dspy.lm15.register_provider``, replacing an earlier registration:
    LMs built before keep theirs), the documented way to declare such a server to DSPy.
    """
    from dspy.lm15 import AccessPolicy, ModelSupport, OpenAIChatCompat, ProviderDefinition, register_provider

    access = AccessPolicy(provider=SERVER_PROVIDER, env_keys=("NABLA_LC_API_KEY",), base_url=api_base)
    definition = ProviderDefinition.chat(access, compat=OpenAIChatCompat.preset("vllm"))
    register_provider(definition, supports=ModelSupport(response_schema=True, function_calling=True), replace=True)
    return dspy.LM(f"{SERVER_PROVIDER}/{model}", api_base=api_base, api_key=api_key, **kwargs)


def default_model_name(settings: FrontEndSettings) -> str:
    """``nabla-lc/<model_id>@<hash of every parameter that changes the output>``."""
    digest = hashlib.sha256(json.dumps(settings.parameters, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"nabla-lc/{settings.model_id}@{digest}"


def usage(result: Result) -> Usage:
    return Usage(input_tokens=result.stats.prompt_tokens, output_tokens=result.stats.response_tokens)


def _tools(request: Request) -> list[dict[str, Any]]:
    """The request's function tools as OpenAI-style definitions; other tool kinds are refused."""
    out = []
    for tool in request.tools or ():
        if getattr(tool, "type", None) != "function":
            raise UnsupportedFeatureError(f"nabla-lc calls function tools only, not {getattr(tool, 'type', tool)!r}", feature="tools")
        function = {"name": tool.name, "parameters": tool.parameters} | ({"description": tool.description} if tool.description else {})
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(options: Config) -> ToolChoice:
    """DSPy's tool choice in nabla-lc's words: ``required`` of one allowed tool is that tool's name."""
    choice = options.tool_choice
    if choice is None or choice.mode == "auto":
        return None
    if choice.mode == "none":
        return "none"
    return choice.allowed[0] if len(choice.allowed) == 1 else "any"


def _offered_tools(request: Request) -> list[dict[str, Any]]:
    """The tools the reply may call: those ``tool_choice.allowed`` names (all when it names none). They are the
    tools shown to the model, the ones a required choice's grammar permits and the ones the reply is read against.
    (DSPy's ``Request`` refuses an ``allowed`` name that is not one of its tools, naming it.)"""
    choice = request.config.tool_choice
    allowed = choice.allowed if choice is not None else ()
    return [t for t in _tools(request) if not allowed or t["function"]["name"] in allowed]


def _turn(message: Message, index: int) -> dict[str, Any]:
    """A message as a chat-template turn: text, tool calls on assistant turns, a tool result's text on tool turns."""
    role = _role(message, index)
    if role == "tool":
        results = [p for p in message.parts if isinstance(p, ToolResultPart)]
        if len(results) != len(message.parts) or not results:
            raise UnsupportedFeatureError("nabla-lc takes tool messages of tool results only", feature=f"messages[{index}]")
        text = "\n".join(_text(r.content, f"messages[{index}]") for r in results)
        return {"role": "tool", "content": text, "tool_call_id": results[0].id, "name": results[0].name or ""}
    calls = [ToolCall(p.name, dict(p.input), p.id) for p in message.parts if isinstance(p, ToolCallPart)]
    text = _text([p for p in message.parts if not isinstance(p, ToolCallPart)], f"messages[{index}]")
    return {"role": role, "content": text, "tool_calls": calls} if calls else {"role": role, "content": text}


def _role(message: Message, index: int) -> str:
    if message.role not in _ROLES:
        raise UnsupportedFeatureError(f"nabla-lc takes user, assistant, developer and tool messages, not {message.role!r}", feature=f"messages[{index}]")
    return _ROLES[message.role]


def _text(content: Any, where: str) -> str:
    """The text of a system prompt or message parts; non-text parts are refused."""
    if isinstance(content, str):
        return content
    if not all(isinstance(part, TextPart) for part in content):
        raise UnsupportedFeatureError(f"nabla-lc takes text only ({where} has other parts)", feature=where)
    return "".join(part.text for part in content)
