"""Tool calling and structured output, shared by the front-ends (LangChain, DSPy): the tool prompt, the
reply's tool calls, and the grammar constraints that force a tool call or a JSON schema.

Tools are OpenAI-style function definitions (``{"type": "function", "function": {"name", "description",
"parameters"}}``). A chat template that renders ``tools`` (Qwen2.5, Llama 3.1, ...) gets them as they are;
for one that does not (the embedded SmolLM2's), :func:`tool_prompt` is appended to the system message.
Either way the model calls a tool by replying with blocks of the Hermes/Qwen2.5 form::

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "123 + 456"}}
    </tool_call>

and :func:`parse_tool_calls` reads them back (a malformed block becomes an invalid call, never an
exception). A forced tool choice is a grammar (:func:`tool_call_constraint`), so the reply always parses.
Tool calls and tool results of earlier turns are rendered by :func:`conversation`.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Mapping, NamedTuple, Sequence

from .engine.constraints import grammar_error
from .engine.types import Constraint

if TYPE_CHECKING:
    import xgrammar

ToolChoice = Literal["auto", "none", "any", "required"] | str | None
"""None or ``auto``: the model decides; ``none``: no tool; ``any``/``required``: some tool; a tool's name: that tool."""

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|(?=<tool_call>)|$)", re.DOTALL)
"""A tool-call block; one without its closing tag is read to the next block or the end (and is usually invalid)."""


def tool_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """The project's tool section, for chat templates without one."""
    lines = [json.dumps(_function(t), ensure_ascii=False) for t in tools]
    return (
        "You can call these tools:\n"
        + "\n".join(lines)
        + "\n\nTo call a tool, reply with only:\n<tool_call>\n"
        + '{"name": "<tool name>", "arguments": {<the arguments as JSON>}}\n</tool_call>\n'
        + "When a tool result is given, use it to answer."
    )


def tool_names(tools: Sequence[Mapping[str, Any]]) -> list[str]:
    return [_function(t)["name"] for t in tools]


def check_tool_choice(tools: Sequence[Mapping[str, Any]], choice: ToolChoice) -> ToolChoice:
    """The tool choice in our words (``required`` is ``any``); an unknown tool name raises ``ValueError``."""
    if isinstance(choice, Mapping):  # OpenAI's {"type": "function", "function": {"name": ...}}, Anthropic's {"type": "any"}
        named = choice.get("function", {}).get("name") or choice.get("name")
        if named is None and choice.get("type") not in ("auto", "none", "any", "required"):
            raise ValueError(f"tool_choice {dict(choice)!r:.200} names no tool and no known type")
        choice = named if named is not None else choice["type"]
    if choice in (None, "auto", "none"):
        return choice
    if choice in ("required", True):
        choice = "any"
    if choice == "any":
        if not tools:
            raise ValueError("tool_choice forces a tool call, but no tools are bound")
        return choice
    names = tool_names(tools)
    if choice not in names:
        raise ValueError(f"tool_choice must be None, 'auto', 'none', 'any', 'required' or one of the tools {names}, got {choice!r}")
    return choice


def tool_call_constraint(tools: Sequence[Mapping[str, Any]], choice: ToolChoice, quote: str | None = None) -> Constraint | None:
    """The grammar of a forced tool call (``any`` or a name): one ``<tool_call>`` block whose JSON names a bound
    tool and holds arguments valid under its parameters' schema, where a required string is never empty and, given
    ``quote``, a required free string is quoted from it (:func:`filled`). None when the model may answer in text."""
    if choice in (None, "auto", "none"):
        return None
    return Constraint.ebnf(str(_tool_call_grammar(tools, choice, quote)))


def tool_call_or_json_constraint(tools: Sequence[Mapping[str, Any]], schema: Mapping[str, Any]) -> Constraint:
    """The grammar of a reply that either calls one of ``tools`` (as :func:`tool_call_constraint` with ``any``) or
    answers with a JSON document valid under ``schema``: tools the model may use, and a ``response_format``."""
    import xgrammar as xgr  # why: only constrained requests need it

    return Constraint.ebnf(str(xgr.Grammar.union(_tool_call_grammar(tools, "any"), _json_grammar(schema))))


def _tool_call_grammar(tools: Sequence[Mapping[str, Any]], choice: ToolChoice, quote: str | None = None) -> "xgrammar.Grammar":
    """The grammar of one ``<tool_call>`` block calling a tool that ``choice`` (``any`` or a name) allows;
    :class:`ToolSchemaError` names a tool whose parameters do not compile."""
    pattern = quotation_pattern(quote) if quote is not None else None  # why: once for every tool, not per property
    calls = {
        i: {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "arguments": _filled(f.get("parameters") or {"type": "object"}, pattern)},
            "required": ["name", "arguments"],
        }
        for i, f in enumerate(map(_function, tools))
        if choice == "any" or f["name"] == choice
    }
    schema = next(iter(calls.values())) if len(calls) == 1 else {"anyOf": list(calls.values())}
    try:
        return _wrapped_grammar(schema, "<tool_call>\n", "\n</tool_call>")
    except ValueError as err:  # why: name the tool whose parameters fail (looked for only once the whole failed)
        for i, call in calls.items():
            try:
                _json_grammar(call)
            except ValueError as own:
                raise ToolSchemaError(i, f"tool {i} ({_function(tools[i])['name']!r}): its parameters' {own}") from None
        raise err


class ToolSchemaError(ValueError):
    """A tool whose parameters' JSON schema does not compile to a grammar; :attr:`index` is its place in ``tools``."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


def filled(schema: Mapping[str, Any], quote: str | None = None) -> dict[str, Any]:
    """``schema`` with every required string property that sets no length, pattern, format or values (in nested
    objects too) made non-empty (``minLength: 1``), and, given ``quote``, a quotation from it
    (:func:`quotation_pattern`; ``minLength`` only when ``quote`` has nothing to quote or is too long to).

    Why: under a forced call the embedded SmolLM2 called a calculator whose argument is a bare string with an
    empty ``expression``, or wrote ``)(285, 225)`` for "What is 285 + 225?"; quoted, it writes ``285 + 225``
    (docs/frontends.md, "Tools")."""
    return _filled(schema, quotation_pattern(quote) if quote is not None else None)


def _filled(schema: Mapping[str, Any], pattern: str | None) -> dict[str, Any]:
    """:func:`filled` with the quotation's ``pattern`` (None: ``minLength`` only)."""
    out = dict(schema)
    properties = schema.get("properties")
    if isinstance(properties, Mapping):
        required = set(schema.get("required") or ())
        out["properties"] = {
            name: _filled_property(value, name in required, pattern) if isinstance(value, Mapping) else value for name, value in properties.items()
        }
    return out


def _filled_property(schema: Mapping[str, Any], required: bool, pattern: str | None) -> dict[str, Any]:
    if schema.get("type") == "object":
        return _filled(schema, pattern)
    if not required or schema.get("type") != "string" or any(k in schema for k in ("minLength", "pattern", "format", "enum", "const")):
        return dict(schema)
    return {**schema, "pattern": pattern} if pattern is not None else {**schema, "minLength": 1}


QUOTE_PATTERN_LIMIT = 20_000
"""The longest quotation pattern a tool-call grammar takes (characters; the pattern grows with the square of the
quoted text's length: a 209-character question makes about 12,000)."""

QUOTE_OPENERS = "'([{$-"
"""The characters other than letters and digits a quotation may begin with (not an operator: quoting "What is 442 +
345?", the embedded SmolLM2 began 7 of 34 calculator expressions at the "+" and wrote "+ 345")."""

_REGEX_META = frozenset("\\.^$|?*+()[]{}/-")


def quotation_pattern(text: str) -> str | None:
    """A regular expression for the non-empty substrings of ``text`` that begin a word (at a letter, a digit or one
    of :data:`QUOTE_OPENERS`, not inside a word) and do not run into the text's trailing spaces; a ``"``, ``\\`` or control character (which JSON escapes) ends
    a quotable piece. None when there is none, or the pattern would pass :data:`QUOTE_PATTERN_LIMIT` (found as soon
    as its running length does, before the alternatives are written: the pattern grows with the square of the text)."""
    alternatives = []
    length = len("^()$") - len("|")  # the pattern's length so far, with the "|" before each alternative
    for piece in re.split(r'["\\\x00-\x1f]', text):
        for i, char in enumerate(piece):
            if not (char.isalnum() or char in QUOTE_OPENERS) or (i > 0 and piece[i - 1].isalnum()):
                continue
            rest = piece[i:].rstrip()  # not empty: it begins with ``char``
            length += len("|") + _prefixes_length(rest)
            if length > QUOTE_PATTERN_LIMIT:
                return None
            alternatives.append(_prefixes(rest))
    return "^(" + "|".join(alternatives) + ")$" if alternatives else None


def _prefixes_length(text: str) -> int:
    """``len(_prefixes(text))``, without writing it: each character escaped, each after the first in ``(...)?``."""
    return sum(2 if c in _REGEX_META else 1 for c in text) + len("()?") * (len(text) - 1)


def _prefixes(text: str) -> str:
    """A regular expression for the non-empty prefixes of ``text``."""
    escaped = ["\\" + c if c in _REGEX_META else c for c in text]
    out = ""
    for char in reversed(escaped[1:]):
        out = f"({char}{out})?"
    return escaped[0] + out


def _wrapped_grammar(schema: Mapping[str, Any], prefix: str, suffix: str) -> "xgrammar.Grammar":
    """``prefix``, a JSON document valid under ``schema``, then ``suffix``; ``ValueError`` where the schema does not compile."""
    import xgrammar as xgr  # why: only requests with a forced tool call need it

    body = _json_grammar(schema)
    return xgr.Grammar.concat(xgr.Grammar.from_ebnf(f"root ::= {json.dumps(prefix)}"), body, xgr.Grammar.from_ebnf(f"root ::= {json.dumps(suffix)}"))


def _json_grammar(schema: Mapping[str, Any]) -> "xgrammar.Grammar":
    """xgrammar's grammar of a JSON schema; ``ValueError`` with xgrammar's reason where it refuses it."""
    import xgrammar as xgr

    try:
        return xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
    except (RuntimeError, ValueError) as err:  # why: xgrammar reports a bad schema as RuntimeError
        raise ValueError(f"JSON schema does not compile: {grammar_error(err)}") from None


@dataclass
class ToolCall:
    """One tool call read from a reply."""

    name: str
    arguments: dict[str, Any]
    id: str


@dataclass
class InvalidToolCall:
    """A tool-call block that does not parse, or names no bound tool."""

    text: str
    error: str
    id: str
    name: str | None = None


@dataclass
class Reply:
    """A reply split into its text and its tool calls."""

    content: str
    calls: list[ToolCall] = field(default_factory=list)
    invalid: list[InvalidToolCall] = field(default_factory=list)


def parse_tool_calls(text: str, tools: Sequence[Mapping[str, Any]]) -> Reply:
    """The reply's ``<tool_call>`` blocks as calls of the bound tools (others: invalid), and the text around them."""
    names = set(tool_names(tools))
    reply = Reply(TOOL_CALL.sub("", text).strip())
    for match in TOOL_CALL.finditer(text):
        block = match.group(1)
        call_id = "call_" + uuid.uuid4().hex[:24]  # why: unique per call, as OpenAI's; a cached reply keeps the ids it was stored with
        try:
            value = json.loads(block)
        except json.JSONDecodeError as err:
            reply.invalid.append(InvalidToolCall(block, f"not JSON: {err}", call_id))
            continue
        name = value.get("name") if isinstance(value, dict) else None
        arguments = value.get("arguments", value.get("parameters", {})) if isinstance(value, dict) else None
        if not isinstance(name, str) or name not in names:
            reply.invalid.append(InvalidToolCall(block, f"names no bound tool (bound: {sorted(names)})", call_id, name if isinstance(name, str) else None))
        elif not isinstance(arguments, dict):
            reply.invalid.append(InvalidToolCall(block, "arguments are not a JSON object", call_id, name))
        else:
            reply.calls.append(ToolCall(name, arguments, call_id))
    return reply


def render_call(call: ToolCall) -> str:
    """A tool call as the model writes it."""
    return "<tool_call>\n" + json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False) + "\n</tool_call>"


class Conversation(NamedTuple):
    """A conversation as the chat template takes it (:func:`conversation`)."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    """The tools to pass to the chat template (None when they are in the system message or there are none)."""
    question: str | None
    """The user's last message, the question the reward sees (tool results are not questions); None when there is
    no user turn (``request_from_messages`` then gives the reward the last user-role message, the results' turn)."""


def conversation(turns: Sequence[dict[str, Any]], tools: Sequence[Mapping[str, Any]], native: bool) -> Conversation:
    """Turns (role, content, and ``tool_calls``: list of :class:`ToolCall` on assistant turns) as the chat template
    takes them.

    ``native``: the template renders tools (:func:`nabla_lc.engine.policy.template_renders_tools`), so tool calls,
    tool results and tools go to it in OpenAI's shape. Otherwise tool calls become text in the assistant's turn, the
    tool prompt joins the system message (one is added when there is none), and the tool results after an assistant
    turn become one user turn (:func:`tool_results_text`): such a template has no ``tool`` role the model knows.
    """
    out: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for turn in turns:
        if turn["role"] == "tool" and not native:
            results.append(turn)
            continue
        if results:
            out.append({"role": "user", "content": tool_results_text(results)})
            results = []
        calls: list[ToolCall] = turn.get("tool_calls") or []
        if turn["role"] != "assistant" or not calls:
            out.append({k: v for k, v in turn.items() if k != "tool_calls"})
        elif native:
            functions = [{"type": "function", "id": c.id, "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
            out.append({"role": "assistant", "content": turn["content"], "tool_calls": functions})
        else:
            text = "\n".join([turn["content"]] * bool(turn["content"]) + [render_call(c) for c in calls])
            out.append({"role": "assistant", "content": text})
    if results:
        out.append({"role": "user", "content": tool_results_text(results)})
    question = next((t["content"] for t in reversed(turns) if t["role"] == "user"), None)
    if not tools:
        return Conversation(out, None, question)
    if native:
        return Conversation(out, list(tools), question)
    section = tool_prompt(tools)
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{section}"}
    else:
        out.insert(0, {"role": "system", "content": section})
    return Conversation(out, None, question)


def tool_results_text(results: Sequence[Mapping[str, Any]]) -> str:
    """Tool results (``tool`` turns) as the user turn that follows the calls, for templates without a tool role.

    One line per result, then an instruction. Why: such a template renders a ``tool`` turn under a role its model
    was not trained on, and the embedded SmolLM2 then wrote about the calculator instead of the result
    (BENCHMARKS.md, "Tools and structured output").
    """
    lines = [f"The {r['name'] + ' ' if r.get('name') else ''}tool returned: {r['content']}" for r in results]
    these = "this result" if len(results) == 1 else "these results"
    return "\n".join(lines) + f"\nAnswer my question with {these}."


def json_schema_of(schema: Any) -> dict[str, Any]:
    """The JSON schema of a pydantic model, a TypedDict or a JSON schema dict (an OpenAI tool's parameters too)."""
    from pydantic import BaseModel

    if isinstance(schema, type) and issubclass(schema, BaseModel):
        return schema.model_json_schema()
    if isinstance(schema, Mapping):
        function = schema.get("function") if schema.get("type") == "function" else None
        return dict(function.get("parameters", {})) if isinstance(function, Mapping) else dict(schema)
    from langchain_core.utils.function_calling import convert_to_openai_tool  # why: its TypedDict conversion handles docstrings and Annotated

    return dict(convert_to_openai_tool(schema)["function"]["parameters"])


def response_format_schema(value: Any) -> dict[str, Any] | None:
    """The JSON schema a ``response_format`` asks for: OpenAI's shapes (``{"type": "json_schema", "json_schema":
    {"schema": ...}}``, ``{"type": "json_object"}``, ``{"type": "text"}``: None), DSPy's (``{"type": "json_schema",
    "schema": ...}``), or a pydantic model, TypedDict or bare JSON schema (:func:`json_schema_of`)."""
    if isinstance(value, Mapping) and value.get("type") in ("json_schema", "json_object", "text"):
        if value["type"] == "text":
            return None
        if value["type"] == "json_object":
            return {"type": "object"}
        inner = value.get("json_schema", value)
        schema = inner.get("schema") if isinstance(inner, Mapping) else None
        if not isinstance(schema, Mapping):
            raise ValueError(f"response_format of type 'json_schema' needs a 'schema' object, got {value!r:.120}")
        return dict(schema)
    return json_schema_of(value)


def _function(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    """The function definition of an OpenAI-style tool (or of a bare function definition)."""
    function = tool.get("function", tool)
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ValueError(f"a tool must be an OpenAI-style function definition with a name, got {tool!r:.120}")
    return function
