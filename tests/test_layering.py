"""The package's imports point one way: down the layers below (README, "Architecture"), including imports inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"nabla_lc": ROOT / "nabla_lc", "nabla_lc.integrations": ROOT / "integrations"}
"""Package name -> directory (``integrations/`` is installed as ``nabla_lc.integrations``)."""

LAYERS: tuple[tuple[str, ...], ...] = (
    ("nabla_lc.numerics", "nabla_lc.tensors", "nabla_lc.kv", "nabla_lc.answers", "nabla_lc.methods", "nabla_lc.config"),
    ("nabla_lc.models", "nabla_lc.rewards"),
    ("nabla_lc.engine",),
    ("nabla_lc.strategies",),
    ("nabla_lc.scheduler", "nabla_lc.facade", "nabla_lc.loading", "nabla_lc"),
    ("nabla_lc.frontend", "nabla_lc.tool_calls", "nabla_lc.langchain", "nabla_lc.integrations", "nabla_lc.trace_view"),
    ("nabla_lc.bench", "nabla_lc.diagnose", "nabla_lc.server", "nabla_lc.cluster", "nabla_lc.cli"),
)
"""Bottom to top: a module may import its own layer and the layers below."""

FORBIDDEN: tuple[tuple[str, str], ...] = (("nabla_lc.integrations.dspy", "nabla_lc.langchain"),)
"""Pairs within a layer that must not import each other: DSPy sits beside LangChain, not on it."""

LAZY_EXPORTS: tuple[tuple[str, str], ...] = (("nabla_lc", "nabla_lc.langchain"),)
"""Upward imports allowed as lazy package attributes (PEP 562 ``__getattr__``): ``from nabla_lc import
ChatNablaReasoner`` works, and :func:`test_importing_the_package_does_not_import_langchain` checks they stay lazy."""


def layer_of(name: str) -> int | None:
    """The layer of a module (or of a name inside one), by the longest matching prefix; None when no layer holds it.

    The package itself (``nabla_lc``, the public names) matches only exactly, so every module must be listed.
    """
    best: tuple[int, int] | None = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            inside = name.startswith(prefix + ".") and prefix != "nabla_lc"
            if (name == prefix or inside) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index)
    return best[1] if best is not None else None


def modules() -> dict[str, Path]:
    """Every module of the package, by its import name."""
    found = {}
    for package, directory in SOURCES.items():
        for path in directory.rglob("*.py"):
            parts = list(path.relative_to(directory).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imported(module: str, source: str, is_package: bool) -> list[tuple[int, list[str]]]:
    """Per import statement anywhere in ``source`` (functions included): its line and the package names it imports.

    ``from m import x`` names both ``m`` and ``m.x`` (x may be a submodule); where every x is a module of the package,
    only the ``m.x`` (``from .. import kv`` imports what ``from ..kv import Snapshot`` does).
    """
    package = module if is_package else module.rpartition(".")[0]
    known = set(modules())
    statements: list[tuple[int, list[str]]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                origin = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            subs = [f"{origin}.{alias.name}" for alias in node.names]
            names = subs if set(subs) <= known else [origin] + subs
        else:
            continue
        ours = [name for name in names if name == "nabla_lc" or name.startswith("nabla_lc.")]
        if ours:
            statements.append((node.lineno, ours))
    return statements


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    """Import statements of ``module`` that point up the layers, or across a forbidden pair."""
    own = layer_of(module)
    assert own is not None, f"{module} belongs to no layer; add it to LAYERS"
    out = []
    for line, names in imported(module, source, is_package):
        if any(module == lower and all(n == upper or n.startswith(upper + ".") for n in names[1:] or names) for lower, upper in LAZY_EXPORTS):
            continue
        top = max(names, key=lambda name: layer_of(name) or 0)
        if (layer_of(top) or 0) > own:
            out.append(f"{module}:{line} imports {top} (layer {layer_of(top)} above {own})")
        elif any(module.startswith(lower) and any(n == upper or n.startswith(upper + ".") for n in names) for lower, upper in FORBIDDEN):
            out.append(f"{module}:{line} imports {names[0]}, which it must not")
    return out


def test_no_module_imports_up_the_layers() -> None:
    found = modules()
    assert {"nabla_lc.engine.decoder", "nabla_lc.strategies.nabla", "nabla_lc.integrations.dspy"} <= set(found)
    problems = [v for name, path in sorted(found.items()) for v in violations(name, path.read_text(), path.name == "__init__.py")]
    assert problems == []


@pytest.mark.parametrize(
    "module,source",
    [
        ("nabla_lc.engine.core", "def f():\n    from ..strategies import draw\n"),
        ("nabla_lc.rewards.lora", "import nabla_lc.bench.runner\n"),
        ("nabla_lc.engine", "from . import decoder\nfrom ..cli import main\n"),
        ("nabla_lc.integrations.dspy", "from nabla_lc.langchain import NablaReasonerLLM\n"),
        ("nabla_lc.config", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .engine.types import Result\n"),
    ],
)
def test_the_check_sees_upward_imports_anywhere(module: str, source: str) -> None:
    assert len(violations(module, source, is_package=module == "nabla_lc.engine")) == 1


def test_the_check_allows_downward_and_sibling_imports() -> None:
    source = "from ..engine.context import DecodingContext\nfrom . import sampling\nfrom ..methods import MethodSpec\n"
    assert violations("nabla_lc.strategies.bon", source) == []
    assert violations("nabla_lc.engine.dto", "from .. import kv\n") == []  # a low module from the package: itself
    assert len(violations("nabla_lc.engine.dto", "from .. import kv, facade\n")) == 1
    assert len(violations("nabla_lc.engine.dto", "from .. import Engine\n")) == 1  # a name of the package's own


def test_importing_the_package_does_not_import_langchain() -> None:
    import subprocess
    import sys

    code = "import sys, nabla_lc; assert not [m for m in sys.modules if m.startswith('langchain')]; nabla_lc.ChatNablaReasoner; assert 'langchain_core' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
