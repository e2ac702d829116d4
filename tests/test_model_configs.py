"""The shipped per-model defaults of the paper's models (Llama-3-8B, Qwen2.5-7B, GPT-2 XL, GPT-J 6B).

Each model is built from its real sizes on the ``meta`` device (no weights are allocated), so the checks
run against the actual module tree: the config file matches the model's Hugging Face config, every
method's defaults build a valid editor config, the edited layers exist, the module path written in the file
is the one :mod:`rlsedit.models.arch` edits and its ``d_k`` is the one the memory figures of
docs/LARGE_MODELS.md are computed from, and ``mu`` is ``sqrt(mom2_update_weight)`` of the papers.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rlsedit.configs import find_model_config, model_defaults
from rlsedit.editors.base import build_config, editor_class
from rlsedit.models.arch import get_module, kv_dims, mlp_out_name, num_layers

#: file -> (model_type, config sizes, d_k, d_v, edited layers, mom2_update_weight of the papers)
MODELS: dict[str, tuple[str, dict[str, Any], int, int, list[int], float]] = {
    "llama-3-8b.json": (
        "llama",
        {
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 128256,
        },
        14336,
        4096,
        [4, 5, 6, 7, 8],
        15000.0,
    ),
    "qwen2.5-7b.json": (
        "qwen2",
        {
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152064,
        },
        18944,
        3584,
        [7, 8, 9, 10, 11],  # the RLSEdit release's Qwen2.5-7B files (AlphaEdit's, RLSEdit's)
        15000.0,
    ),
    "gpt2-xl.json": (
        "gpt2",
        {"n_embd": 1600, "n_layer": 48, "n_head": 25, "vocab_size": 50257},
        6400,
        1600,
        [13, 14, 15, 16, 17],
        20000.0,
    ),
    "gpt-j-6b.json": (
        "gptj",
        {"n_embd": 4096, "n_layer": 28, "n_head": 16, "rotary_dim": 64, "vocab_size": 50400},
        16384,
        4096,
        [3, 4, 5, 6, 7, 8],
        15000.0,
    ),
}
METHODS = ["rlsedit", "memit", "alphaedit", "rome", "ft"]


@functools.cache
def meta_model(file: str) -> torch.nn.Module:
    """The model of ``file`` at full size on the meta device (structure only)."""
    model_type, sizes = MODELS[file][0], MODELS[file][1]
    config = AutoConfig.for_model(model_type, **sizes)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("file", list(MODELS))
def test_config_file_matches_the_model(file: str) -> None:
    model = meta_model(file)
    found = find_model_config(model)
    assert found is not None and found[0] == file
    data = found[1]
    assert "papers" in data["description"] and "NOT tuned here" in data["description"]
    _, _, d_k, d_v, layers, weight = MODELS[file]
    common = data["methods"]["common"]
    assert common["layers"] == layers
    for layer in layers:
        name = mlp_out_name(model, layer)
        assert name == data["module_path"].format(layer)
        assert kv_dims(get_module(model, name)) == (d_k, d_v)
    mu = math.sqrt(weight)
    for method in ("rlsedit", "memit"):
        assert data["methods"][method]["mu"] == pytest.approx(mu, abs=0.01)
    assert data["methods"]["rlsedit"]["lam"] <= 1.0  # small next to mu^2 Sigma


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("file", list(MODELS))
def test_defaults_build_valid_editor_configs(file: str, method: str) -> None:
    model = meta_model(file)
    cfg = build_config(editor_class(method).config_class, model_defaults(model, method), {})
    n = num_layers(model)
    assert all(0 <= layer < n for layer in cfg.layers)
    if method in ("rome", "ft"):
        assert len(cfg.layers) == 1
    else:
        assert list(cfg.layers) == MODELS[file][4]
    assert cfg.stats_samples <= 10033  # the bundled corpus's size


def test_smollm2_is_not_matched_by_the_large_configs() -> None:
    config = AutoConfig.for_model(
        "llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    found = find_model_config(model)
    assert found is not None and found[0] == "smollm2-135m.json"


def test_memory_table_in_docs() -> None:
    """The per-layer sizes of ``C_t`` in docs/LARGE_MODELS.md are ``d_k^2`` x 4 / 8 bytes."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "LARGE_MODELS.md").read_text(encoding="utf-8")
    for _, _, d_k, _, _, _ in MODELS.values():
        f32, f64 = d_k * d_k * 4 / 1e9, d_k * d_k * 8 / 1e9
        assert f"| {d_k:,} | {f32:.2f} GB | {f64:.2f} GB |" in text, d_k
