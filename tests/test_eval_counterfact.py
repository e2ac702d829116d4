"""CounterFact metrics: per-case flags agree with direct NLL comparisons; summaries average correctly."""

from __future__ import annotations

import math

import pytest
import torch

from rlsedit.datasets import load_counterfact
from rlsedit.eval.counterfact import COUNTERFACT_METRICS, score_counterfact, summarize_counterfact
from rlsedit.eval.scoring import target_nll, target_scores
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", seed=1)


def test_score_counterfact_matches_direct_nll(llama) -> None:
    model, tok = llama
    cases = load_counterfact(split="tune", limit=6)
    recs = score_counterfact(model, tok, cases, batch_size=4)
    assert [r["case_id"] for r in recs] == [c.case_id for c in cases]
    for c, r in zip(cases, recs, strict=True):
        q = c.request
        new, true = target_nll(model, tok, [q.text, q.text], [q.target_new, q.target_true]).tolist()
        assert r["efficacy"] == float(new < true)
        assert math.isclose(r["prompt_nll_new"][0], new, rel_tol=1e-4)
        pn = target_nll(model, tok, list(c.paraphrase_prompts), [q.target_new] * len(c.paraphrase_prompts))
        pt = target_nll(model, tok, list(c.paraphrase_prompts), [q.target_true] * len(c.paraphrase_prompts))
        assert r["generalization"] == pytest.approx(float((pn < pt).float().mean()))
        nn_ = target_nll(
            model, tok, list(c.neighborhood_prompts), [q.target_new] * len(c.neighborhood_prompts)
        )
        nt = target_nll(
            model, tok, list(c.neighborhood_prompts), [c.neighborhood_true] * len(c.neighborhood_prompts)
        )
        assert r["specificity"] == pytest.approx(float((nt < nn_).float().mean()))


def test_target_scores_top1_is_argmax(llama) -> None:
    model, tok = llama
    prompt = "The capital of France is"
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    best = tok.decode([int(logits.argmax())])
    # A one-token target that is the argmax is top-1; check via the tokenizer round trip.
    t_ids = tok(" " + best.strip(), add_special_tokens=False)["input_ids"]
    nll, top1 = target_scores(model, tok, [prompt], [best])
    if len(t_ids) == 1 and t_ids[0] == int(logits.argmax()):
        assert bool(top1[0])
    worst = tok.decode([int(logits.argmin())])
    nll_w, top1_w = target_scores(model, tok, [prompt], [worst])
    assert not bool(top1_w[0])
    assert float(nll_w[0]) > float(nll[0]) or not bool(top1[0])


def test_summarize_excludes_and_averages() -> None:
    recs = [{"case_id": i, **{m: float(v) for m in COUNTERFACT_METRICS}} for i, v in enumerate([1, 0, 1, 1])]
    s = summarize_counterfact(recs)
    assert s["n"] == 4 and s["efficacy"] == pytest.approx(75.0)
    s2 = summarize_counterfact(recs, exclude={1})
    assert s2["n"] == 3 and s2["efficacy"] == pytest.approx(100.0) and s2["efficacy_ci95"] == 0.0
    assert summarize_counterfact([])["efficacy"] is None


def test_score_counterfact_needs_true_target(llama) -> None:
    import dataclasses

    model, tok = llama
    c = load_counterfact(split="tune", limit=1)[0]
    bad = dataclasses.replace(c, request=dataclasses.replace(c.request, target_true=None))
    with pytest.raises(ValueError, match="target_true"):
        score_counterfact(model, tok, [bad])


def _one_at_a_time(model, tok, prompt: str, target: str) -> torch.Tensor:
    """Log-probabilities of ``" " + target`` after ``prompt``: one row, full logits, no padding."""
    p_ids = tok(prompt)["input_ids"]
    t_ids = tok(" " + target.strip(), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p_ids + t_ids])).logits[0]
    logp = torch.log_softmax(logits[len(p_ids) - 1 : len(p_ids) - 1 + len(t_ids)].float(), -1)
    return logp[torch.arange(len(t_ids)), torch.tensor(t_ids)]


class _NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward takes no ``logits_to_keep`` (the scorer then computes every logit)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


@pytest.mark.parametrize("wrap", [False, True], ids=["logits_to_keep", "all_logits"])
def test_batched_scores_equal_one_row_at_a_time(llama, wrap: bool) -> None:
    """Rows sorted by length, padded in batches, logits kept only where a target token is predicted:
    the same log-probabilities as one unpadded row at a time, returned in the caller's order."""
    from rlsedit.eval.scoring import continuation_logprobs

    model, tok = llama
    prompts = ["The capital of France is", "Paris is", "A much longer prompt about the city of Rome is in"]
    prompts += ["Tokyo", "The mother tongue of Danielle Darrieux is"]
    targets = ["Paris", "the capital of France", "Italy", "a city in Japan", "English"]
    scored = _NoLogitsToKeep(model) if wrap else model
    got = continuation_logprobs(scored, tok, prompts, targets, batch_size=2)
    pairs = zip(prompts, targets, strict=True)
    want = torch.stack([_one_at_a_time(model, tok, p, t).sum() for p, t in pairs])
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-5)
    nll, _ = target_scores(scored, tok, prompts, targets, batch_size=3)
    lens = [len(tok(" " + t, add_special_tokens=False)["input_ids"]) for t in targets]
    assert torch.allclose(nll, -want / torch.tensor(lens, dtype=torch.float32), atol=1e-4, rtol=1e-5)
