"""trace / edit_output / add_at_positions on tiny models of every architecture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rlsedit.hooks import StopForward, add_at_positions, edit_output, trace
from rlsedit.models.arch import block_name, get_arch, mlp_out_module, mlp_out_name
from tiny_models import ARCH_TYPES, TINY_DIMS, tiny_model

D_K, D_V, LAYERS = TINY_DIMS["intermediate"], TINY_DIMS["hidden"], TINY_DIMS["layers"]
PROMPTS = ["The mother tongue of Danielle Darrieux is", "Toko Yasuda plays the"]


def _hooks(model: nn.Module) -> set[tuple[str, str, int]]:
    """Every forward (pre-)hook registered anywhere in the model."""
    return {
        (name, kind, hook_id)
        for name, m in model.named_modules()
        for kind, hooks in (("fwd", m._forward_hooks), ("pre", m._forward_pre_hooks))
        for hook_id in hooks
    }


@pytest.fixture(scope="module", params=ARCH_TYPES)
def _arch_model(request: pytest.FixtureRequest):
    model, tokenizer = tiny_model(request.param)
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    return model, batch


@pytest.fixture
def arch(_arch_model):
    """(model, batch) per architecture, shared by this module's tests (they only add hooks); checks after
    each test that no hook was left behind.

    Note: transformers 5 itself installs forward hooks, once and for good, on blocks and attention modules
    the first time a forward asks for ``output_hidden_states`` or ``output_attentions``; tests that do so
    use a model of their own."""
    model, _ = _arch_model
    before = _hooks(model)
    yield _arch_model
    assert _hooks(model) == before


def _no_hooks(model: nn.Module) -> bool:
    return not _hooks(model)


def test_mlp_out_capture_matches_module(arch) -> None:
    model, batch = arch
    name = mlp_out_name(model, 1)
    with torch.no_grad(), trace(model, [name], capture_input=True) as tr:
        model(**batch)
    keys, values = tr[name].input, tr[name].output
    seq = batch["input_ids"].shape[1]
    assert keys.shape == (2, seq, D_K)
    assert values.shape == (2, seq, D_V)
    with torch.no_grad():
        torch.testing.assert_close(mlp_out_module(model, 1)(keys), values)


@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_block_outputs_match_hidden_states(model_type: str) -> None:
    # a model of its own: output_hidden_states makes transformers install its own permanent hooks
    model, tokenizer = tiny_model(model_type)
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    names = [block_name(model, i) for i in range(LAYERS)]
    with torch.no_grad(), trace(model, names) as tr:
        out = model(**batch, output_hidden_states=True)
    assert len(out.hidden_states) == LAYERS + 1
    for i in range(LAYERS - 1):  # the last entry of hidden_states has the final norm applied
        assert tr[names[i]].output.shape == (2, batch["input_ids"].shape[1], D_V)
        torch.testing.assert_close(tr[names[i]].output, out.hidden_states[i + 1])


def test_stop_ends_forward(arch) -> None:
    model, batch = arch
    spec = get_arch(model)
    name = block_name(model, 1)
    later_calls: list[str] = []
    handles = [
        model.get_submodule(n).register_forward_hook(lambda *a, n=n: later_calls.append(n))
        for n in (block_name(model, 2), spec.final_norm, spec.lm_head)
    ]
    try:
        out = None
        with torch.no_grad(), trace(model, [name, mlp_out_name(model, 0)], stop=True) as tr:
            out = model(**batch)
    finally:
        for h in handles:
            h.remove()
    assert out is None  # no logits
    assert later_calls == []
    assert tr[name].output is not None and tr[mlp_out_name(model, 0)].output is not None


def test_add_at_positions_exact_and_differentiable(arch) -> None:
    model, batch = arch
    name = block_name(model, 1)
    rows, positions = torch.tensor([1, 0, 0]), torch.tensor([2, 1, 4])
    vectors = torch.randn(3, D_V, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    with torch.no_grad(), trace(model, [name]) as tr:
        base_logits = model(**batch).logits
    base = tr[name].output
    with add_at_positions(model, name, vectors, positions, rows), trace(model, [name], detach=False) as tr:
        logits = model(**batch).logits
    changed = tr[name].output
    expected = base.clone()
    expected[rows, positions] += vectors.detach()
    torch.testing.assert_close(changed.detach(), expected)
    # the forward saw the change: positions before the first edited one are untouched (causal)
    torch.testing.assert_close(logits[0, :1].detach(), base_logits[0, :1])
    assert not torch.allclose(logits[0, -1], base_logits[0, -1])
    logits[:, -1].logsumexp(-1).sum().backward()
    assert vectors.grad is not None and vectors.grad.shape == (3, D_V)
    assert torch.all(vectors.grad.abs().sum(-1) > 0)


@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_hooks_removed_after_exit_and_exception(model_type: str) -> None:
    model, tokenizer = tiny_model(model_type)
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    assert _no_hooks(model)
    name = mlp_out_name(model, 0)
    for make in (
        lambda: trace(model, [name, block_name(model, 1)], capture_input=True),
        lambda: trace(model, [name], stop=True),
        lambda: edit_output(model, name, lambda y: y * 2),
        lambda: add_at_positions(model, block_name(model, 0), torch.zeros(D_V), torch.tensor([0])),
    ):
        with make():
            assert not _no_hooks(model)
            model(**batch)
        assert _no_hooks(model)
        with pytest.raises(RuntimeError, match="boom"), make():
            assert not _no_hooks(model)
            raise RuntimeError("boom")
        assert _no_hooks(model)
    # an error raised inside the forward (here: by the edit function) also removes the hooks
    with pytest.raises(ValueError, match="changed the shape"), edit_output(model, name, lambda y: y[..., :1]):
        model(**batch)
    assert _no_hooks(model)


def test_stop_forward_propagates_without_stop() -> None:
    model, tokenizer = tiny_model("llama")
    ids = tokenizer("a b c", return_tensors="pt").input_ids

    def raise_stop(y: torch.Tensor) -> torch.Tensor:
        raise StopForward()

    with pytest.raises(StopForward), trace(model, [block_name(model, 0)]):
        with edit_output(model, block_name(model, 1), raise_stop):
            model(ids)
    assert _no_hooks(model)


def test_trace_keyword_input_and_detach() -> None:
    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, hidden_states: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, None]:
            return self.lin(hidden_states) * scale, None

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Inner()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(scale=2.0, hidden_states=x)[0]

    model = Outer()
    x = torch.randn(2, 5, 4)
    with trace(model, ["inner"], capture_input=True, detach=False) as tr:
        y = model(x)
    assert tr["inner"].input is x
    assert tr["inner"].output is y and y.grad_fn is not None
    with trace(model, ["inner"]) as tr:
        model(x)
    assert tr["inner"].output.grad_fn is None and tr["inner"].input is None


def test_argument_errors() -> None:
    model, tokenizer = tiny_model("gpt2")
    ids = tokenizer("a b c", return_tensors="pt").input_ids
    with pytest.raises(ValueError, match="at least one"), trace(model, []):
        pass
    with pytest.raises(AttributeError, match="no submodule"), trace(model, ["transformer.h.7"]):
        pass
    with pytest.raises(ValueError, match="same length"):
        with add_at_positions(model, "transformer.h.0", torch.zeros(2, D_V), torch.tensor([0])):
            pass
    with pytest.raises(IndexError, match="out of range"):
        with add_at_positions(model, "transformer.h.0", torch.zeros(D_V), torch.tensor([ids.shape[1]])):
            model(ids)
    with pytest.raises(ValueError, match="vector size"):
        with add_at_positions(model, "transformer.h.0", torch.zeros(D_V + 1), torch.tensor([0])):
            model(ids)
    assert _no_hooks(model)
