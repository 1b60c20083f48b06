"""The OpenAI request bodies the server accepts, and the errors it answers with (OpenAI's error format)."""

from __future__ import annotations

import json
import logging
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import ConfigError, NablaConfig
from ..engine.types import Constraint
from ..tool_calls import ToolCall, ToolChoice, ToolSchemaError, check_tool_choice, response_format_schema, tool_call_constraint

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_field(param: str, message: str) -> APIError:
    """A 400 naming the request field ``param``."""
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False
    """Send a last chunk with ``usage`` (and the ∇ statistics) and no choices."""
    continuous_usage_stats: bool = False
    """Refused when true (vLLM's extension: usage on every chunk)."""


class TextPart(BaseModel):
    """A text part of a message's content list."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    """Only text parts are supported."""
    text: str
    """The part's text."""


class FunctionCall(BaseModel):
    """The function an assistant message called."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str
    """The tool's name."""
    arguments: str
    """The arguments as JSON text."""


class MessageToolCall(BaseModel):
    """A tool call of an earlier assistant turn."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: str
    """The call's id (a ``tool`` message answers it by ``tool_call_id``)."""
    type: Literal["function"] = "function"
    """Only function calls."""
    function: FunctionCall
    """What was called."""


class Message(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    """Who speaks; ``developer`` is read as ``system``; ``tool`` answers a tool call."""
    content: str | list[TextPart] | None = None
    """The text, or a list of text parts (joined); None only on an assistant turn with tool calls."""
    name: str | None = None
    """Accepted and not used (it does not change the templated prompt)."""
    tool_calls: list[MessageToolCall] | None = None
    """An assistant turn's tool calls."""
    tool_call_id: str | None = None
    """The call a ``tool`` message answers."""

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class FunctionDefinition(BaseModel):
    """A tool's function: its name, description and parameters' JSON schema."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str
    """The name the model calls it by."""
    description: str | None = None
    """What it does (shown to the model)."""
    parameters: dict[str, object] | None = None
    """The JSON schema of its arguments."""
    strict: bool | None = None
    """Accepted: a forced call always follows the schema (it is a grammar); a free one is parsed as written."""


class Tool(BaseModel):
    """An OpenAI-style tool."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["function"]
    """Only function tools."""
    function: FunctionDefinition
    """The function."""


class NamedFunction(BaseModel):
    """The tool a named ``tool_choice`` forces."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str
    """Its name, one of ``tools``."""


class NamedToolChoice(BaseModel):
    """``{"type": "function", "function": {"name": ...}}``: call this tool."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["function"]
    """Only function tools."""
    function: NamedFunction
    """Which one."""


class JSONSchemaFormat(BaseModel):
    """The schema of a ``json_schema`` response format."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)

    name: str
    """The schema's name."""
    description: str | None = None
    """Accepted and not used."""
    schema_: dict[str, object] = Field(alias="schema")
    """The JSON schema every reply follows (a grammar constrains the decoding)."""
    strict: bool | None = None
    """Accepted: the reply always follows the schema."""


class ResponseFormat(BaseModel):
    """``text``, ``json_object`` (any JSON object) or ``json_schema`` (a JSON document valid under a schema)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text", "json_object", "json_schema"]
    """The kind of reply."""
    json_schema: JSONSchemaFormat | None = None
    """With ``json_schema``: the schema."""


class _Common(BaseModel):
    """The fields shared by chat and text completions. Unknown top-level fields are kept in ``model_extra``, so that
    :func:`parse` can warn about them (vLLM's behaviour) or refuse them (``--strict-params``); nested objects refuse
    theirs."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    """The served model's name (``GET /v1/models``)."""
    max_tokens: int | None = Field(default=None, ge=1)
    """Most response tokens (default: the engine config's ``max_new_tokens``), at most the server's cap."""
    temperature: float | None = Field(default=None, ge=0, le=2)
    """Rollout sampling temperature (NablaConfig.temperature), at most 2 as OpenAI allows (``nabla.temperature`` is not capped)."""
    top_p: float | None = Field(default=None, gt=0, le=1)
    """Nucleus mass (NablaConfig.top_p)."""
    seed: int | None = None
    """The request's seed: the same request with the same seed decodes the same text; without one the server draws a
    fresh seed (reported as ``nabla.seed``)."""
    stop: str | list[str] | None = None
    """Stop strings (at most 4, non-empty)."""
    stream: bool = False
    """Answer with server-sent events in OpenAI's chunk format."""
    stream_options: StreamOptions | None = None
    """Only with ``stream``."""
    user: str | None = None
    """Accepted and not used (an end-user id for the caller's own records)."""
    nabla: dict[str, object] | None = None
    """The extension: ``method`` and any other NablaConfig field (the OpenAI client passes it as ``extra_body``)."""

    n: int | None = Field(default=None, ge=1)
    """Choices: independent responses to the prompt, decoded in one batch, choice i with seed ``seed + i`` (at most
    the server's ``max_choices``; streamed, their chunks interleave, each with its index). Not ``nabla.n``, the method's own budget per choice."""

    # Fields the server does not support: accepted only at their neutral value, else a 400 naming them.
    presence_penalty: float | None = None
    """Not supported (absent or 0 only)."""
    frequency_penalty: float | None = None
    """Not supported (absent or 0 only)."""
    logit_bias: dict[str, float] | None = None
    """Not supported (absent or empty only)."""

    def choices(self) -> int:
        """How many choices the request asks for."""
        return self.n if self.n is not None else 1

    def top_logprobs_asked(self) -> int | None:
        """The alternatives per token the response reports (``Request.logprobs``), or None without logprobs."""
        raise NotImplementedError

    def unknown_fields(self) -> list[str]:
        """The top-level fields this server does not know (kept by ``extra="allow"``), in the body's order."""
        return list(self.model_extra or {})

    def check_unsupported(self) -> None:
        """A 400 naming the first field set to something the server cannot do."""
        self.top_logprobs_asked()  # its own checks (top_logprobs without logprobs)
        refused = {
            "presence_penalty": self.presence_penalty not in (None, 0),
            "frequency_penalty": self.frequency_penalty not in (None, 0),
            "logit_bias": bool(self.logit_bias),
        }
        for name, bad in refused.items():
            if bad:
                raise bad_field(name, f"is not supported by this server (got {getattr(self, name)!r})")
        if self.stream_options is not None and not self.stream:
            raise bad_field("stream_options", "is only allowed with stream: true")
        if self.stream_options is not None and self.stream_options.continuous_usage_stats:
            raise bad_field("stream_options.continuous_usage_stats", "is not supported by this server")

    def stop_strings(self) -> tuple[str, ...] | None:
        if self.stop is None:
            return None
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if len(stop) > 4 or not all(stop):
            raise bad_field("stop", "must be at most 4 non-empty strings")
        return tuple(stop)

    def config(self, base: NablaConfig) -> NablaConfig:
        """``base`` with the ``nabla`` object's fields, then ``temperature`` and ``top_p``, applied; a bad value is a 400 naming it."""
        changes = dict(self.nabla or {})
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if value is None:
                continue
            if name in changes and changes[name] != value:
                raise bad_field(f"nabla.{name}", f"disagrees with the request's {name} ({changes[name]!r} != {value!r})")
            changes[name] = value
        for name in ("max_new_tokens", "seed", "stop"):
            if name in changes:
                raise bad_field(f"nabla.{name}", f"is set by the request's own field ({'max_tokens' if name == 'max_new_tokens' else name})")
        try:
            return base.replace(**changes)
        except ConfigError as err:
            field = str(err).split()[0].removeprefix("NablaConfig.")
            param = f"nabla.{field}" if field in changes and field in (self.nabla or {}) else field
            if str(err).startswith("unknown NablaConfig"):
                param = "nabla"
            raise APIError(400, f"{param}: {err}", param=param, code="invalid_value") from None
        except TypeError as err:
            raise APIError(400, f"nabla: {err}", param="nabla", code="invalid_value") from None


class ChatCompletionRequest(_Common):
    """``POST /v1/chat/completions``."""

    messages: list[Message] = Field(min_length=1)
    """The conversation; the reward sees the last user message."""
    max_completion_tokens: int | None = Field(default=None, ge=1)
    """The newer name of ``max_tokens`` (give one of them)."""
    tools: list[Tool] | None = None
    """Tools the model may call: shown by the chat template (or the project's tool prompt), calls read from the reply."""
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    """``auto`` (default), ``none``, ``required`` (some tool, forced by a grammar) or a named tool (that tool, forced)."""
    parallel_tool_calls: bool | None = None
    """Accepted: a free reply may hold several calls; a forced one holds one."""
    response_format: ResponseFormat | None = None
    """``json_object`` or ``json_schema``: a grammar makes the reply valid JSON (under the schema)."""
    logprobs: bool | None = None
    """Report each reply token's log-probability (``choices[i].logprobs.content``): the policy's raw distribution
    (temperature 1, before top-p and grammar masks); only methods whose reply is one sampled rollout (greedy, bon,
    sc, weighted_bon)."""
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    """With ``logprobs``: also the most likely tokens at each position (0 to 20, as OpenAI allows)."""
    functions: list[dict[str, object]] | None = None
    """Refused (OpenAI's deprecated form of ``tools``; send ``tools``)."""
    function_call: str | dict[str, object] | None = None
    """Refused (OpenAI's deprecated form of ``tool_choice``; send ``tool_choice``)."""

    def top_logprobs_asked(self) -> int | None:
        if self.top_logprobs and not self.logprobs:
            raise bad_field("top_logprobs", "needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        for name, hint in (("functions", "tools"), ("function_call", "tool_choice")):
            if getattr(self, name) is not None:
                raise bad_field(name, f"is OpenAI's deprecated form of {hint}, which this server does not take; send {hint}")

    def tool_dicts(self) -> list[dict[str, Any]]:
        """The tools as OpenAI-style dicts."""
        return [tool.model_dump(exclude_none=True) for tool in self.tools or []]

    def turns(self) -> list[dict[str, Any]]:
        """The conversation as chat-template turns (tool calls as :class:`~nabla_lc.tool_calls.ToolCall`)."""
        turns: list[dict[str, Any]] = []
        for i, m in enumerate(self.messages):
            turn: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.tool_calls:
                if m.role != "assistant":
                    raise bad_field(f"messages.{i}.tool_calls", "only assistant messages carry tool calls")
                calls = []
                for j, call in enumerate(m.tool_calls):
                    try:
                        arguments = json.loads(call.function.arguments)
                    except json.JSONDecodeError as err:
                        raise bad_field(f"messages.{i}.tool_calls.{j}.function.arguments", f"is not JSON: {err}") from None
                    if not isinstance(arguments, dict):
                        raise bad_field(f"messages.{i}.tool_calls.{j}.function.arguments", "must be a JSON object")
                    calls.append(ToolCall(call.function.name, arguments, call.id))
                turn["tool_calls"] = calls
            turns.append(turn)
        return turns

    def choice(self) -> ToolChoice:
        """The tool choice in the engine's words; a name that is not a tool is a 400 naming ``tool_choice``."""
        choice: ToolChoice = self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else self.tool_choice
        if choice not in (None, "auto", "none") and not self.tools:
            raise bad_field("tool_choice", "needs tools")
        try:
            return check_tool_choice(self.tool_dicts(), choice)
        except ValueError as err:
            raise bad_field("tool_choice", str(err)) from None

    def constraint(self, choice: ToolChoice) -> tuple[Constraint | None, str]:
        """The grammar of a forced tool call or of the response format (not both), and the field it comes from."""
        try:
            forced = tool_call_constraint(self.tool_dicts(), choice) if self.tools else None
        except ModuleNotFoundError as err:
            raise bad_field("tool_choice", f"a forced tool call needs the 'agents' extra ({err})") from None
        except ToolSchemaError as err:
            raise bad_field(f"tools.{err.index}.function.parameters", str(err)) from None
        except ValueError as err:
            raise bad_field("tool_choice", str(err)) from None
        fmt = self.response_format
        if fmt is None:
            return forced, "tool_choice"
        try:
            schema = response_format_schema(fmt.model_dump(by_alias=True, exclude_none=True))
        except ValueError as err:
            raise bad_field("response_format", str(err)) from None
        if schema is None:
            return forced, "tool_choice"
        if forced is not None:
            raise bad_field("response_format", "cannot constrain a reply whose tool call is forced by tool_choice")
        return Constraint.json_schema(schema), "response_format"

    def budget(self) -> int | None:
        if self.max_tokens is not None and self.max_completion_tokens is not None and self.max_tokens != self.max_completion_tokens:
            raise bad_field("max_completion_tokens", "disagrees with max_tokens; give one of them")
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Common):
    """``POST /v1/completions``: a plain continuation of ``prompt`` (no chat template)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    """The text to continue, or a list of texts (one choice each, in order); token-id prompts are refused (400)."""
    echo: bool = False
    """Not supported (false only)."""
    suffix: str | None = None
    """Not supported (absent only)."""
    best_of: int | None = None
    """Not supported (absent or 1 only); use ``nabla: {"method": "bon", "n": N}``."""
    logprobs: bool | int | None = Field(default=None, ge=0, le=5)
    """Report each token's log-probability and the ``logprobs`` most likely tokens at its position (0 to 5, as OpenAI
    allows; ``choices[i].logprobs``): the policy's raw distribution, as for chat. ``false`` is absent."""

    def top_logprobs_asked(self) -> int | None:
        if self.logprobs is True:
            raise bad_field("logprobs", "is the number of most likely tokens to report (0 to 5), not true")
        return None if self.logprobs is None or self.logprobs is False else self.logprobs

    def budget(self) -> int | None:
        return self.max_tokens

    def prompts(self, cap: int) -> list[tuple[str, str]]:
        """Each prompt with the field that names it (``prompt``, or ``prompt.K`` in a list); at most ``cap`` of them."""
        if isinstance(self.prompt, str):
            return [(self.prompt, "prompt")]
        if not self.prompt:
            raise bad_field("prompt", "is an empty list; send at least one prompt")
        if not all(isinstance(p, str) for p in self.prompt):
            raise bad_field("prompt", "token-id prompts are not served; send the prompt as text (lm-eval: tokenized_requests=False)")
        if len(self.prompt) > cap:
            raise bad_field("prompt", f"is a list of {len(self.prompt)} prompts; this server's cap is {cap}")
        return [(p, f"prompt.{k}") for k, p in enumerate(self.prompt)]  # type: ignore[misc]

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.stream and isinstance(self.prompt, list) and len(self.prompt) > 1:
            raise bad_field("prompt", f"is a list of {len(self.prompt)} prompts; a stream carries one prompt (send stream: false, or one request per prompt)")
        for name, bad in (("echo", self.echo), ("suffix", self.suffix is not None), ("best_of", self.best_of not in (None, 1))):
            if bad:
                raise bad_field(name, f"is not supported by this server (got {getattr(self, name)!r})")


JSON_DEPTH = 200
"""About how deep pydantic's JSON parser nests arrays and objects before it stops ("recursion limit exceeded")."""


def parse(model: type[_Common], body: bytes, strict: bool = False) -> _Common:
    """The validated request, or a 400 naming the first bad field. An unknown top-level field is logged and
    ignored (vLLM's behaviour; the response lists it in ``nabla.ignored``), or refused with a 400 when ``strict``."""
    try:
        request = model.model_validate_json(body)
    except ValidationError as err:
        errors = err.errors()
        first = errors[0]
        param = user_param(model, first["loc"]) or None
        if first["type"] == "extra_forbidden":
            raise APIError(400, f"{param}: unsupported field", param=param, code="unsupported_field") from None
        if first["type"] == "json_invalid" and "recursion limit" in first["msg"]:  # why: valid JSON, nested past the parser's limit
            raise APIError(400, f"the body is nested too deep (the JSON parser stops at about {JSON_DEPTH} levels of arrays and objects)", code="too_deep") from None
        if first["type"] == "json_invalid":
            raise APIError(400, f"the body is not valid JSON: {first['msg']}", code="invalid_json") from None
        raise APIError(400, f"{param}: {_detail(model, param or '', errors)}", param=param, code="invalid_value") from None
    unknown = request.unknown_fields()
    if unknown and strict:
        raise APIError(400, f"{unknown[0]}: unsupported field (this server runs with --strict-params)", param=unknown[0], code="unsupported_field")
    if unknown:
        log.warning("the request's fields %s are unknown to this server and ignored", unknown)
    request.check_unsupported()
    return request


def _detail(model: type[BaseModel], param: str, errors: list[Any]) -> str:
    """What is wrong at ``param``: with a field of several accepted forms (a union), why each form failed."""
    details = []
    for error in errors:
        where = user_param(model, error["loc"])
        if where == param or where.startswith(param + "."):
            inner = where[len(param) + 1 :]
            details.append(f"{inner}: {error['msg']}" if inner else error["msg"])
    return "; ".join(list(dict.fromkeys(details))[:3])


def user_param(model: type[BaseModel], loc: tuple[int | str, ...]) -> str:
    """The request field a validation error's ``loc`` points at, as the user wrote it: pydantic's names of the union
    members it tried (``messages.0.content.str``, ``prompt.list[str]``) are left out."""
    parts: list[str] = []
    node: Any = model
    for part in loc:
        node = _strip_optional(node)
        if _is_union(node):  # the part names the member pydantic tried, not a field
            node = _union_member(node, part)
            continue
        parts.append(str(part))
        node = _step(node, part)
    return ".".join(parts)


def _strip_optional(node: Any) -> Any:
    args = [a for a in get_args(node) if a is not type(None)] if _is_union(node) else []
    return args[0] if len(args) == 1 else node


def _is_union(node: Any) -> bool:
    return get_origin(node) in (Union, types.UnionType)


def _step(node: Any, part: int | str) -> Any:
    """The type at ``part`` (a field, index or key) inside ``node``; Any where it is none of them (an unknown field)."""
    if isinstance(node, type) and issubclass(node, BaseModel):
        for name, info in node.model_fields.items():
            if part in (name, info.alias):
                return info.annotation
    if get_origin(node) is list and isinstance(part, int):
        return get_args(node)[0]
    if get_origin(node) is dict:
        return get_args(node)[1]
    return Any


def _union_member(node: Any, tag: int | str) -> Any:
    """The member of a union that pydantic names ``tag`` (its type's name, as in ``list[TextPart]``), else Any."""
    for member in get_args(node) if _is_union(node) else ():
        name = member.__name__ if isinstance(member, type) else str(member)
        if str(tag) in (name, name.replace("typing.", "")) or str(tag).split("[")[0] == getattr(get_origin(member), "__name__", None):
            return member
    return Any
