"""``nabla-lc serve --ray``: the server's app (:func:`~nabla_lc.server.create_app`) on Ray Serve replicas.

Each replica builds its own engine (so the model files must be on every node that hosts one) and serves the
same app as ``nabla-lc serve``: the same endpoints, API key and limits, each limit per replica (``max_queue``
requests admitted by each one, its own ``/metrics``). Ray Serve's proxy routes each request to the less loaded
of two replicas; every response names its replica in the ``x-nabla-replica`` header.

Needs the ``ray`` extra (``pip install 'nabla-lc[ray]'``: Ray Serve, FastAPI, uvicorn).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import torch
from fastapi import FastAPI
from ray import serve
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..cluster import WorkerShape
from ..frontend import FrontEndEngine
from .app import ServerSettings, create_app

log = logging.getLogger(__name__)

EngineFactory = Callable[[], FrontEndEngine]
"""Builds a replica's engine inside the replica (pickled and sent to each one: a module-level function or a
``functools.partial`` of one)."""
REPLICA_HEADER = "x-nabla-replica"
"""The response header naming the replica that answered (Ray Serve's replica id)."""
DEPLOYMENT = "nabla-lc"
"""The Ray Serve application and deployment name."""


class ReplicaHeader:
    """ASGI middleware: adds ``x-nabla-replica: <id>`` to every HTTP response (streamed ones too)."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


class NablaReplica:
    """One Ray Serve replica: an engine built here and the server's app over it (bound late, once the engine exists)."""

    def __init__(self, factory: EngineFactory, settings: ServerSettings, threads: int) -> None:
        torch.set_num_threads(threads)  # why: one thread per reserved CPU, so replicas on one node do not oversubscribe it
        self.engine = factory()
        self.settings = settings
        self.replica = serve.get_replica_context().replica_id.unique_id

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = create_app(self.engine, self.settings)
        app.add_middleware(ReplicaHeader, replica=self.replica)
        return app


def application(
    factory: EngineFactory, settings: ServerSettings, shape: WorkerShape, *, max_replicas: int | None = None, target_ongoing_requests: float = 2.0
) -> serve.Application:
    """The Serve application: ``shape.count`` replicas of :class:`NablaReplica`, or, with ``max_replicas``, an
    autoscaling deployment between ``shape.count`` and ``max_replicas`` that aims at ``target_ongoing_requests`` per replica.

    A replica accepts ``settings.max_queue`` + 1 requests at once: the one over its queue gets the app's own 429
    (Ray Serve would otherwise hold it in its router's queue without limit).
    """
    if max_replicas is not None and max_replicas < shape.count:
        raise ValueError(f"--max-replicas {max_replicas} is below --replicas {shape.count}")
    scaling = (
        {"num_replicas": shape.count}
        if max_replicas is None
        else {"autoscaling_config": {"min_replicas": shape.count, "max_replicas": max_replicas, "target_ongoing_requests": target_ongoing_requests}}
    )
    deployment = serve.deployment(
        serve.ingress()(NablaReplica),
        name=DEPLOYMENT,
        ray_actor_options={"num_cpus": shape.cpus, "num_gpus": shape.gpus},
        max_ongoing_requests=settings.max_queue + 1,
        **scaling,
    )
    return deployment.bind(factory, settings, shape.cpus)


def deploy(app: serve.Application, host: str, port: int) -> None:
    """Deploy ``app`` behind Ray Serve's HTTP proxy on ``host:port``; return once its replicas are up."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=DEPLOYMENT, route_prefix="/")


def serve_forever(app: serve.Application, host: str, port: int) -> None:
    """:func:`deploy`, then block until interrupted; the application and Serve are removed on the way out."""
    try:
        deploy(app, host, port)
        log.warning("serving on http://%s:%d/v1 through Ray Serve; Ctrl-C stops", host, port)
        threading.Event().wait()
    finally:
        serve.shutdown()
