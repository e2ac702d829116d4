"""Keys and hidden states read at the subject's last token, in padded batches cut after the latest subject
token, equal what one full, unpadded forward of each prompt gives at that token."""

from __future__ import annotations

import pytest
import torch

from rlsedit.hooks import trace
from rlsedit.locate import compute_hidden, compute_keys
from rlsedit.locate.tokens import encode_text_upto
from rlsedit.models.arch import get_arch
from rlsedit.requests import EditRequest
from tiny_models import SAMPLE_REQUESTS, tiny_model

CONTEXTS = ["", "Hello there. ", "The capital of Japan is Tokyo, Japan. "]
TEST_REQUESTS = [EditRequest(*r) for r in SAMPLE_REQUESTS]


def _one_by_one(model, tokenizer, name: str, read_input: bool, contexts) -> torch.Tensor:
    rows = []
    for req in TEST_REQUESTS:
        per_ctx = []
        for ctx in contexts:
            ids, last = encode_text_upto(
                tokenizer, ctx + req.text, len(ctx) + len(req.prefix) + len(req.subject)
            )
            with (
                torch.no_grad(),
                trace(model, [name], capture_input=read_input, capture_output=not read_input) as tr,
            ):
                model(input_ids=torch.tensor([ids]))
            x = tr[name].input if read_input else tr[name].output
            per_ctx.append(x[0, last].float())
        rows.append(torch.stack(per_ctx))
    return torch.stack(rows)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_keys_and_hidden_match_unbatched_full_forward(model_type: str) -> None:
    model, tokenizer = tiny_model(model_type, seed=0)
    arch = get_arch(model)
    proj = f"{arch.blocks}.1.{arch.mlp_out}"
    block = f"{arch.blocks}.1"
    K = compute_keys(model, tokenizer, TEST_REQUESTS, proj, CONTEXTS, chunk_size=3, weighting="uniform")
    ref = _one_by_one(model, tokenizer, proj, True, CONTEXTS)
    assert K.shape == (ref.shape[-1], len(TEST_REQUESTS))
    assert torch.allclose(K, ref.mean(1).T, rtol=1e-4, atol=1e-5)
    # the default: MEMIT's compute_ks, the mean per context type: 1/2 the bare prompt, 1/2 the generated
    K_ref, K_p = compute_keys(model, tokenizer, TEST_REQUESTS, proj, CONTEXTS, chunk_size=3, with_prompt=True)
    memit = (ref[:, 0] + ref[:, 1:].mean(1)) / 2
    assert torch.allclose(K_ref, memit.T, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(K_ref, K, rtol=1e-3, atol=1e-4)
    assert torch.allclose(K_p, ref[:, 0].T, rtol=1e-4, atol=1e-5)
    h = compute_hidden(model, tokenizer, TEST_REQUESTS, block, chunk_size=3)
    ref_h = _one_by_one(model, tokenizer, block, False, [""])[:, 0]
    assert torch.allclose(h, ref_h, rtol=1e-4, atol=1e-5)


def test_key_weights() -> None:
    from rlsedit.locate.keys import key_weights

    assert key_weights(6).tolist() == pytest.approx([0.5] + [0.1] * 5)
    assert key_weights(1).tolist() == [1.0]
    assert key_weights(4, "uniform").tolist() == [0.25] * 4
    with pytest.raises(ValueError, match="weighting"):
        key_weights(3, "mean")
    model, tokenizer = tiny_model("llama", seed=0)
    with pytest.raises(ValueError, match="bare prompt"):
        compute_keys(model, tokenizer, TEST_REQUESTS, "model.layers.1.mlp.down_proj", ["Hi. ", ""])


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox", "phi", "qwen2"])
def test_lower_blocks_kept_once_give_the_same_edit(model_type: str) -> None:
    """Within a batch the blocks below the first edited layer run once per chunk of rows (their output
    kept, stubbed in for every later read): the same weights as running every read in full, with block 0
    run fewer times."""
    from rlsedit import make_editor
    from rlsedit.models.arch import get_module, num_layers, weight_kv

    weights, calls = {}, {}
    for reuse in (False, True):
        model, tok = tiny_model(model_type, seed=0)
        sigmas = {layer: torch.eye(64, dtype=torch.float64) for layer in range(num_layers(model))}
        ed = make_editor(
            "memit", model, tok, sigmas=sigmas, layers=[2, 3], n_templates=2, template_length=4, steps=3,
            mu=1.0, reuse_lower_blocks=reuse,
        )  # fmt: skip
        block0 = get_module(model, f"{get_arch(model).blocks}.0")
        n = [0]

        def count(*args, n=n):
            n[0] += 1

        handle = block0.register_forward_hook(count)
        try:
            ed.edit(TEST_REQUESTS[:3])
        finally:
            handle.remove()
        calls[reuse] = n[0]
        weights[reuse] = {
            layer: weight_kv(get_module(model, ed.modules[layer])).detach().clone() for layer in (2, 3)
        }
    for layer in (2, 3):
        torch.testing.assert_close(weights[True][layer], weights[False][layer], rtol=1e-5, atol=1e-6)
    assert calls[True] < calls[False]
