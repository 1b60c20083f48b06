"""Joining a Ray cluster and sizing the workers that hold engines, for ``bench --ray`` and ``serve --ray``.

Needs the ``ray`` extra (``pip install 'nabla-lc[ray]'``).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator

import ray

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerShape:
    """How many engine-holding workers (bench actors, serve replicas), and what each one reserves."""

    count: int
    cpus: int
    """CPUs reserved per worker, also its torch thread count."""
    gpus: float
    """GPUs reserved per worker (0 on a CPU-only cluster)."""


def worker_shape(resources: dict[str, float], workers: int | None = None, *, flag: str = "--workers") -> WorkerShape:
    """One worker per GPU where the cluster has GPUs, else one per CPU; ``workers`` overrides the count.

    CPU workers split the cluster's CPUs evenly (at least one each). More workers than CPUs (or, with GPUs,
    than GPUs) is refused, because the extra workers could never be placed. ``flag`` names the count in errors.
    """
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    if workers is not None and workers < 1:
        raise ValueError(f"{flag} must be >= 1, got {workers}")
    if gpus:
        count = workers or gpus
        if count > gpus:
            raise ValueError(f"{flag} {count} exceeds the cluster's {gpus} GPU(s); use at most one per GPU")
        return WorkerShape(count, 1, 1.0)
    count = workers or cpus
    if count < 1 or count > cpus:
        raise ValueError(f"{flag} {count} exceeds the cluster's {cpus} CPU(s); use at most one per CPU")
    return WorkerShape(count, cpus // count, 0.0)


@contextlib.contextmanager
def joined(address: str | None = None) -> Iterator[dict[str, float]]:
    """Join the Ray cluster at ``address`` (``auto``: the one ``ray start`` runs on this machine; None: a new local
    one), or stay in the one this process already joined; yield its resources. A cluster started here stops at the end."""
    started = not ray.is_initialized()
    if started and address is None:
        ray.init(include_dashboard=False)  # why no dashboard: a throwaway local cluster, and its processes cost CPU
    elif started:
        ray.init(address=address)
    elif address is not None:
        log.warning("this process already joined a Ray cluster; --address %s is not used", address)
    try:
        yield ray.cluster_resources()
    finally:
        if started:
            ray.shutdown()
