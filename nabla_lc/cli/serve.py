"""``nabla-lc serve``: the OpenAI-compatible server (``/v1/chat/completions``, ``/v1/completions``) over one engine,
or over K engines as Ray Serve replicas (``--ray --replicas K``)."""

from __future__ import annotations

import argparse
import functools
import ipaddress
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .flags import add_config_flags, add_model_flags, config_from_args, load_engine

if TYPE_CHECKING:
    from ..facade import Engine
    from ..server import ServerSettings

log = logging.getLogger(__name__)

API_KEY_ENV = "NABLA_LC_API_KEY"
"""The environment variable holding the API key when ``--api-key-file`` is not given."""


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve the engine over OpenAI-compatible endpoints (needs the 'serve' extra)",
        description=__doc__ + " Requests choose the method and any NablaConfig field in the body's 'nabla' object; "
        "the flags set the defaults. An API key is required unless --no-auth (loopback addresses only).",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-file", type=Path, default=None, help=f"file holding the API key (default: the {API_KEY_ENV} environment variable)")
    p.add_argument("--no-auth", action="store_true", help="accept requests without a key (only with a loopback --host)")
    p.add_argument("--served-model-name", default=None, help=(
        "the model name /v1/models lists and clients send (default: the policy's short name: a hub id as given, "
        "a local model by its directory's name, the embedded one as smollm2-135m-instruct; never a path)"))
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (413 above)")
    p.add_argument("--max-tokens-cap", type=int, default=1024, help="largest max_tokens a request may ask for (400 above)")
    p.add_argument("--max-n", type=int, default=16, help="largest nabla.n (samples, N_max, particles) a request may ask for (400 above)")
    p.add_argument("--max-prompts", type=int, default=32, help="largest list of prompts one /v1/completions request may send (400 above)")
    p.add_argument("--max-choices", type=int, default=8, help="largest OpenAI n (choices per request) a request may ask for (400 above)")
    p.add_argument("--strict-params", action="store_true", help="refuse unknown request fields with a 400 (default: log a warning and ignore them)")
    p.add_argument("--max-queue", type=int, default=64, help="requests admitted at once; one more gets 429 with Retry-After")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds one request may take")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="TOKENS",
                   help="encode a prompt longer than this many tokens a chunk a step, between the other requests' tokens, "
                   "so that one long prompt does not stall them (default: at once)")
    ray = p.add_argument_group("Ray Serve (pip install 'nabla-lc[ray]')")
    ray.add_argument("--ray", action="store_true", help="serve from Ray Serve replicas, each with its own engine, behind Ray's HTTP proxy on --host:--port")
    ray.add_argument("--replicas", type=int, help="replicas (default: one per GPU in the cluster, else one per CPU); the minimum with --max-replicas")
    ray.add_argument("--max-replicas", type=int, help="autoscale between --replicas and this many, aiming at 2 requests in progress per replica")
    ray.add_argument("--address", help="the Ray cluster to join ('auto': the one `ray start` runs on this machine; default: start a local one)")
    add_model_flags(p)
    add_config_flags(p, exclude=frozenset({"seed"}))  # why: a request's seed is its own, else a fresh one (server.md, "Sampling semantics")
    p.set_defaults(func=run)


def api_key(args: argparse.Namespace) -> str | None:
    """The key requests must send, or None with --no-auth; a missing key, --no-auth off loopback, or --no-auth with
    --api-key-file raises ValueError."""
    if args.no_auth:
        if not is_loopback(args.host):
            raise ValueError(f"--no-auth is only allowed with a loopback --host (got {args.host!r})")
        if args.api_key_file is not None:
            raise ValueError("--no-auth and --api-key-file contradict each other; pass one")
        return None
    if args.api_key_file is not None:
        key = args.api_key_file.read_text().strip()
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file} is empty")
        return key
    key = os.environ.get(API_KEY_ENV, "").strip()
    if not key:
        raise ValueError(f"no API key: pass --api-key-file, set {API_KEY_ENV}, or use --no-auth on a loopback address")
    return key


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..server import ServerSettings, create_app
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"{err}; nabla-lc serve needs the 'serve' extra: pip install 'nabla-lc[serve]'") from None
    from pydantic import ValidationError

    key = api_key(args)  # why: before loading any model
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise ValueError(f"--prefill-chunk is {args.prefill_chunk}: it must be at least 1 token")
    try:
        settings = ServerSettings(
            api_key=key, model_name=args.served_model_name, max_body_bytes=args.max_body_bytes, max_tokens_cap=args.max_tokens_cap, max_n=args.max_n,
            max_prompts=args.max_prompts, max_choices=args.max_choices, strict_params=args.strict_params, max_queue=args.max_queue, request_timeout_s=args.request_timeout,
        )
    except ValidationError as err:  # why: pydantic's message spans lines and names the field, not the flag
        first = err.errors()[0]
        field = str(first["loc"][0])
        flag = {"request_timeout_s": "--request-timeout", "model_name": "--served-model-name"}.get(field, "--" + field.replace("_", "-"))
        raise ValueError(f"{flag} is {first['input']!r}: {first['msg'][0].lower()}{first['msg'][1:]}") from None
    if args.ray:
        return serve_on_ray(args, settings)
    if args.replicas is not None or args.max_replicas is not None or args.address is not None:
        raise ValueError("--replicas, --max-replicas and --address need --ray")
    engine = serving_engine(args)
    app = create_app(engine, settings)
    log.warning("serving %s on http://%s:%d/v1 (auth %s)", args.policy, args.host, args.port, "off" if key is None else "on")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def serving_engine(args: argparse.Namespace) -> Engine:
    """The engine the model and decoding flags name, prefilling long prompts in chunks as ``--prefill-chunk`` says."""
    engine = load_engine(args, config_from_args(args))
    engine.scheduler.prefill_chunk = args.prefill_chunk
    return engine


def serve_on_ray(args: argparse.Namespace, settings: ServerSettings) -> int:
    """``serve --ray``: the app on Ray Serve replicas, each loading the engine the model flags name."""
    try:
        from ..cluster import joined, worker_shape
        from ..server.ray_serve import application, serve_forever
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"{err}; nabla-lc serve --ray needs the 'ray' extra: pip install 'nabla-lc[ray]'") from None
    factory = functools.partial(serving_engine, args)
    with joined(args.address) as resources:
        shape = worker_shape(resources, args.replicas, flag="--replicas")
        app = application(factory, settings, shape, max_replicas=args.max_replicas)
        log.warning("Ray Serve: %d replica(s) of %s, each %d CPU(s) / thread(s) and %g GPU(s)", shape.count, args.policy, shape.cpus, shape.gpus)
        serve_forever(app, args.host, args.port)
    return 0
