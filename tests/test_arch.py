"""The architecture table finds the right modules in a tiny model of every family, and W is oriented right."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from rlsedit.hooks import edit_output, trace
from rlsedit.models.arch import (
    ARCHITECTURES,
    UnsupportedArchitectureError,
    add_delta_kv,
    block_name,
    get_arch,
    get_module,
    kv_dims,
    mlp_out_module,
    mlp_out_name,
    num_layers,
    weight_kv,
)
from tiny_models import ARCH_TYPES, TINY_DIMS, tiny_model

D_K, D_V, LAYERS = TINY_DIMS["intermediate"], TINY_DIMS["hidden"], TINY_DIMS["layers"]


def _forward_minus_bias(module: nn.Module, keys: torch.Tensor) -> torch.Tensor:
    out = module(keys)
    bias = getattr(module, "bias", None)
    return out - bias if bias is not None else out


@pytest.fixture(scope="module", params=ARCH_TYPES)
def arch_model(request: pytest.FixtureRequest):
    """One tiny model per architecture, shared by the read-only tests of this module."""
    model, tokenizer = tiny_model(request.param)
    return model, tokenizer


def test_every_table_entry_has_a_tiny_model() -> None:
    assert set(ARCHITECTURES) <= set(ARCH_TYPES)


def test_modules_found(arch_model) -> None:
    model, tokenizer = arch_model
    spec = get_arch(model)
    blocks = get_module(model, spec.blocks)
    assert isinstance(blocks, nn.ModuleList)
    assert len(blocks) == num_layers(model) == LAYERS == model.config.get_text_config().num_hidden_layers
    for layer in range(LAYERS):
        out = mlp_out_module(model, layer)
        assert isinstance(out, (nn.Linear, Conv1D))
        assert get_module(model, mlp_out_name(model, layer)) is out
        assert out is blocks[layer].get_submodule(spec.mlp_out)
    assert get_module(model, spec.lm_head) is model.get_output_embeddings()
    assert get_module(model, spec.embed) is model.get_input_embeddings()
    assert isinstance(get_module(model, spec.embed), nn.Embedding)
    assert model.get_output_embeddings().out_features == len(tokenizer)


def test_final_norm_feeds_lm_head(arch_model) -> None:
    model, tokenizer = arch_model
    spec = get_arch(model)
    ids = tokenizer("The Eiffel Tower is in Paris", return_tensors="pt").input_ids
    with torch.no_grad(), trace(model, [spec.final_norm, spec.lm_head], capture_input=True) as tr:
        model(ids)
    torch.testing.assert_close(tr[spec.lm_head].input, tr[spec.final_norm].output)
    # ... and the last block's output feeds the final norm
    with torch.no_grad(), trace(model, [block_name(model, -1), spec.final_norm], capture_input=True) as tr:
        model(ids)
    torch.testing.assert_close(tr[spec.final_norm].input, tr[block_name(model, -1)].output)


def test_norm_after_mlp_flag(arch_model) -> None:
    """Adding v to the MLP output moves the block output by exactly v iff no norm follows the MLP."""
    model, tokenizer = arch_model
    layer = 1
    ids = tokenizer("The mother tongue of Danielle Darrieux is", return_tensors="pt").input_ids
    block = block_name(model, layer)
    v = torch.randn(D_V, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with trace(model, [block], stop=True) as tr:
            model(ids)
        base = tr[block].output
        with edit_output(model, mlp_out_name(model, layer), lambda y: y + v), trace(model, [block]) as tr:
            model(ids)
        moved = tr[block].output - base
    linear = torch.allclose(moved, v.expand_as(moved), atol=1e-5, rtol=1e-4)
    assert linear == (not get_arch(model).norm_after_mlp)


def test_block_name_indices(arch_model) -> None:
    model, _ = arch_model
    spec = get_arch(model)
    assert block_name(model, 0) == f"{spec.blocks}.0"
    assert block_name(model, -1) == f"{spec.blocks}.{LAYERS - 1}"
    assert mlp_out_name(model, 2) == f"{spec.blocks}.2.{spec.mlp_out}"
    with pytest.raises(IndexError):
        block_name(model, LAYERS)
    with pytest.raises(IndexError):
        block_name(model, -LAYERS - 1)


def test_weight_kv_shape_and_orientation(arch_model) -> None:
    model, _ = arch_model
    module = mlp_out_module(model, 1)
    w = weight_kv(module)
    assert tuple(w.shape) == (D_K, D_V)
    assert kv_dims(module) == (D_K, D_V)
    keys = torch.randn(5, 3, D_K, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(keys @ w, _forward_minus_bias(module, keys), atol=1e-5, rtol=1e-5)
    assert w.data_ptr() == module.weight.data_ptr()  # a view, not a copy


def test_add_delta_kv_changes_function_by_k_delta() -> None:
    for model_type in ("llama", "gpt2", "phi"):  # Linear without and with bias, Conv1D
        model, _ = tiny_model(model_type)
        module = mlp_out_module(model, 0)
        keys = torch.randn(7, D_K, generator=torch.Generator().manual_seed(2))
        delta = torch.randn(D_K, D_V, generator=torch.Generator().manual_seed(3)) * 0.1
        with torch.no_grad():
            before = module(keys)
            add_delta_kv(module, delta.double())  # converted to the weight's dtype
            after = module(keys)
        torch.testing.assert_close(after - before, keys @ delta, atol=1e-5, rtol=1e-4)
        with pytest.raises(ValueError, match="expected"):
            add_delta_kv(module, delta.T)


@pytest.mark.parametrize("make", [lambda: nn.Linear(6, 4, bias=True), lambda: Conv1D(4, 6)])
def test_orientation_by_module_type(make) -> None:
    torch.manual_seed(0)
    module = make()
    with torch.no_grad():
        module.bias.normal_()
    w = weight_kv(module)
    assert tuple(w.shape) == (6, 4)
    keys = torch.randn(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(keys @ w, _forward_minus_bias(module, keys))
        delta = torch.randn(6, 4)
        before = module(keys)
        add_delta_kv(module, delta)
        torch.testing.assert_close(module(keys) - before, keys @ delta, atol=1e-5, rtol=1e-4)


def test_weight_kv_refuses_other_modules() -> None:
    with pytest.raises(TypeError, match="nn.Linear or transformers' Conv1D"):
        weight_kv(nn.Embedding(3, 4))


def test_unsupported_model_type_lists_supported() -> None:
    model = nn.Module()
    model.config = SimpleNamespace(model_type="bert")
    with pytest.raises(UnsupportedArchitectureError) as info:
        get_arch(model)
    message = str(info.value)
    assert "'bert'" in message
    for name in ARCHITECTURES:
        assert name in message
    assert isinstance(info.value, ValueError)


def test_model_without_config() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="config.model_type"):
        get_arch(nn.Linear(2, 2))


def test_get_module_missing_name() -> None:
    model, _ = tiny_model("llama")
    with pytest.raises(AttributeError, match="model.layers.9"):
        get_module(model, "model.layers.9.mlp")
