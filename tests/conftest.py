"""Shared fixtures: tiny models built in-process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest
import torch

from nabla_lc import Engine, models

from .tiny import make_engine, make_tokenizer

torch.set_num_threads(1)  # why: tiny models gain nothing from threads, and oversubscribed cores lose a lot

# --- the fast subset: `pytest -m "not real_model"` never loads the embedded SmolLM2 -------------------------------

_running: pytest.Item | None = None
"""The test being set up, run or torn down (its fixtures included)."""
_find_embedded_gguf = models.find_embedded_gguf


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    global _running
    _running = item
    try:
        return (yield)
    finally:
        _running = None


def find_embedded_gguf_for_marked_tests() -> Path:
    """``models.find_embedded_gguf`` while the suite runs: the installed GGUF, found for a test (or its fixtures)
    not marked ``real_model``, fails that test, naming the marker. Every way to the embedded model (load_embedded,
    load_policy("embedded"), ``ChatNablaReasoner.embedded``, the CLI's default policy) passes through it, so the
    marker stays complete and ``-m "not real_model"`` stays fast. Tests that stand a stub in for it are unaffected."""
    path = _find_embedded_gguf()
    if _running is not None and _running.get_closest_marker("real_model") is None:
        pytest.fail(f"{_running.nodeid} loads the embedded SmolLM2 ({path.name}): mark it @pytest.mark.real_model")
    return path


models.find_embedded_gguf = find_embedded_gguf_for_marked_tests


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_engine(tokenizer) -> Engine:
    """A tiny llama policy with a tiny sequence-classifier reward over the same vocabulary; short responses."""
    return make_engine(tokenizer)


@pytest.fixture(scope="session")
def ray_cluster():
    """The resources of a local Ray cluster shared by the Ray tests: 2 CPUs, no GPU, no dashboard, a small object store.

    Started on first use and shut down at the end of the session (Ray starts slowly on busy cores, so once).
    """
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'nabla-lc[ray]')")
    from nabla_lc.cluster import joined

    # why: Ray Serve kills a proxy that does not answer its readiness check within 5 s (health check: 10 s); on busy
    # cores it then failed serve.start with ActorDiedError. The cluster's processes inherit these from this one.
    for name in ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"):
        os.environ.setdefault(name, "120")
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=80 * 1024**2)
    try:
        with joined() as resources:  # joins the cluster above, as the CLI would, and leaves it running
            yield resources
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def wide_engine(tokenizer) -> Engine:
    """The tiny llama policy with a 2048-token context, for prompts of character tokens that outgrow 512 (tool prompts, DSPy's)."""
    engine = make_engine(tokenizer)
    engine.policy.max_length = 2048  # why: rotary positions have no table; only the engine's context check reads the length
    return engine
