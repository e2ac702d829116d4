"""The prefix-cache fast path of :func:`rlsedit.locate.targets.compute_targets` gives the straightforward
path's results (z, NLLs, steps) on tiny random models of every architecture, with rows of different prefix
lengths, several context templates, several chunks and requests that stop early."""

from __future__ import annotations

import logging

import pytest
import torch

from rlsedit.locate import forward as forward_mod
from rlsedit.locate import targets as targets_mod
from rlsedit.locate.targets import TargetConfig, TargetResult, compute_targets
from rlsedit.requests import EditRequest
from tiny_models import ARCH_TYPES, tiny_model

#: Prefix lengths differ: subject at the start (one token: "Apple", "It"; the KL rows "Apple is a" and
#: "It is a" then have no prefix at all), in the middle, after a long prefix.
REQUESTS = [
    EditRequest("{} was created by", "Apple", "Google"),
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English"),
    EditRequest("In 1925, the headquarters of {} moved to the city of", "Microsoft", "Tokyo, Japan"),
    EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome"),
    EditRequest("{} is the twin city of", "It", "Beirut"),
]
CONTEXTS = ["", "Hello there. ", "The capital of Japan is Tokyo, Japan. ", "I. "]
#: 5 rows per request (4 contexts + the KL row): 2 requests per chunk, 3 chunks at first.
CHUNK_ROWS = 10
STEPS = 8
LAYER = 1
#: larger weights than the default 0.1: the targets' NLL then moves (a near-uniform model has tiny
#: gradients, whose Adam-normalised steps amplify float rounding)
OVERRIDES = {"initializer_range": 0.3}
RTOL = 1e-4
#: z is looser: Adam's normalised step moves even along directions whose gradient is float noise, so
#: where the loss is flat the two paths' float order moves z by up to ~2e-4 relative (qwen2's tiny model,
#: 2 threads; the NLLs still agree to ~1e-7). A real difference between the paths is orders larger.
Z_RTOL = 1e-3
#: architectures with a norm after the MLP output (the delta does not add to the block output there)
POST_MLP_NORM = {"olmo2", "gemma2", "gemma3_text", "gemma3"}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest per-row relative difference ``||a_i - b_i|| / ||a_i||`` (rows of ``(u, ...)``)."""
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    return float(((a - b).norm(dim=1) / a.norm(dim=1).clamp_min(1e-30)).max())


def _run(model, tokenizer, fast: bool, stop_nll: float, contexts=CONTEXTS, requests=REQUESTS) -> TargetResult:
    cfg = TargetConfig(chunk_rows=CHUNK_ROWS, steps=STEPS, stop_nll=stop_nll, fast=fast, stop_on="nll")
    return compute_targets(model, tokenizer, requests, LAYER, contexts, cfg)


def _assert_same(slow: TargetResult, fast: TargetResult) -> None:
    assert fast.extra["fast"] is True and slow.extra["fast"] is False
    assert torch.equal(fast.steps, slow.steps)
    assert _rel(slow.h0, fast.h0) < RTOL
    assert _rel(slow.z, fast.z) < Z_RTOL
    assert _rel(slow.nll_init[:, None], fast.nll_init[:, None]) < RTOL
    assert _rel(slow.nll_final[:, None], fast.nll_final[:, None]) < RTOL


@pytest.mark.parametrize("model_type", ARCH_TYPES)
def test_fast_matches_straightforward(model_type: str) -> None:
    torch.manual_seed(0)
    model, tokenizer = tiny_model(model_type, seed=0, **OVERRIDES)
    # A stop_nll between the 2nd and 3rd lowest final NLLs of a full run: some requests stop early
    # (possibly at step 0), others run all steps, so the active set shrinks and the chunks regroup.
    ref = _run(model, tokenizer, fast=False, stop_nll=0.0)
    low = torch.sort(ref.nll_final).values
    stop_nll = float(low[1] + low[2]) / 2
    slow = _run(model, tokenizer, fast=False, stop_nll=stop_nll)
    fast = _run(model, tokenizer, fast=True, stop_nll=stop_nll)
    assert (slow.steps < STEPS).any() and (slow.steps == STEPS).any()
    _assert_same(slow, fast)
    # the layer skip runs wherever the delta adds to the block output; a norm after the MLP turns it off
    assert fast.extra["skip_layers"] is (model_type not in POST_MLP_NORM), fast.extra["skip_reason"]


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_chunk_forward_matches_and_keeps_cache(model_type: str, skip: bool) -> None:
    """One chunk forward with a nonzero delta: the cached forward's outputs and gradients equal the full
    forward's at every real token from the subject's last one on, and the stored prefix cache is unchanged."""
    model, tokenizer = tiny_model(model_type, seed=0, **OVERRIDES)
    rows = [r for rs in targets_mod._build_rows(tokenizer, REQUESTS, CONTEXTS, "{} is a") for r in rs]
    arch = targets_mod.get_arch(model)
    sites = forward_mod._Sites(
        f"{arch.blocks}.{LAYER}.{arch.mlp_out}", f"{arch.blocks}.{LAYER}", arch.final_norm
    )
    pad = tokenizer.pad_token_id
    full = forward_mod._FullForward(model, sites, rows, pad)
    fast = forward_mod._PrefixCachedForward(
        model, sites, rows, pad, chunk_rows=7, layer=LAYER if skip else None
    )
    assert (fast.layer == LAYER) if skip else (fast.layer is None)
    assert len(fast.stems) >= 2  # the templates' shared tokens are encoded once
    stored = [t.clone() for t in (*fast.keys, *fast.values)]
    idx = [0, 3, 4, 7, 12, 20, 21, 24]  # rows of several requests, with prefixes of 0 .. many tokens
    assert min(rows[k].subject_last for k in idx) == 0 < max(rows[k].subject_last for k in idx)
    torch.manual_seed(0)
    vec = torch.randn(len(idx), model.config.hidden_size)
    grads = []
    for fwd in (full, fast, fast):
        v = vec.clone().requires_grad_(True)
        with targets_mod.frozen_params(model):
            out = fwd(idx, v)
            picked = [
                out.hidden[k, rows[i].subject_last - out.start[k] : len(rows[i].ids) - out.start[k]]
                for k, i in enumerate(idx)
            ]
            torch.cat(picked).pow(2).sum().backward()
        grads.append((torch.cat(picked).detach(), v.grad))
    (h_full, g_full), (h_fast, g_fast), (h_again, g_again) = grads
    assert torch.allclose(h_fast, h_full, rtol=1e-4, atol=1e-5)
    assert torch.allclose(g_fast, g_full, rtol=1e-4, atol=1e-6)
    assert torch.equal(h_again, h_fast) and torch.equal(g_again, g_fast)
    # the block output at the subject's last token (column 0 of the cached forward) carries the delta
    with torch.no_grad():
        b_full, b_fast = full(idx, vec).block, fast(idx, vec).block
    at_subject = b_full[torch.arange(len(idx)), torch.tensor([rows[i].subject_last for i in idx])]
    assert torch.allclose(b_fast[:, 0], at_subject, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(stored, (*fast.keys, *fast.values), strict=True))


def test_no_prefix_at_all() -> None:
    """Every row's subject is its first token: the fast path runs without a cache."""
    model, tokenizer = tiny_model("llama", seed=1, **OVERRIDES)
    reqs = [
        EditRequest("{} was created by", "Apple", "Google"),
        EditRequest("{} is the city of", "It", "Rome"),
    ]
    slow = _run(model, tokenizer, fast=False, stop_nll=0.0, contexts=[""], requests=reqs)
    fast = _run(model, tokenizer, fast=True, stop_nll=0.0, contexts=[""], requests=reqs)
    assert fast.extra["prefix_bytes"] == 0
    _assert_same(slow, fast)


def test_fast_is_default() -> None:
    assert TargetConfig().fast is True


def test_fallback_warns_and_matches(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A model whose forward takes no cache runs the straightforward path, with a logged warning."""
    model, tokenizer = tiny_model("gpt2", seed=0, **OVERRIDES)
    slow = _run(model, tokenizer, fast=False, stop_nll=0.0, requests=REQUESTS[:2])
    monkeypatch.setattr(forward_mod, "_cache_kwarg", lambda model: None)
    monkeypatch.setattr(forward_mod, "_warned_fallback", set())
    with caplog.at_level(logging.WARNING, logger="rlsedit.locate.targets"):
        fell = _run(model, tokenizer, fast=True, stop_nll=0.0, requests=REQUESTS[:2])
    assert fell.extra["fast"] is False and "no KV cache" in fell.extra["fallback"]
    assert any("fast path does not support gpt2" in r.getMessage() for r in caplog.records)
    assert torch.equal(fell.z, slow.z)


@pytest.mark.parametrize("reference", [True, False])
def test_chunk_loss_matches_per_row_terms(reference: bool) -> None:
    """The vectorised loss of a chunk equals the loss written row by row: each request's NLL is the mean
    over its target tokens of -log p, averaged over its contexts; its KL row gives KL(p || p0) at the
    subject's last token of "{} is a" (MEMIT: ``kl_div(init, cur, log_target=True)``) or, as the named
    option, KL(p0 || p) at the last token."""
    torch.manual_seed(0)
    model, tokenizer = tiny_model("llama", seed=0, **OVERRIDES)
    rows = [
        r
        for rr in targets_mod._build_rows(tokenizer, REQUESTS, CONTEXTS, "{} is a", kl_at_subject=reference)
        for r in rr
    ]
    kl_rows = [r for r in rows if r.kind == "kl"]
    if reference:
        assert all(r.target_pos == [r.subject_last] == [len(r.ids) - 1] for r in kl_rows)
    else:
        assert all(r.target_pos == [len(r.ids) - 1] and r.subject_last < len(r.ids) - 1 for r in kl_rows)
    sites = forward_mod._Sites(
        inject="model.layers.1.mlp.down_proj", read="model.layers.1", final_norm="model.norm"
    )
    fwd = forward_mod._FullForward(model, sites, rows, 0)
    vec = torch.randn(len(rows), model.config.hidden_size) * 3.0
    out = fwd(list(range(len(rows))), vec)
    chunk = list(range(len(REQUESTS)))
    n_ctx = len(CONTEXTS)
    kl_init: list = [None] * len(REQUESTS)
    ref_p = [torch.log_softmax(torch.randn(model.config.vocab_size), -1) for _ in REQUESTS]
    kl_init[1], kl_init[3] = ref_p[1], ref_p[3]  # the others are set from this call's distributions
    kl, nll = targets_mod._chunk_loss(model, rows, out, chunk, n_ctx, kl_init, kl_reverse=reference)
    ref_nll = {i: torch.zeros(()) for i in chunk}
    ref_kl = {i: torch.zeros(()) for i in chunk}
    for k, r in enumerate(rows):
        lp = torch.log_softmax(
            targets_mod.logits_from_hidden(model, out.hidden[k, torch.tensor(r.target_pos)]).float(), -1
        )
        if r.kind == "nll":
            ref_nll[r.req] += -lp[torch.arange(len(r.target_tok)), torch.tensor(r.target_tok)].mean() / n_ctx
        else:
            p0 = ref_p[r.req] if r.req in (1, 3) else lp[0].detach()
            p, q = (lp[0], p0) if reference else (p0, lp[0])
            ref_kl[r.req] += (p.exp() * (p - q)).sum()
    for i in chunk:
        assert torch.allclose(nll[i], ref_nll[i], rtol=1e-5, atol=1e-6)
        assert torch.allclose(kl[i], ref_kl[i], rtol=1e-5, atol=1e-6)
    assert min(float(ref_kl[1].detach()), float(ref_kl[3].detach())) > 1e-3  # another reference
    assert float(kl[0].detach()) == pytest.approx(0.0, abs=1e-6)
    assert all(t is not None for t in kl_init)


def test_batch_equals_each_request_alone() -> None:
    """Requests are independent (per-request loss terms, per-element Adam): optimising them together, in
    chunks ordered by suffix length, gives each request the target it gets alone."""
    torch.manual_seed(0)
    model, tokenizer = tiny_model("llama", seed=0, **OVERRIDES)
    together = _run(model, tokenizer, fast=True, stop_nll=0.0)
    suffix = [
        len(r[0].ids) - r[0].subject_last
        for r in targets_mod._build_rows(tokenizer, REQUESTS, CONTEXTS, "{} is a")
    ]
    assert suffix != sorted(suffix)  # the chunk order differs from the request order
    for i, req in enumerate(REQUESTS):
        alone = _run(model, tokenizer, fast=True, stop_nll=0.0, requests=[req])
        assert _rel(together.z[i : i + 1], alone.z) < RTOL
        assert int(together.steps[i]) == int(alone.steps[0])


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen2"])
def test_prefix_cache_with_shared_stems_equals_each_prefix_alone(model_type: str) -> None:
    """Every row's stored prefix keys/values (its stem, encoded once per template, then the rest on top of
    it) equal those of a plain forward of that row's prefix alone, at every layer; pads are masked."""
    from transformers import DynamicCache

    model, tokenizer = tiny_model(model_type, seed=1, **OVERRIDES)
    rows = [r for rs in targets_mod._build_rows(tokenizer, REQUESTS, CONTEXTS, "{} is a") for r in rs]
    arch = targets_mod.get_arch(model)
    sites = forward_mod._Sites(
        f"{arch.blocks}.{LAYER}.{arch.mlp_out}", f"{arch.blocks}.{LAYER}", arch.final_norm
    )
    fast = forward_mod._PrefixCachedForward(model, sites, rows, tokenizer.pad_token_id, chunk_rows=6)
    stem_len, row_stem = fast._stems()
    assert len(stem_len) >= 2 and -1 in row_stem and any(g >= 0 for g in row_stem)
    kw = forward_mod._cache_kwarg(model)
    for k, r in enumerate(rows):
        valid = fast.pmask[k].bool()
        assert int(valid.sum()) == r.subject_last
        if r.subject_last == 0:
            continue
        cache = DynamicCache()
        with torch.no_grad():
            model(input_ids=torch.tensor([r.ids[: r.subject_last]]), use_cache=True, **{kw: cache})
        for layer, (ref_k, ref_v) in enumerate(forward_mod._cache_layers(cache)):
            got_k = fast.keys[layer][k][:, valid]
            got_v = fast.values[layer][k][:, valid]
            assert torch.allclose(got_k, ref_k[0], rtol=1e-4, atol=1e-5), (k, layer)
            assert torch.allclose(got_v, ref_v[0], rtol=1e-4, atol=1e-5), (k, layer)
            assert not fast.keys[layer][k][:, ~valid].any()
