"""zsRE token accuracy: per-token flags agree with a direct argmax under teacher forcing."""

from __future__ import annotations

import pytest
import torch

from rlsedit.datasets import load_zsre
from rlsedit.eval.zsre import ZSRE_METRICS, score_zsre, summarize_zsre
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", seed=2)


def _direct_hits(model, tok, prompt: str, answer: str) -> list[int]:
    """Top-1 flags token by token, one forward per prefix (no batching, no padding)."""
    p_ids = tok(prompt)["input_ids"]
    a_ids = tok(" " + answer.strip(), add_special_tokens=False)["input_ids"]
    hits = []
    for i, t in enumerate(a_ids):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p_ids + a_ids[:i]])).logits[0, -1]
        hits.append(int(int(logits.argmax()) == t))
    return hits


def test_zsre_token_accuracy_matches_direct(llama) -> None:
    model, tok = llama
    cases = load_zsre()[:4]
    recs = score_zsre(model, tok, cases, batch_size=5)
    assert [r["case_id"] for r in recs] == [c.case_id for c in cases]
    for c, r in zip(cases, recs, strict=True):
        for metric, prompt, answer in (
            ("efficacy", c.src, c.alt),
            ("generalization", c.rephrase, c.alt),
            ("specificity", c.loc + "?", c.loc_ans),
        ):
            want = _direct_hits(model, tok, prompt, answer)
            assert r[f"{metric}_tokens"] == want, metric
            assert r[metric] == pytest.approx(sum(want) / len(want))


def test_zsre_summary_and_invalid_case(llama) -> None:
    recs = [
        {"case_id": i, "efficacy": v, "generalization": v / 2, "specificity": 0.0}
        for i, v in enumerate([1, 0.5])
    ]
    s = summarize_zsre(recs)
    assert s["n"] == 2 and s["efficacy"] == pytest.approx(75.0) and s["generalization"] == pytest.approx(37.5)
    assert set(ZSRE_METRICS) <= set(s)
    assert summarize_zsre(recs, exclude={0})["efficacy"] == pytest.approx(50.0)
    model, tok = llama
    invalid = next(c for c in load_zsre(valid_only=False) if c.request is None)
    with pytest.raises(ValueError, match="invalid"):
        score_zsre(model, tok, [invalid])
