"""LangChain front-ends: :class:`NablaReasonerLLM` (a ``BaseLLM``) and :class:`ChatNablaReasoner` (a chat model).

Front-ends translate only. They turn prompts or messages into engine requests, send a whole batch to
``engine.generate`` in one call, and turn results into LangChain generations. They never touch a model:
the engine's scheduler batches concurrent callers. The same object runs the baselines
(``method="bon" | "sc" | "weighted_bon" | "greedy"``) on the same engine.
"""

from __future__ import annotations

import json
import logging
from operator import itemgetter
from typing import TYPE_CHECKING, Annotated, Any, AsyncIterator, Callable, Iterator, Literal, Mapping, Sequence

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, BaseLLM
from langchain_core.language_models.base import LangSmithParams, LanguageModelInput
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, SystemMessage, ToolCallChunk, ToolMessage
from langchain_core.messages import InvalidToolCall as LCInvalidToolCall
from langchain_core.messages import ToolCall as LCToolCall
from langchain_core.messages.ai import UsageMetadata
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, Generation, GenerationChunk, LLMResult
from langchain_core.runnables import Runnable, RunnableLambda, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import BaseModel, ConfigDict, Field, InstanceOf, SkipValidation, model_validator

from .config import NablaConfig
from .engine.types import Constraint, Finished, Request, Result, StreamEvent, TextDelta
from .frontend import FrontEndEngine, FrontEndSettings, call_config, default_model_id, is_call_option
from .loading import load_engine
from .tool_calls import (
    InvalidToolCall,
    Reply,
    ToolCall,
    check_tool_choice,
    conversation,
    json_schema_of,
    parse_tool_calls,
    response_format_schema,
    tool_call_constraint,
    tool_call_or_json_constraint,
)

if TYPE_CHECKING:
    import dspy
    import torch

    from .rewards.base import RewardAdapter

log = logging.getLogger(__name__)

class NablaReasonerLLM(BaseLLM):
    """∇-Reasoner (or a baseline) as a LangChain LLM over an already-built engine.

    Every :class:`~nabla_lc.NablaConfig` field is also a constructor keyword, applied on top of
    ``config`` (default: the engine's config)::

        llm = NablaReasonerLLM(engine=engine, method="bon", n=4, max_new_tokens=128)
        llm.invoke("What is 17 * 23?")

    Per-call options (``llm.invoke(p, temperature=0.2)``, ``llm.bind(max_tokens=64)``) are any NablaConfig field,
    or LangChain's ``max_tokens`` for ``max_new_tokens``; they apply to that call only and are part of
    LangChain's cache key (:meth:`generate` decodes them on a copy whose config holds them).

    LangChain's standard parameters: ``model`` is :attr:`model_id`; ``temperature``, ``stop`` and ``max_tokens``
    (``max_new_tokens``) go to the config; ``timeout`` and ``max_retries`` are accepted and ignored (a local
    engine has no request to time out or retry); ``streaming`` decodes ``invoke`` through the engine's stream.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    engine: SkipValidation[FrontEndEngine]
    """The loaded engine (policy, reward, scheduler); shared freely between front-end objects."""
    config: InstanceOf[NablaConfig]
    """Decoding method and hyperparameters; config keywords given to the constructor are applied on top."""
    model_id: str = ""
    """Name of the policy, for tracing and LangChain's cache key; defaults to the policy's ``name_or_path``."""
    chat: bool = True
    """Apply the tokenizer's chat template to string prompts (a plain continuation when False)."""
    system: str | None = None
    """System message for string prompts under the chat template (and for chat messages that have none)."""
    return_trace: bool = False
    """Put the per-position trace (a list of dicts) in ``generation_info["trace"]``; needs ``trace=True`` in the config."""
    timeout: Annotated[float, Field(gt=0)] | None = None
    """LangChain's standard parameter, accepted and ignored: decoding is local and bounded by ``max_new_tokens``
    (to stop one early, cancel the task awaiting ``ainvoke``: the engine stops at the next token)."""
    max_retries: Annotated[int, Field(ge=0)] = 0
    """LangChain's standard parameter, accepted and ignored: a local engine has no transient failure to retry."""
    streaming: bool = False
    """``invoke``/``generate`` decode each prompt through the engine's stream, so callbacks get ``on_llm_new_token``
    as text is committed (same text; the prompts of one call are then decoded one after another, not batched)."""

    @model_validator(mode="before")
    @classmethod
    def _fold_config_keywords(cls, data: Any) -> Any:
        """Move NablaConfig keywords (and ``max_tokens``) into ``config`` and ``model`` into ``model_id``; every
        other unknown name is left to fail."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "model" in data:
            model = data.pop("model")
            if data.get("model_id") not in (None, "", model):
                raise ValueError(f"model {model!r} and model_id {data['model_id']!r} name two models; give one")
            data["model_id"] = model
        changes = {name: data.pop(name) for name in list(data) if is_call_option(name)}
        base = data.get("config")
        if base is None:
            engine = data.get("engine")
            base = engine.config if engine is not None else NablaConfig()
        data["config"] = call_config(base, changes)
        if not data.get("model_id") and data.get("engine") is not None:
            data["model_id"] = default_model_id(data["engine"])
        return data

    @model_validator(mode="after")
    def _check_trace(self) -> "NablaReasonerLLM":
        if self.return_trace and not self.config.trace:
            raise ValueError("return_trace=True needs trace=True in the config")
        return self

    # --- constructors ----------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        policy: str,
        *,
        reward: "RewardAdapter | str | None" = None,
        config: NablaConfig | None = None,
        device: str | None = None,
        dtype: "torch.dtype | None" = None,
        vocab_bridge: bool = False,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> "NablaReasonerLLM":
        """Load a policy and a reward and wrap a new engine (:func:`nabla_lc.loading.load_engine`).

        ``reward`` is an adapter, or a name or path for :func:`nabla_lc.rewards.load.load_reward` ('default',
        'judge', 'none', a LoRA reward file, a reward checkpoint directory). ``config`` defaults to the one
        recommended for the reward. ``kwargs`` are this class's fields and NablaConfig keywords.
        """
        engine = load_engine(
            policy, reward, config=config, device=device, dtype=dtype, vocab_bridge=vocab_bridge, trust_remote_code=trust_remote_code
        )
        kwargs.setdefault("model_id", policy)
        return cls(engine=engine, **kwargs)

    @classmethod
    def embedded(
        cls,
        *,
        reward: "RewardAdapter | str | None" = "default",
        config: NablaConfig | None = None,
        device: str | None = None,
        dtype: "torch.dtype | None" = None,
        **kwargs: Any,
    ) -> "NablaReasonerLLM":
        """The embedded SmolLM2-135M-Instruct policy (installed with the package, no network), by default with
        the project's reward for it (``reward="default"``; any name :func:`~nabla_lc.rewards.load.load_reward` takes)."""
        kwargs.setdefault("model_id", "embedded:SmolLM2-135M-Instruct")
        return cls.from_pretrained("embedded", reward=reward, config=config, device=device, dtype=dtype, **kwargs)

    def with_settings(self, **changes: Any) -> "NablaReasonerLLM":
        """A new LLM over the same engine with this one's settings, some changed: NablaConfig keywords or fields.

        ``llm.with_settings(method="bon", n=8)`` keeps ``llm``'s config (unlike a new
        ``NablaReasonerLLM(engine=llm.engine, ...)``, which starts from the engine's config).
        """
        fields = {name: getattr(self, name) for name in LLM_FIELDS if not (name == "model_id" and "model" in changes)}
        return type(self)(**{**fields, **changes})

    @property
    def settings(self) -> FrontEndSettings:
        """This LLM's engine and settings, as every front-end takes them."""
        return FrontEndSettings(self.engine, self.config, self.model_id, self.chat, self.system, self.return_trace)

    def as_dspy_lm(self, **kwargs: Any) -> "dspy.LM":
        """A ``dspy.LM`` decoding with this object's engine and settings (see :func:`nabla_lc.integrations.dspy.dspy_lm`)."""
        from nabla_lc.integrations.dspy import dspy_lm

        return dspy_lm(self.settings, **kwargs)

    # --- LangChain hooks -------------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return "nabla-reasoner"

    @property
    def _identifying_params(self) -> Mapping[str, Any]:
        return self.parameters

    @property
    def parameters(self) -> dict[str, Any]:
        """Everything that changes the output (LangChain's cache key and tracing are built from it)."""
        return self.settings.parameters

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        return {**params, **ls_params(self.model_id, self.config, stop, kwargs)}  # type: ignore[typeddict-item]

    def generate(self, prompts: list[str], stop: list[str] | None = None, callbacks: Any = None, **kwargs: Any) -> LLMResult:
        """BaseLLM's ``generate``, with per-call options moved into a copy's config first.

        Why: BaseLLM's cache key holds the instance's parameters and ``stop`` but not the call's other
        options; on the copy they are parameters, so two calls that differ in an option never share an entry.
        """
        options = {k: kwargs.pop(k) for k in list(kwargs) if is_call_option(k)}
        if options:
            return self.with_call_options(options).generate(prompts, stop, callbacks, **kwargs)
        return super().generate(prompts, stop, callbacks, **kwargs)

    async def agenerate(self, prompts: list[str], stop: list[str] | None = None, callbacks: Any = None, **kwargs: Any) -> LLMResult:
        """The async form of :meth:`generate`."""
        options = {k: kwargs.pop(k) for k in list(kwargs) if is_call_option(k)}
        if options:
            return await self.with_call_options(options).agenerate(prompts, stop, callbacks, **kwargs)
        return await super().agenerate(prompts, stop, callbacks, **kwargs)

    def with_call_options(self, options: Mapping[str, Any]) -> "NablaReasonerLLM":
        """A copy (callbacks, cache and tags kept) whose config holds one call's options."""
        return self.model_copy(update={"config": call_config(self.config, options)})

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` in the policy's own vocabulary."""
        return list(self.engine.policy.tokenizer.encode(text, add_special_tokens=False))

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        """Decode every prompt in one engine call (one after another through the stream under :attr:`streaming`)."""
        config = call_config(self.config, served_options(self.model_id, kwargs))
        requests = [self._request(p, stop, config) for p in prompts]
        if self.streaming and run_manager is not None:
            results = [self._streamed(request, config, run_manager) for request in requests]
        else:
            results = self.engine.generate(requests, config)
        return self._llm_result(results)

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        """Like :meth:`_generate`, awaiting the engine's scheduler: cancelling the task stops the decoding."""
        config = call_config(self.config, served_options(self.model_id, kwargs))
        requests = [self._request(p, stop, config) for p in prompts]
        if self.streaming and run_manager is not None:
            results = [await self._astreamed(request, config, run_manager) for request in requests]
        else:
            results = await self.engine.agenerate(requests, config)
        return self._llm_result(results)

    def _streamed(self, request: Request, config: NablaConfig, run_manager: CallbackManagerForLLMRun) -> Result:
        """One request decoded through the engine's stream, each committed text passed to ``on_llm_new_token``."""
        for event in self.engine.stream(request, config):
            if isinstance(event, Finished):
                return event.result
            run_manager.on_llm_new_token(event.text)
        raise RuntimeError("the engine's stream ended without a result")

    async def _astreamed(self, request: Request, config: NablaConfig, run_manager: AsyncCallbackManagerForLLMRun) -> Result:
        """The async form of :meth:`_streamed`."""
        async for event in self.engine.astream(request, config):
            if isinstance(event, Finished):
                return event.result
            await run_manager.on_llm_new_token(event.text)
        raise RuntimeError("the engine's stream ended without a result")

    def _llm_result(self, results: list[Result]) -> LLMResult:
        return LLMResult(
            generations=[[Generation(text=r.text, generation_info=self.generation_info(r))] for r in results],
            llm_output={"token_usage": token_usage(results), "model_id": self.model_id},
        )

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        """Yield committed text as the decoder commits it; the last chunk carries ``generation_info``."""
        config = call_config(self.config, served_options(self.model_id, kwargs))
        for event in self.engine.stream(self._request(prompt, stop, config), config):
            chunk = self._chunk(event)
            if run_manager is not None:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        """Like :meth:`_stream`; decoding runs on the engine's scheduler thread, so the event loop stays free."""
        config = call_config(self.config, served_options(self.model_id, kwargs))
        async for event in self.engine.astream(self._request(prompt, stop, config), config):
            chunk = self._chunk(event)
            if run_manager is not None:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    # --- translation -----------------------------------------------------------------------
    def generation_info(self, result: Result) -> dict[str, Any]:
        """``finish_reason``, the ∇ statistics under ``"nabla"``, the reward, and the trace when asked."""
        info: dict[str, Any] = {"finish_reason": result.finish_reason, "nabla": result.stats.to_dict()}
        if result.reward is not None:
            info["reward"] = result.reward
        trace = self.settings.trace(result)
        if trace is not None:
            info["trace"] = trace
        return info

    def _chunk(self, event: StreamEvent) -> GenerationChunk:
        if isinstance(event, TextDelta):
            return GenerationChunk(text=event.text)
        return GenerationChunk(text="", generation_info=self.generation_info(event.result))

    def _request(self, prompt: str, stop: str | Sequence[str] | None, config: NablaConfig) -> Request:
        return self.engine.request(prompt, chat=self.chat, system=self.system, stop=self.settings.stop_strings(stop, config))


class ChatNablaReasoner(BaseChatModel):
    """A chat model over a :class:`NablaReasonerLLM`: messages go through the tokenizer's chat template.

    System, human, AI and tool messages map to the ``system``, ``user``, ``assistant`` and ``tool`` roles (an
    AI message's tool calls and the tool results go into the next turn); other message types are refused. The
    LLM's ``system`` is prepended when the messages have no system message. Per-call options are the LLM's
    (any NablaConfig field, ``max_tokens``); LangChain's cache key for a chat model holds them.

    Tools (:meth:`bind_tools`) and structured output (:meth:`with_structured_output`) work as
    :mod:`nabla_lc.tool_calls` describes: a forced tool choice and a schema are grammar constraints, so the reply
    always parses (unless ``max_new_tokens`` cuts it).
    """

    model_config = ConfigDict(extra="forbid")

    llm: NablaReasonerLLM
    """The LLM whose engine, config, ``system`` and ``return_trace`` this chat model uses. Instead of one, the
    constructor takes the LLM's keywords (``engine=``, NablaConfig fields, the standard parameters ``model``,
    ``temperature``, ``max_tokens``, ``stop``, ``timeout``, ``max_retries``); beside ``llm=`` they change a copy of it."""
    streaming: bool = False
    """``invoke`` decodes through :meth:`_stream` (LangChain's rule for a ``streaming`` field): same reply, and
    callbacks get each committed text."""
    tool_use: Literal["model", "call_then_answer"] = "model"
    """What ``tool_choice`` None or ``"auto"`` means. ``model``: the model decides at every turn.
    ``call_then_answer``: on a turn that answers the user (the last message is a human message) a tool call is
    forced (by the grammar), its required free string arguments quoted from the user's message; on a turn after
    tool results (the last message is a tool message) the tools are withdrawn, so the model answers in text. For small models that do not decide well: under ``model`` the
    embedded SmolLM2 answered every arithmetic question itself, and once shown a tool result it called tools again
    and again (docs/frontends.md, "Tools")."""

    @model_validator(mode="before")
    @classmethod
    def _fold_llm_keywords(cls, data: Any) -> Any:
        """Build ``llm`` from the LLM's keywords (or apply them to a copy of the given one)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        keywords = {name: data.pop(name) for name in list(data) if name == "model" or (name in LLM_FIELDS and name != "streaming") or is_call_option(name)}
        if keywords:
            llm = data.get("llm")
            data["llm"] = NablaReasonerLLM(**keywords) if llm is None else llm.with_settings(**keywords)
        return data

    @classmethod
    def embedded(cls, *, tool_use: Literal["model", "call_then_answer"] = "model", **kwargs: Any) -> "ChatNablaReasoner":
        """A chat model over :meth:`NablaReasonerLLM.embedded` (same keywords: ``reward``, ``config``, NablaConfig fields)."""
        return cls(llm=NablaReasonerLLM.embedded(**kwargs), tool_use=tool_use)

    @property
    def _llm_type(self) -> str:
        return "nabla-reasoner-chat"

    @property
    def _identifying_params(self) -> Mapping[str, Any]:
        return self.llm.parameters

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        return {**params, **ls_params(self.llm.model_id, self.llm.config, stop, kwargs)}  # type: ignore[typeddict-item]

    def _resolve_model_profile(self) -> ModelProfile | None:
        """What this model serves: text in, tool calls and structured output by grammar (so ``create_agent`` uses
        the provider strategy for ``response_format``), no images, audio or PDFs."""
        profile = ModelProfile(
            text_inputs=True,
            image_inputs=False,
            image_url_inputs=False,
            pdf_inputs=False,
            audio_inputs=False,
            video_inputs=False,
            tool_calling=True,
            tool_choice=True,
            structured_output=True,
        )
        length = getattr(self.llm.engine.policy, "max_length", None)  # why: the engine's policy has one; a stand-in may not
        if isinstance(length, int):
            profile["max_input_tokens"] = length
        return profile

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` in the policy's own vocabulary."""
        return self.llm.get_token_ids(text)

    # --- tools and structured output ---------------------------------------------------------
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """This model with tools (LangChain tools, functions, pydantic models, TypedDicts or OpenAI tool dicts).

        ``tool_choice``: None or ``"auto"`` (the model decides), ``"none"``, ``"any"``/``"required"`` (some tool)
        or a tool's name (that tool); the last two are enforced by a grammar. ``kwargs``: per-call options.
        """
        formatted = [convert_to_openai_tool(tool) for tool in tools]
        choice = check_tool_choice(formatted, tool_choice)  # type: ignore[arg-type]
        return super().bind(tools=formatted, tool_choice=choice, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | BaseModel]:
        """A runnable that returns ``schema``'s object (a pydantic instance, v2 or v1, or a dict for a TypedDict or JSON schema).

        ``json_schema``: the reply is constrained to the schema's JSON; ``function_calling``: to a call of a tool
        whose parameters are the schema (read back from the tool call); ``json_mode``: to a JSON object, here the
        schema's own (the grammar can hold it to the schema, so it does; a bare ``{"type": "object"}`` asks for any
        object). ``strict`` is accepted for compatibility: the grammar is always strict. With ``include_raw`` the
        result is ``{"raw", "parsed", "parsing_error"}``.
        """
        if kwargs:
            raise TypeError(f"with_structured_output got unknown arguments {sorted(kwargs)}")
        pydantic_schema = isinstance(schema, type) and is_basemodel_subclass(schema)
        traced = {"kwargs": {"method": method, "strict": strict}, "schema": schema}  # why: LangChain converts it with convert_to_json_schema
        if method == "function_calling":
            tool = convert_to_openai_tool(schema)
            name = tool["function"]["name"]
            bound = self.bind_tools([tool], tool_choice=name, ls_structured_output_format=traced)
            parser: Runnable[Any, Any] = (
                PydanticToolsParser(tools=[schema], first_tool_only=True)  # type: ignore[list-item]
                if pydantic_schema
                else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
            )
        elif method in ("json_schema", "json_mode"):
            bound = self.bind(response_format=json_schema_of(schema), ls_structured_output_format=traced)
            parser = PydanticOutputParser(pydantic_object=schema) if pydantic_schema else JsonOutputParser()  # type: ignore[arg-type]
        else:
            raise ValueError(f"method must be 'json_schema', 'function_calling' or 'json_mode', got {method!r}")
        if not include_raw:
            return bound | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        failed = RunnablePassthrough.assign(parsed=lambda _: None)
        # why: a sequence forwards per-call options to its first step, a RunnableMap (RunnableParallel) drops them
        return bound | RunnableLambda(lambda message: {"raw": message}) | parsed.with_fallbacks([failed], exception_key="parsing_error")

    # --- decoding ---------------------------------------------------------------------------
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        request, config, tools = self._call(messages, stop, kwargs)
        [result] = self.llm.engine.generate([request], config)
        return self._chat_result(result, tools)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        """Like :meth:`_generate`, awaiting the engine's scheduler: cancelling the task stops the decoding."""
        request, config, tools = self._call(messages, stop, kwargs)
        [result] = await self.llm.engine.agenerate([request], config)
        return self._chat_result(result, tools)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        """Yield committed text as it is committed; the last chunk carries usage and statistics.

        With tools bound the reply is read whole, then yielded as one chunk with its tool calls (a partial
        ``<tool_call>`` block is not text for the user). BaseChatModel fires ``on_llm_new_token`` for each chunk.
        """
        request, config, tools = self._call(messages, stop, kwargs)
        if tools:
            [result] = self.llm.engine.generate([request], config)
            yield self._whole_chunk(result, tools)
            return
        for event in self.llm.engine.stream(request, config):
            yield self._chunk(event)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        request, config, tools = self._call(messages, stop, kwargs)
        async for event in self.llm.engine.astream(request, config):
            if not tools:
                yield self._chunk(event)
            elif isinstance(event, Finished):
                yield self._whole_chunk(event.result, tools)

    def _chat_result(self, result: Result, tools: list[dict[str, Any]]) -> ChatResult:
        reply = parse_tool_calls(result.text, tools) if tools else Reply(result.text)
        message = AIMessage(
            content=reply.content,
            tool_calls=[lc_tool_call(c) for c in reply.calls],
            invalid_tool_calls=[lc_invalid_tool_call(c) for c in reply.invalid],
            usage_metadata=usage_metadata(result),
            response_metadata={"model_name": self.llm.model_id, "finish_reason": result.finish_reason},
        )
        return ChatResult(
            generations=[ChatGeneration(message=message, generation_info=self.llm.generation_info(result))],
            llm_output={"token_usage": token_usage([result]), "model_id": self.llm.model_id},
        )

    def _whole_chunk(self, result: Result, tools: list[dict[str, Any]]) -> ChatGenerationChunk:
        """A whole reply as one chunk with the same tool calls and invalid tool calls as :meth:`_generate`'s message.

        Only the valid calls are tool-call chunks: AIMessageChunk (langchain-core 1.8 has no invalid tool-call
        chunks) reads every tool-call chunk with a lenient JSON parser, which would turn a cut-off call into a
        valid-looking one. The invalid calls are set on the chunk after it is built; adding chunks together
        re-reads the tool-call chunks, so a merged message has the valid calls and not the invalid ones.
        """
        [generation] = self._chat_result(result, tools).generations
        message = generation.message
        assert isinstance(message, AIMessage)
        chunk = AIMessageChunk(
            content=message.content,
            tool_call_chunks=[
                ToolCallChunk(name=c["name"], args=json.dumps(c["args"]), id=c["id"], index=i, type="tool_call_chunk")
                for i, c in enumerate(message.tool_calls)
            ],
            usage_metadata=message.usage_metadata,
            response_metadata=message.response_metadata,
            chunk_position="last",
        )
        chunk.invalid_tool_calls = list(message.invalid_tool_calls)
        return ChatGenerationChunk(message=chunk, generation_info=generation.generation_info)

    def _streaming_disabled(self, **kwargs: Any) -> bool:
        """BaseChatModel's rule, and: ``invoke`` with tools bound never goes through :meth:`_stream`.

        Why: with tools the reply is read whole anyway, and LangChain's invoke-through-stream (under a streaming
        callback handler, e.g. LangGraph's ``stream_mode="messages"``) adds the chunks together, which would drop
        the invalid tool calls (:meth:`_whole_chunk`). ``stream`` (which passes ``stream=True``) still streams.
        """
        return super()._streaming_disabled(**kwargs) or (bool(kwargs.get("tools")) and not kwargs.get("stream"))

    def _chunk(self, event: StreamEvent) -> ChatGenerationChunk:
        if isinstance(event, TextDelta):
            return ChatGenerationChunk(message=AIMessageChunk(content=event.text))
        message = AIMessageChunk(
            content="",
            usage_metadata=usage_metadata(event.result),
            response_metadata={"model_name": self.llm.model_id, "finish_reason": event.result.finish_reason},
            chunk_position="last",
        )
        return ChatGenerationChunk(message=message, generation_info=self.llm.generation_info(event.result))

    def _call(
        self, messages: list[BaseMessage], stop: str | Sequence[str] | None, options: Mapping[str, Any]
    ) -> tuple[Request, NablaConfig, list[dict[str, Any]]]:
        """The engine request, config and bound tools of one call.

        With tools and a ``response_format``, the reply is a tool call or the answer in the schema (the model
        chooses; under ``call_then_answer`` the user's turn is a call and the turn after the results the answer).
        ``call_then_answer``'s forced call quotes required free string arguments from the user's message
        (:func:`~nabla_lc.tool_calls.filled`).
        """
        options = served_options(self.llm.model_id, options)
        tools: list[dict[str, Any]] = options.pop("tools", None) or []
        choice = check_tool_choice(tools, options.pop("tool_choice", None))
        implied = bool(tools) and choice in (None, "auto") and self.tool_use == "call_then_answer"
        if implied:
            choice = "any" if isinstance(messages[-1], HumanMessage) else "none" if isinstance(messages[-1], ToolMessage) else choice
        response_format = options.pop("response_format", None)
        options.pop("ls_structured_output_format", None)  # why: tracing metadata LangChain passes through a bind
        options.pop("strict", None)  # why: create_agent's provider strategy may send it; the grammar is always strict
        config = call_config(self.llm.config, options)
        schema = response_format_schema(response_format) if response_format is not None else None
        # why: call_then_answer is for small models; its forced call quotes free string arguments from the question
        quote = messages[-1].text if implied and isinstance(messages[-1], HumanMessage) else None
        if schema is None:
            constraint = tool_call_constraint(tools, choice, quote) if tools else None
        elif not tools or choice == "none":
            constraint = Constraint.json_schema(schema)
        elif choice in (None, "auto"):
            constraint = tool_call_or_json_constraint(tools, schema)
        elif implied:
            constraint = tool_call_constraint(tools, choice, quote)
        else:
            raise ValueError("a forced tool_choice and response_format cannot both constrain one reply")
        if choice == "none":
            tools = []
        turns = [_turn(m) for m in messages]
        if self.llm.system and not any(t["role"] == "system" for t in turns):
            turns.insert(0, {"role": "system", "content": self.llm.system})
        chat = conversation(turns, tools, self.llm.engine.policy.renders_tools)
        request = self.llm.engine.request_from_messages(
            chat.messages, stop=self.llm.settings.stop_strings(stop, config), tools=chat.tools, constraint=constraint, question=chat.question
        )
        return request, config, tools


def _turn(message: BaseMessage) -> dict[str, Any]:
    """A message as a chat-template turn (tool calls as :class:`~nabla_lc.tool_calls.ToolCall`)."""
    if isinstance(message, SystemMessage):
        return {"role": "system", "content": message.text}
    if isinstance(message, HumanMessage):
        return {"role": "user", "content": message.text}
    if isinstance(message, AIMessage):
        calls = [ToolCall(c["name"], c["args"], c.get("id") or "") for c in message.tool_calls]
        return {"role": "assistant", "content": message.text, "tool_calls": calls}
    if isinstance(message, ToolMessage):
        return {"role": "tool", "content": message.text, "tool_call_id": message.tool_call_id, "name": message.name or ""}
    raise ValueError(f"ChatNablaReasoner takes system, human, AI and tool messages, not {type(message).__name__}")


def lc_tool_call(call: ToolCall) -> LCToolCall:
    return LCToolCall(name=call.name, args=call.arguments, id=call.id, type="tool_call")


def lc_invalid_tool_call(call: InvalidToolCall) -> LCInvalidToolCall:
    return LCInvalidToolCall(name=call.name, args=call.text, id=call.id, error=call.error, type="invalid_tool_call")


LLM_FIELDS: tuple[str, ...] = tuple(name for name in NablaReasonerLLM.model_fields if name not in BaseLLM.model_fields)
"""NablaReasonerLLM's own fields (not BaseLLM's callbacks, cache, tags...): what :meth:`~NablaReasonerLLM.with_settings` keeps."""


# --- shared translation helpers -------------------------------------------------------------
def served_options(model_id: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """A call's options without LangChain's per-call ``model``, which must name the served model (one engine serves one)."""
    options = dict(options)
    model = options.pop("model", None)
    if model is not None and model != model_id:
        raise ValueError(f"this object serves the model {model_id!r}; a call for model {model!r} needs an object over that model's engine")
    return options


def ls_params(model_id: str, config: NablaConfig, stop: Sequence[str] | None, options: Mapping[str, Any]) -> dict[str, Any]:
    """LangSmith's model name, temperature, max tokens and stop strings of a call, as it runs: its options over the
    config, the method's fixed fields applied (greedy reports temperature 0); a per-call ``model`` is reported as given."""
    ran = call_config(config, {k: v for k, v in options.items() if is_call_option(k)}).ran()
    params: dict[str, Any] = {"ls_model_name": options.get("model") or model_id, "ls_temperature": ran.temperature, "ls_max_tokens": ran.max_new_tokens}
    stops = list(dict.fromkeys((*ran.stop, *(stop or ()))))
    if stops:
        params["ls_stop"] = stops
    return params


def token_usage(results: Sequence[Result]) -> dict[str, int]:
    """OpenAI-style token counts summed over results."""
    prompt = sum(r.stats.prompt_tokens for r in results)
    completion = sum(r.stats.response_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def usage_metadata(result: Result) -> UsageMetadata:
    """LangChain's usage record of one result."""
    prompt, completion = result.stats.prompt_tokens, result.stats.response_tokens
    return UsageMetadata(input_tokens=prompt, output_tokens=completion, total_tokens=prompt + completion)
