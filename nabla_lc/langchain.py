"""LangChain front-ends: :class:`NablaReasonerLLM` (a ``BaseLLM``) and :class:`ChatNablaReasoner` (a chat model).

Front-ends translate only. They turn prompts or messages into engine requests, send a whole batch to
``engine.generate`` in one call, and turn results into LangChain generations. They never touch a model:
the engine's lock serializes concurrent callers. The same object runs the baselines
(``method="bon" | "sc" | "weighted_bon" | "greedy"``) on the same engine.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator, Mapping, Sequence

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, BaseLLM
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, SystemMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, Generation, GenerationChunk, LLMResult
from pydantic import ConfigDict, InstanceOf, SkipValidation, model_validator

from .config import NablaConfig
from .engine.types import Request, Result, StreamEvent, TextDelta
from .frontend import CONFIG_FIELDS, FrontEndEngine, FrontEndSettings, call_config, default_model_id, is_call_option
from .loading import load_engine

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
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    engine: SkipValidation[FrontEndEngine]
    """The loaded engine (policy, reward, lock); shared freely between front-end objects."""
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

    @model_validator(mode="before")
    @classmethod
    def _fold_config_keywords(cls, data: Any) -> Any:
        """Move NablaConfig keywords into ``config``; every other unknown name is left to fail."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        changes = {name: data.pop(name) for name in list(data) if name in CONFIG_FIELDS}
        base = data.get("config")
        if base is None:
            engine = data.get("engine")
            base = engine.config if engine is not None else NablaConfig()
        data["config"] = base.replace(**changes) if changes else base
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
        fields = {name: getattr(self, name) for name in ("engine", "config", "model_id", "chat", "system", "return_trace")}
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
        return {**params, **ls_params(self.model_id, self.config, kwargs)}  # type: ignore[typeddict-item]

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
        """Decode every prompt in one engine call."""
        config = call_config(self.config, kwargs)
        requests = [self._request(p, stop, config) for p in prompts]
        results = self.engine.generate(requests, config)
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
        config = call_config(self.config, kwargs)
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
        """Like :meth:`_stream`; decoding runs in a worker thread, so the event loop stays free."""
        config = call_config(self.config, kwargs)
        async for event in self.engine.astream(self._request(prompt, stop, config), config):
            chunk = self._chunk(event)
            if run_manager is not None:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    # ``_agenerate`` is BaseLLM's: it runs ``_generate`` in an executor, off the event loop.

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

    System, human and AI messages map to the ``system``, ``user`` and ``assistant`` roles; other
    message types are refused. The LLM's ``system`` is prepended when the messages have no system message.
    Per-call options are the LLM's (any NablaConfig field, ``max_tokens``); LangChain's cache key for a chat
    model holds them.
    """

    model_config = ConfigDict(extra="forbid")

    llm: NablaReasonerLLM
    """The LLM whose engine, config, ``system`` and ``return_trace`` this chat model uses."""

    @classmethod
    def embedded(cls, **kwargs: Any) -> "ChatNablaReasoner":
        """A chat model over :meth:`NablaReasonerLLM.embedded` (same keywords: ``reward``, ``config``, NablaConfig fields)."""
        return cls(llm=NablaReasonerLLM.embedded(**kwargs))

    @property
    def _llm_type(self) -> str:
        return "nabla-reasoner-chat"

    @property
    def _identifying_params(self) -> Mapping[str, Any]:
        return self.llm.parameters

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        return {**params, **ls_params(self.llm.model_id, self.llm.config, kwargs)}  # type: ignore[typeddict-item]

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` in the policy's own vocabulary."""
        return self.llm.get_token_ids(text)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        request, config = self._call(messages, stop, kwargs)
        [result] = self.llm.engine.generate([request], config)
        message = AIMessage(
            content=result.text,
            usage_metadata=usage_metadata(result),
            response_metadata={"model_name": self.llm.model_id},
        )
        return ChatResult(
            generations=[ChatGeneration(message=message, generation_info=self.llm.generation_info(result))],
            llm_output={"token_usage": token_usage([result]), "model_id": self.llm.model_id},
        )

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        """Yield committed text as it is committed; the last chunk carries usage and statistics.

        BaseChatModel fires ``on_llm_new_token`` for each chunk.
        """
        request, config = self._call(messages, stop, kwargs)
        for event in self.llm.engine.stream(request, config):
            yield self._chunk(event)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        request, config = self._call(messages, stop, kwargs)
        async for event in self.llm.engine.astream(request, config):
            yield self._chunk(event)

    def _chunk(self, event: StreamEvent) -> ChatGenerationChunk:
        if isinstance(event, TextDelta):
            return ChatGenerationChunk(message=AIMessageChunk(content=event.text))
        message = AIMessageChunk(
            content="",
            usage_metadata=usage_metadata(event.result),
            response_metadata={"model_name": self.llm.model_id},
            chunk_position="last",
        )
        return ChatGenerationChunk(message=message, generation_info=self.llm.generation_info(event.result))

    def _call(self, messages: list[BaseMessage], stop: str | Sequence[str] | None, options: Mapping[str, Any]) -> tuple[Request, NablaConfig]:
        """The engine request and config of one call."""
        config = call_config(self.llm.config, options)
        roles = [_role(m) for m in messages]
        turns = [{"role": role, "content": m.text} for role, m in zip(roles, messages)]
        if self.llm.system and "system" not in roles:
            turns.insert(0, {"role": "system", "content": self.llm.system})
        return self.llm.engine.request_from_messages(turns, stop=self.llm.settings.stop_strings(stop, config)), config


def _role(message: BaseMessage) -> str:
    if isinstance(message, SystemMessage):
        return "system"
    if isinstance(message, HumanMessage):
        return "user"
    if isinstance(message, AIMessage):
        return "assistant"
    raise ValueError(f"ChatNablaReasoner takes system, human and AI messages, not {type(message).__name__}")


# --- shared translation helpers -------------------------------------------------------------
def ls_params(model_id: str, config: NablaConfig, options: Mapping[str, Any]) -> dict[str, Any]:
    """LangSmith's model name, temperature and max tokens of a call (its options over the config)."""
    temperature = options.get("temperature", config.temperature)
    max_tokens = options.get("max_tokens", options.get("max_new_tokens", config.max_new_tokens))
    return {"ls_model_name": model_id, "ls_temperature": temperature, "ls_max_tokens": max_tokens}


def token_usage(results: Sequence[Result]) -> dict[str, int]:
    """OpenAI-style token counts summed over results."""
    prompt = sum(r.stats.prompt_tokens for r in results)
    completion = sum(r.stats.response_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def usage_metadata(result: Result) -> UsageMetadata:
    """LangChain's usage record of one result."""
    prompt, completion = result.stats.prompt_tokens, result.stats.response_tokens
    return UsageMetadata(input_tokens=prompt, output_tokens=completion, total_tokens=prompt + completion)
