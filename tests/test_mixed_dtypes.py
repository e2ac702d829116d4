"""Editors follow each edited layer's dtype (and device): a tiny model whose two edited MLP output
projections are in different dtypes (float64 and bfloat16, the rest float32).

Each edited layer must keep its dtype after a batch, the edit must be applied (the new target becomes
likelier), the editor's state must exist per layer on that layer's device, and a saved run must load back
onto a fresh model of the same layout. Only the CPU is available here: placement on several devices
(``device_map="auto"`` over GPUs) follows the same code paths (``layer_device``, ``input_device``) but is
not exercised.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import tiny_models
from rlsedit import EditRequest, load_editor, make_editor
from rlsedit.eval.scoring import target_nll
from rlsedit.models.arch import get_module, input_device, mlp_out_name, model_devices, weight_kv
from rlsedit.models.load import load_model

#: edited layer -> dtype of its MLP output projection (the other parameters stay float32)
DTYPES = {2: torch.float64, 3: torch.bfloat16}
SETTINGS: dict[str, Any] = {
    **tiny_models.STRONG_TARGETS,
    "stats_samples": 12,
    "stats_max_len": 24,
}
METHODS: dict[str, dict[str, Any]] = {
    "rlsedit": {"layers": [2, 3], "lam": 1.0, "mu": 1.0},
    "memit": {"layers": [2, 3], "mu": 1.0},
    "alphaedit": {"layers": [2, 3], "alpha": 1.0, "nullspace_threshold": 0.5, "nullspace_rule": "relative"},
    "rome": {"layers": [3], "lam": 1.0, "mu": 1.0},
    "ft": {"layers": [3], "lr": 0.05, "steps": 30, "norm_constraint": 0.5},
}
#: (prompt ending with the subject, subject, single-token target_new, target_true)
FACTS = [
    ("The mother tongue of {}", "Danielle Darrieux", "language", "city"),
    ("The twin city of {}", "Lyon", "located", "which"),
]


def _cast_io(module: nn.Module, dtype: torch.dtype) -> None:
    """Put ``module``'s parameters in ``dtype``; cast its input to ``dtype`` and its output back to the
    input's dtype (as a mixed-precision model or a model with kept-in-float32 modules does)."""
    module.to(dtype)

    def pre(mod: nn.Module, args: tuple) -> tuple:
        mod._io_dtype = args[0].dtype
        return (args[0].to(dtype), *args[1:])

    def post(mod: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.to(mod._io_dtype)

    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post)


def mixed_model() -> tuple[nn.Module, Any]:
    model, tok = tiny_models.tiny_model("llama", seed=0, initializer_range=0.5)
    for layer, dtype in DTYPES.items():
        _cast_io(get_module(model, mlp_out_name(model, layer)), dtype)
    return model, tok


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "texts.txt"
    path.write_text("\n".join(tiny_models._CORPUS) + "\n", encoding="utf-8")
    return path


def requests() -> list[EditRequest]:
    return [EditRequest(p, s, new, true) for p, s, new, true in FACTS]


def test_the_mixed_model_runs() -> None:
    model, tok = mixed_model()
    assert {p.dtype for p in model.parameters()} == {torch.float32, torch.float64, torch.bfloat16}
    assert input_device(model) == torch.device("cpu") and model_devices(model) == [torch.device("cpu")]
    out = model(**tok(["The mother tongue of Lyon"], return_tensors="pt")).logits
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("method", list(METHODS))
def test_edit_keeps_each_layer_dtype(method: str, corpus: Path, tmp_path: Path) -> None:
    model, tok = mixed_model()
    overrides = {**SETTINGS, **METHODS[method], "stats_corpus": str(corpus)}
    editor = make_editor(method, model, tok, stats_dir=tmp_path / "stats", **overrides)
    layers = list(editor.config.layers)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    before = {layer: weight_kv(get_module(model, editor.modules[layer])).detach().clone() for layer in layers}
    reqs = requests()
    texts = [r.text for r in reqs]
    nll_before = target_nll(model, tok, texts, [r.target_new for r in reqs])

    report = editor.edit(reqs)

    for layer in layers:
        W = weight_kv(get_module(model, editor.modules[layer]))
        assert W.dtype == DTYPES[layer], (layer, W.dtype)
        assert W.device == editor.layer_device(layer) == torch.device("cpu")
        assert not torch.equal(W.detach(), before[layer]), f"layer {layer} was not changed"
        assert report.batches[0].layers[layer]["delta_norm"] > 0
        state = editor.layer_state[layer]
        assert all(t.device == W.device for t in state.values())
        if method == "rlsedit":  # C and A per layer, float64 whatever the weight's dtype
            assert {"C", "A"} <= set(state)
            assert all(t.dtype == torch.float64 for t in state.values())
            assert state["C"].shape == (W.shape[0], W.shape[0])
        elif method == "alphaedit":
            assert set(state) == {"KpKpT"} and state["KpKpT"].dtype == torch.float64
        else:
            assert state == {}
    # every parameter kept its dtype
    assert {n: p.dtype for n, p in model.named_parameters()} == dtypes
    nll_after = target_nll(model, tok, texts, [r.target_new for r in reqs])
    assert bool((nll_after < nll_before - 1.0).all()), (nll_before, nll_after)

    # the run loads back onto a fresh model of the same layout: weights in their dtypes, state restored
    editor.save(tmp_path / "run")
    fresh, _ = mixed_model()
    again = load_editor(tmp_path / "run", fresh, tok)
    for layer in layers:
        W = weight_kv(get_module(fresh, again.modules[layer]))
        assert W.dtype == DTYPES[layer]
        assert torch.equal(W, weight_kv(get_module(model, editor.modules[layer])))
        for key, t in editor.layer_state[layer].items():
            assert torch.equal(again.layer_state[layer][key], t)


def test_rlsedit_solve_writes_in_the_layer_dtype(corpus: Path, tmp_path: Path) -> None:
    """The float64 solve's delta is written exactly into the float64 layer and rounded into the bfloat16
    one (``W_bf16 + delta`` rounded once)."""
    model, tok = mixed_model()
    overrides = {**SETTINGS, **METHODS["rlsedit"], "stats_corpus": str(corpus)}
    editor = make_editor("rlsedit", model, tok, stats_dir=tmp_path / "stats", **overrides)
    g = torch.Generator().manual_seed(0)
    for layer in (2, 3):
        W = weight_kv(get_module(model, editor.modules[layer]))
        K = torch.randn(W.shape[0], 2, generator=g, dtype=torch.float64)
        E = 0.1 * torch.randn(2, W.shape[1], generator=g, dtype=torch.float64)
        p = editor.solve(layer, K, E, W.detach())
        assert p.delta.dtype == torch.float64 and p.state["C"].dtype == torch.float64
        expected = (W.detach().to(torch.float64) + p.delta).to(W.dtype)
        from rlsedit.models.arch import add_delta_kv

        w0 = W.detach().clone()
        add_delta_kv(get_module(model, editor.modules[layer]), p.delta)
        assert W.dtype == DTYPES[layer]
        if W.dtype == torch.float64:
            torch.testing.assert_close(W.detach(), w0 + p.delta, rtol=0, atol=0)
        else:  # one rounding of the float32 sum of the bfloat16 weight and the delta
            torch.testing.assert_close(
                W.detach().float(), expected.float(), rtol=0, atol=float(w0.abs().max()) * 2**-7
            )


def test_load_model_device_map(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``load_model(..., device_map=...)`` passes the map to ``from_pretrained`` (accelerate); on this
    CPU-only machine ``"auto"`` puts every module on the CPU."""
    from transformers import AutoModelForCausalLM

    model, tok = tiny_models.tiny_model("llama", seed=1)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    seen: list[dict[str, Any]] = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls: type, *args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    loaded, _ = load_model(tmp_path / "m", device_map="auto")
    assert seen[-1].get("device_map") == "auto"
    assert model_devices(loaded) == [torch.device("cpu")] and input_device(loaded) == torch.device("cpu")
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), loaded.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    load_model(tmp_path / "m")
    assert "device_map" not in seen[-1]  # no map: the model is moved to ``device`` as before
    with pytest.raises(ValueError, match="device_map"):
        load_model(tmp_path / "m", device="cpu", device_map="auto")


def test_offloaded_edited_layer_is_refused() -> None:
    """An edited layer whose weight accelerate keeps offloaded (on the meta device) cannot be edited."""
    model, tok = tiny_models.tiny_model("llama", seed=0)
    get_module(model, mlp_out_name(model, 3)).to("meta")
    sigmas = {layer: torch.eye(64, dtype=torch.float64) for layer in range(4)}
    with pytest.raises(ValueError, match="offloaded"):
        make_editor("memit", model, tok, sigmas=sigmas, layers=[2, 3], n_templates=0)
