"""The OpenAI-compatible app over an already-built engine: :func:`create_app` (``nabla-lc serve`` runs it with uvicorn)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import json
import logging
import math
import secrets
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Literal, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..config import ConfigError, NablaConfig, check_logprobs
from ..engine.accounting import Stats
from ..engine.constraints import compile_constraint
from ..engine.types import Finished, Result, StreamEvent, TextDelta, TokenLogprob
from ..engine.types import Request as EngineRequest
from ..frontend import FrontEndEngine, default_model_id
from ..models import model_name as short_name
from ..tool_calls import ToolChoice, conversation, parse_tool_calls
from .metrics import Metrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, bad_field, parse

log = logging.getLogger(__name__)

T = TypeVar("T")


_NOT_SERVED = {
    "/v1/responses": " (OpenAI's Responses API is not implemented: send the conversation to /v1/chat/completions; "
    "with LangChain, ChatOpenAI without use_responses_api)",
}
"""Endpoints of OpenAI's API that clients may try, with what to use instead (in the 404's message)."""


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class ServerSettings(BaseModel):
    """How the server admits and limits requests."""

    model_config = ConfigDict(extra="forbid")

    api_key: str | None
    """The key every ``/v1`` and ``/metrics`` request must send as ``Authorization: Bearer KEY``; None turns auth off."""
    model_name: str | None = Field(default=None, min_length=1)
    """The name ``/v1/models`` lists and requests must use (``--served-model-name``; default: the policy's short name,
    :func:`nabla_lc.models.model_name`: a hub id as it is, a local model by its directory's or file's name)."""
    max_body_bytes: int = Field(default=1 << 20, ge=1)
    """Largest request body; a larger one gets 413."""
    max_tokens_cap: int = Field(default=1024, ge=1)
    """Largest ``max_tokens`` a request may ask for (400 above it)."""
    max_prompts: int = Field(default=32, ge=1)
    """Largest list of prompts one ``/v1/completions`` request may send (400 above it); each prompt is decoded as
    if sent alone, all at once."""
    max_choices: int = Field(default=8, ge=1)
    """Largest OpenAI ``n`` (choices, each a decoding of its own) a request may ask for (400 above it)."""
    strict_params: bool = False
    """Refuse unknown top-level request fields with a 400 (default: log a warning and ignore them, as vLLM does)."""
    max_n: int = Field(default=16, ge=1)
    """Largest ``nabla.n`` (samples, N_max, particles) a request may ask for (400 above it): with the token cap, this
    bounds the rows one request can put in a batch. The server's own default ``n`` is not checked."""
    max_queue: int = Field(default=64, ge=1)
    """Requests admitted at once (decoding or waiting to); one more gets 429 with ``Retry-After``."""
    retry_after_s: int = Field(default=1, ge=0)
    """The ``Retry-After`` of a 429."""
    request_timeout_s: float = Field(default=600.0, gt=0)
    """Wall-time limit of one request; past it the request is cancelled (504, or an error event when streaming)."""


@dataclass
class _Admission:
    """A request's place in the server: its id, start time and whether it saw text yet."""

    id: str
    created: int
    start: float
    first_text: bool = False


def create_app(engine: FrontEndEngine, settings: ServerSettings) -> FastAPI:
    """The app: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``, ``/health``, ``/metrics``.

    ``engine`` is built and owned by the caller (the CLI, a test, a Ray Serve replica).
    """
    model_name = settings.model_name or short_name(default_model_id(engine))
    app = FastAPI(title="nabla-lc", docs_url=None, redoc_url=None, openapi_url=None)
    state = {"in_flight": 0}
    metrics = Metrics(lambda: state["in_flight"])
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> Response:
        headers = {"Retry-After": str(settings.retry_after_s)} if err.status == 429 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> Response:
        message, code = str(err.detail), None
        if err.status_code == 404:  # no such route: the message names the ones there are
            path = request.url.path
            served = ", ".join(f"{method} {route.path_format}" for route in app.routes if isinstance(route, APIRoute) for method in sorted(route.methods - {"HEAD"}))
            message, code = f"{request.method} {path} is not an endpoint of this server{_NOT_SERVED.get(path, '')}; it serves {served}", "unknown_endpoint"
        return JSONResponse(APIError(err.status_code, message, type="invalid_request_error", code=code).body(), status_code=err.status_code)

    @app.exception_handler(_ClientGone)
    async def client_gone(request: Request, err: _ClientGone) -> Response:
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> Response:
        log.exception("internal error")
        return JSONResponse(APIError(500, "internal server error", type="server_error").body(), status_code=500)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        # why: compare_digest takes time independent of where the keys differ, so timing leaks nothing of the key
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)", param=None, code="invalid_api_key")

    async def body_of(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            raise APIError(413, f"the body has {length} bytes; the limit is {settings.max_body_bytes}", code="body_too_large")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > settings.max_body_bytes:
                raise APIError(413, f"the body is over the limit of {settings.max_body_bytes} bytes", code="body_too_large")
        return bytes(body)

    def admit() -> _Admission:
        if state["in_flight"] >= settings.max_queue:
            raise APIError(429, f"the server is busy ({state['in_flight']} requests in flight); retry later", type="rate_limit_error", code="queue_full")
        state["in_flight"] += 1
        return _Admission(uuid.uuid4().hex, int(time.time()), time.perf_counter())

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}", param="model", code="model_not_found")

    def check_budget(budget: int | None) -> int | None:
        if budget is not None and budget > settings.max_tokens_cap:
            raise bad_field("max_tokens", f"is {budget}; this server's cap is {settings.max_tokens_cap}")
        return budget

    def engine_request(make: Callable[[], T], param: str) -> T:
        """What ``make`` builds from the request (an engine request, ...); its input errors are 400s naming ``param``."""
        try:
            return make()
        except TemplateError as err:  # why: a chat template may refuse a conversation (roles that do not alternate, ...)
            raise bad_field(param, f"the chat template refused them: {err}") from None
        except (ValueError, TypeError) as err:
            raise bad_field(param, str(err)) from None

    def chat_request(
        chat: ChatCompletionRequest, budget: int | None, stop: tuple[str, ...] | None, choice: ToolChoice
    ) -> tuple[EngineRequest, list[dict[str, Any]]]:
        """The engine request of a chat body and the tools its reply is read against. Runs in a worker thread: the
        chat template and the grammar's construction and compilation are CPU work that would hold up the event loop."""
        tools = [] if choice == "none" else chat.tool_dicts()
        turns = conversation(chat.turns(), tools, engine.policy.renders_tools)
        request = engine_request(
            lambda: engine.request_from_messages(
                turns.messages, seed=chat.seed, max_new_tokens=budget, stop=stop, tools=turns.tools, question=turns.question
            ),
            "messages",
        )
        if chat.response_format is not None or choice not in (None, "auto", "none"):
            # why: a grammar over thousands of tools takes tens of seconds to build; a prompt too long is refused first
            engine_request(lambda: engine.policy.room(request.prompt_ids), "messages")
        constraint, param = chat.constraint(choice)
        if constraint is not None:
            request = dataclasses.replace(request, constraint=constraint)
            try:  # why: compiled here, off the event loop; the engine's own check later finds it in xgrammar's cache
                compile_constraint(engine.policy, constraint)
            except ImportError as err:
                raise bad_field(param, f"a grammar needs xgrammar, which is not installed: {err}") from None
            except ValueError as err:
                raise bad_field(param, str(err)) from None
        return request, tools

    # --- routes ---------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics_text(request: Request) -> Response:
        authorize(request)
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    card = {"id": model_name, "object": "model", "created": 0, "owned_by": "nabla-lc"}

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        authorize(request)
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> Response:
        authorize(request)
        check_model(model_id)
        return JSONResponse(card)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _serve(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _serve(request, "text")

    async def _serve(http: Request, kind: Literal["chat", "text"]) -> Response:
        endpoint = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        try:
            authorize(http)
            body = await body_of(http)
            if kind == "chat":
                chat = parse(ChatCompletionRequest, body, settings.strict_params)
                assert isinstance(chat, ChatCompletionRequest)
                check_model(chat.model)
                budget, stop, choice = check_budget(chat.budget()), chat.stop_strings(), chat.choice()
                request, tools = await anyio.to_thread.run_sync(chat_request, chat, budget, stop, choice)
                requests, params = [request], ["messages"]
                parsed: ChatCompletionRequest | CompletionRequest = chat
            else:
                text = parse(CompletionRequest, body, settings.strict_params)
                assert isinstance(text, CompletionRequest)
                check_model(text.model)
                budget, stop, prompts, tools = check_budget(text.budget()), text.stop_strings(), text.prompts(settings.max_prompts), []
                requests = await anyio.to_thread.run_sync(lambda: [
                    engine_request(functools.partial(engine.request, prompt, chat=False, seed=text.seed, max_new_tokens=budget, stop=stop), param)
                    for prompt, param in prompts
                ])  # fmt: skip
                params = [param for _, param in prompts]
                parsed = text
            config = parsed.config(engine.config)
            if "n" in (parsed.nabla or {}) and config.n > settings.max_n:  # the server's own default n is the operator's
                raise bad_field("nabla.n", f"is {config.n}; this server's cap is {settings.max_n}")
            groups = [_choice_requests(request, parsed, config, settings.max_choices) for request in requests]
            choices, per_prompt = [choice for group in groups for choice in group], len(groups[0])
            ignored = _ignored(parsed, config)
            admission = admit()
        except Exception as err:
            raise _failed(err, endpoint) from None
        if len(choices) > 1 and not parsed.stream:  # each prompt's choices are decoded as one batch of engine requests, all at once
            decoded = _decoded(groups, params if len(groups) > 1 else [None], config)
            results = await _answered(_watched(_limited(decoded, admission), http), admission, endpoint, per_prompt)
            return JSONResponse(_response(kind, results, choices, admission, config, tools, ignored, per_prompt))
        streams = [_guarded(engine.astream(choice, config), admission) for choice in choices]  # a stream has one prompt
        events: AsyncIterator[Any] = _indexed(streams) if parsed.stream else streams[0]
        try:
            first = await _first(events, http)
        except BaseException as err:
            state["in_flight"] -= 1
            raise _failed(err, endpoint) from None
        if parsed.stream:
            usage_chunk = parsed.stream_options is not None and parsed.stream_options.include_usage
            seeds = [choice.seed for choice in choices]
            held = bool(tools) or parsed.top_logprobs_asked() is not None  # why: a reply's tool calls and logprobs are read at its end
            sse = _sse(kind, first, events, admission, config, endpoint, usage_chunk, tools, seeds, ignored, held)
            return StreamingResponse(sse, media_type="text/event-stream")

        async def only() -> list[Result]:
            return [first.result if isinstance(first, Finished) else await _until_finished(events, http)]

        results = await _answered(only(), admission, endpoint, 1)
        return JSONResponse(_response(kind, results, choices, admission, config, tools, ignored, 1))

    async def _answered(work: Awaitable[list[Result]], admission: _Admission, endpoint: str, per_prompt: int) -> list[Result]:
        """The results of an admitted request that is not streamed (``per_prompt`` choices of each prompt in turn);
        its status is counted and its place freed."""
        try:
            results = await work
        except BaseException as err:
            raise _failed(err, endpoint) from None
        finally:
            state["in_flight"] -= 1
        _record(results, admission, per_prompt)
        metrics.request(endpoint, 200)
        return results

    def _failed(err: BaseException, endpoint: str) -> BaseException:
        """What a request that raised ``err`` raises, its status counted: an exception as :func:`_contained` answers
        it, anything else (a cancellation) as it is."""
        failure = _contained(err) if isinstance(err, Exception) else err
        metrics.request(endpoint, _status(failure))
        return failure

    # --- decoding -------------------------------------------------------------------------
    async def _decoded(groups: list[list[EngineRequest]], params: list[str | None], config: NablaConfig) -> list[Result]:
        """The results of every prompt's choices, in order: each prompt's choices are one engine call, all started at
        once (the scheduler batches them). An input error of the engine names its prompt (``prompt.K``) where a
        param is given; the first failure cancels the other calls."""

        async def one(group: list[EngineRequest], param: str | None) -> list[Result]:
            try:
                return await engine.agenerate(group, config)
            except ValueError as err:
                raise _input_error(err, param) from None

        tasks = [asyncio.ensure_future(one(group, param)) for group, param in zip(groups, params)]
        try:
            return [result for results in await asyncio.gather(*tasks) for result in results]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _limited(work: Awaitable[T], admission: _Admission) -> T:
        """``work`` within the request's time limit (504 past it); the engine's input errors become 400s."""
        deadline = admission.start + settings.request_timeout_s
        try:
            return await asyncio.wait_for(work, max(deadline - time.perf_counter(), 0.0))
        except asyncio.TimeoutError:
            raise APIError(504, f"the request ran past the server's limit of {settings.request_timeout_s:g} s", type="timeout", code="timeout") from None
        except ValueError as err:  # the engine's input checks (a prompt that fills the context, ...)
            raise _input_error(err) from None

    async def _guarded(events: AsyncIterator[StreamEvent], admission: _Admission) -> AsyncIterator[StreamEvent]:
        """``events`` within the time limit; engine input errors become 400s; closing this closes (cancels) the decoding."""
        iterator = events.__aiter__()
        try:
            while True:
                try:
                    event = await _limited(iterator.__anext__(), admission)
                except StopAsyncIteration:
                    return
                if isinstance(event, TextDelta) and not admission.first_text:
                    admission.first_text = True
                    metrics.first_token(time.perf_counter() - admission.start)
                yield event
        finally:
            close = getattr(iterator, "aclose", None)
            if close is not None:
                await close()

    async def _first(events: AsyncIterator[T], http: Request) -> T:
        """The first event (so that input errors are answered as errors, not as a broken stream)."""
        return await _watched(events.__anext__(), http)

    async def _until_finished(events: AsyncIterator[StreamEvent], http: Request) -> Result:
        async def last() -> Result:
            async for event in events:
                if isinstance(event, Finished):
                    return event.result
            raise RuntimeError("the decoding ended without a result")

        return await _watched(last(), http)

    async def _watched(work: Awaitable[T], http: Request) -> T:
        """Await ``work``; if the client disconnects first, cancel it (which cancels its decoding)."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    return task.result()
                if await http.is_disconnected():
                    raise _ClientGone()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _indexed(streams: list[AsyncIterator[StreamEvent]]) -> AsyncIterator[tuple[int, StreamEvent]]:
        """Every choice's events as they come, each with its choice's index; closing this closes (cancels) them all."""
        pending = {asyncio.ensure_future(stream.__anext__()): i for i, stream in enumerate(streams)}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=pending.__getitem__):
                    i = pending.pop(task)
                    try:
                        event = task.result()
                    except StopAsyncIteration:
                        continue
                    yield i, event
                    pending[asyncio.ensure_future(streams[i].__anext__())] = i
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for stream in streams:
                await stream.aclose()  # type: ignore[attr-defined]

    async def _sse(
        kind: Literal["chat", "text"], first: tuple[int, StreamEvent], events: AsyncIterator[tuple[int, StreamEvent]], admission: _Admission,
        config: NablaConfig, endpoint: str, usage_chunk: bool, tools: list[dict[str, Any]], seeds: list[int | None], ignored: dict[str, str],
        held: bool,
    ) -> AsyncIterator[str]:
        """The response as server-sent events, the choices' chunks interleaved as their text comes; when ``held`` (tools
        or logprobs) a choice's reply is held back and sent whole at its end, where its tool calls and log-probabilities
        are read. Each choice's last chunk carries its own ``nabla`` object; the usage chunk the request's."""
        status = 499
        results: dict[int, Result] = {}
        n = len(seeds)
        try:
            if kind == "chat":
                for index in range(n):
                    yield _data(_chunk(kind, admission, {"role": "assistant", "content": ""}, None, usage_chunk, index))
            index, event = first
            while True:
                if isinstance(event, TextDelta):
                    if not held:
                        yield _data(_chunk(kind, admission, event.text, None, usage_chunk, index))
                else:
                    result = results[index] = event.result
                    finish: str = result.finish_reason
                    if held and kind == "text":
                        yield _data(_chunk(kind, admission, result.text, None, usage_chunk, index, _text_logprobs(result)))
                    elif held:
                        message = _message(result, tools)
                        if message["content"]:
                            content = {"content": message["content"]}
                            yield _data(_chunk(kind, admission, content, None, usage_chunk, index, _chat_logprobs(result)))
                        if "tool_calls" in message:
                            calls = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
                            yield _data(_chunk(kind, admission, {"tool_calls": calls}, None, usage_chunk, index))
                            finish = "tool_calls"
                    last = _chunk(kind, admission, "", finish, usage_chunk, index)
                    last["nabla"] = _nabla([result], [seeds[index]], config, ignored)
                    yield _data(last)
                    if len(results) == n:
                        ordered = [results[i] for i in range(n)]
                        if usage_chunk:
                            nabla = _nabla(ordered, seeds, config, ignored)
                            yield _data({**_chunk(kind, admission, None, None, False), "choices": [], "usage": _usage(ordered, n), "nabla": nabla})
                        yield "data: [DONE]\n\n"
                        _record(ordered, admission, n)
                        status = 200
                        return
                index, event = await events.__anext__()
        except Exception as err:  # headers are sent: the error goes into the stream, as OpenAI does, and the stream ends
            if not isinstance(err, APIError):  # why: an unexpected failure mid-stream still ends with an error, never a cut
                log.exception("a streamed request failed")
                err = APIError(500, "internal server error", type="server_error")
            status = err.status
            yield _data(err.body())
            yield "data: [DONE]\n\n"
        finally:
            state["in_flight"] -= 1
            metrics.request(endpoint, status)
            with anyio.CancelScope(shield=True):  # why: a disconnect cancels this task; closing must still cancel the decoding
                await events.aclose()  # type: ignore[attr-defined]

    def _record(results: list[Result], admission: _Admission, per_prompt: int) -> None:
        """One finished request in the metrics: its usage (each prompt once), every choice's model calls, its latency."""
        usage = _usage(results, per_prompt)
        calls = sum(r.stats.model_calls for r in results)
        metrics.finished(usage["prompt_tokens"], usage["completion_tokens"], calls, time.perf_counter() - admission.start)

    def _chunk(
        kind: Literal["chat", "text"], admission: _Admission, text: "str | dict[str, Any] | None", finish: str | None, usage_field: bool,
        index: int = 0, logprobs: dict[str, object] | None = None,
    ) -> dict[str, object]:
        if kind == "chat":
            delta = text if isinstance(text, dict) else ({"content": text} if text else {})
            choice: dict[str, object] = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            head = {"id": f"chatcmpl-{admission.id}", "object": "chat.completion.chunk"}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
            head = {"id": f"cmpl-{admission.id}", "object": "text_completion"}
        chunk: dict[str, object] = {**head, "created": admission.created, "model": model_name, "choices": [choice]}
        if usage_field:
            chunk["usage"] = None
        return chunk

    def _response(
        kind: Literal["chat", "text"], results: list[Result], requests: list[EngineRequest], admission: _Admission, config: NablaConfig,
        tools: list[dict[str, Any]], ignored: dict[str, str], per_prompt: int,
    ) -> dict[str, object]:
        """The response's body; ``results`` are the choices of each prompt in turn, ``per_prompt`` of each."""
        choices: list[dict[str, object]] = []
        for index, result in enumerate(results):
            if kind == "chat":
                message = _message(result, tools)
                finish = "tool_calls" if "tool_calls" in message else result.finish_reason
                choices.append({"index": index, "message": message, "logprobs": _chat_logprobs(result), "finish_reason": finish})
            else:
                choices.append({"index": index, "text": result.text, "logprobs": _text_logprobs(result), "finish_reason": result.finish_reason})
        head = {"id": f"chatcmpl-{admission.id}", "object": "chat.completion"} if kind == "chat" else {"id": f"cmpl-{admission.id}", "object": "text_completion"}
        nabla = _nabla(results, [r.seed for r in requests], config, ignored)
        return {**head, "created": admission.created, "model": model_name, "choices": choices, "usage": _usage(results, per_prompt), "nabla": nabla}

    return app


def _contained(err: Exception) -> Exception:
    """What a request that failed with ``err`` is answered with: an :class:`APIError` or the client's departure as it
    is, anything else logged and made a 500 (why: an exception that reaches the ASGI layer closes the connection)."""
    if isinstance(err, (APIError, _ClientGone)):
        return err
    if isinstance(err, ClientDisconnect):
        return _ClientGone()
    log.error("internal error", exc_info=err)
    return APIError(500, "internal server error", type="server_error")


def _input_error(err: ValueError, param: str | None = None) -> APIError:
    """The 400 of an engine input error, naming ``param`` where given (a config error is the whole request's)."""
    if param is None or isinstance(err, ConfigError):
        return APIError(400, str(err), code="invalid_value")
    return bad_field(param, str(err))


def _status(err: BaseException) -> int:
    """The status a request that failed with ``err`` is counted under (499: the client went away)."""
    if isinstance(err, APIError):
        return err.status
    return 499 if isinstance(err, (_ClientGone, asyncio.CancelledError)) else 500


def _message(result: Result, tools: list[dict[str, Any]]) -> dict[str, Any]:
    """The assistant message of a chat response: with tools, the reply's tool calls in OpenAI's shape (and the text
    around them as content); a reply without a valid call is all content."""
    if not tools:
        return {"role": "assistant", "content": result.text}
    reply = parse_tool_calls(result.text, tools)
    if not reply.calls:
        return {"role": "assistant", "content": result.text}
    calls = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": json.dumps(c.arguments)}} for c in reply.calls]
    return {"role": "assistant", "content": reply.content or None, "tool_calls": calls}


def fresh_seed() -> int:
    """The seed of a request that sends none: drawn afresh from the OS's randomness, so that identical requests
    sample independently (as OpenAI and vLLM do); the response reports it (``nabla.seed``) to reproduce it."""
    return secrets.randbits(31)


def _choice_requests(request: EngineRequest, parsed: ChatCompletionRequest | CompletionRequest, config: NablaConfig, cap: int) -> list[EngineRequest]:
    """The engine request of each choice: choice i is the request sent alone with seed ``seed + i`` (the request's
    seed, else a fresh one), with the log-probabilities it asked for."""
    n = parsed.choices()
    if n > cap:
        raise bad_field("n", f"is {n}; this server's cap is {cap}")
    logprobs = parsed.top_logprobs_asked()
    if logprobs is not None:
        try:
            check_logprobs(config.method)
        except ConfigError as err:
            raise bad_field("logprobs", str(err)) from None
    seed = parsed.seed if parsed.seed is not None else fresh_seed()
    return [dataclasses.replace(request, seed=seed + i, logprobs=logprobs) for i in range(n)]


def _ignored(parsed: ChatCompletionRequest | CompletionRequest, config: NablaConfig) -> dict[str, str]:
    """The fields the request sent that had no effect, each with why: unknown fields, and sampling fields the method
    does not use as sent (``NablaConfig.without_effect``: temperature or top_p under greedy)."""
    sent = {name for name in ("temperature", "top_p") if getattr(parsed, name) is not None}
    unused = config.without_effect()
    ignored = {name: reason for name, reason in unused.items() if name in sent}
    ignored.update({f"nabla.{name}": reason for name, reason in unused.items() if name in (parsed.nabla or {})})
    ignored.update(dict.fromkeys(parsed.unknown_fields(), "unknown field"))
    return ignored


def _chat_logprobs(result: Result) -> dict[str, object] | None:
    """OpenAI's ``choices[i].logprobs`` of a chat completion (None when the request asked for none)."""
    if result.logprobs is None:
        return None

    def entry(token: TokenLogprob) -> dict[str, object]:
        return {"token": token.text, "logprob": token.logprob, "bytes": list(token.text.encode())}

    return {"content": [{**entry(p.chosen), "top_logprobs": [entry(t) for t in p.top]} for p in result.logprobs], "refusal": None}


def _text_logprobs(result: Result) -> dict[str, object] | None:
    """OpenAI's ``choices[i].logprobs`` of a text completion (offsets within the completion; None when not asked)."""
    if result.logprobs is None:
        return None
    texts = [p.chosen.text for p in result.logprobs]
    offsets = [sum(len(t) for t in texts[:i]) for i in range(len(texts))]
    return {
        "tokens": texts,
        "token_logprobs": [p.chosen.logprob for p in result.logprobs],
        "top_logprobs": [{t.text: t.logprob for t in p.top} for p in result.logprobs],
        "text_offset": offsets,
    }


def _usage(results: list[Result], per_prompt: int) -> dict[str, int]:
    """OpenAI's usage: each prompt counted once (``results`` hold ``per_prompt`` choices of each prompt in turn), the
    completion tokens of every choice."""
    prompt, completion = sum(r.stats.prompt_tokens for r in results[::per_prompt]), sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _nabla(results: list[Result], seeds: list[int | None], config: NablaConfig, ignored: dict[str, str]) -> dict[str, object]:
    """The ∇ extension of a response: the method, ``n`` and temperature it ran with (greedy: 1 and 0, whatever was
    asked), the seed (of choice 0; prompt k's choice j used seed_k + j, seed_k the request's seed or one drawn for
    prompt k), the reward and extracted answer (of choice 0), the
    statistics (summed over the choices), the fields that had no effect, and with several choices each one's
    seed, reward and answer."""
    stats = Stats()
    for result in results:
        stats.add(result.stats)
    stats.wall_s = max(r.stats.wall_s for r in results)
    ran = config.ran()
    out: dict[str, object] = {
        "method": ran.method, "n": ran.n, "temperature": ran.temperature, "seed": seeds[0], "reward": _finite(results[0].reward),
        "answer": results[0].answer, "stats": {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in stats.to_dict().items()},
        "ignored": ignored,
    }
    if len(results) > 1:
        out["choices"] = [{"index": i, "seed": seed, "reward": _finite(r.reward), "answer": r.answer} for i, (r, seed) in enumerate(zip(results, seeds))]
    return out


def _finite(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


def _data(payload: dict[str, object]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


@contextmanager
def serving(app: FastAPI, host: str = "127.0.0.1", start_timeout_s: float = 60.0) -> Iterator[str]:
    """Run ``app`` with uvicorn in a thread on a free port of ``host`` while the block runs; yields the base URL
    (``http://HOST:PORT/v1``). For tests and benchmarks; ``nabla-lc serve`` runs uvicorn in the foreground."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="nabla-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    try:
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        yield f"http://{host}:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
