"""General capability: stratified samples, label scoring (fast path = general path), accuracy with Wilson
intervals and chance levels, strided perplexity against a direct computation."""

from __future__ import annotations

import math

import pytest
import torch

from rlsedit.eval.capability import (
    CAPABILITY_TASKS,
    CapabilityConfig,
    evaluate_capability,
    label_logprobs,
    perplexity,
    task_items,
    zero_shot_accuracy,
)
from rlsedit.eval.summary import wilson_interval
from tiny_models import tiny_model

TEXT = (
    "The mother tongue of Danielle Darrieux is French. The Eiffel Tower is located in the city of Paris, "
    "France. Michael Jordan plays the sport of basketball. The official language of Italy is Italian; "
    "the capital of Japan is Tokyo. "
) * 3


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", seed=5)


def test_wilson_interval() -> None:
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("task", CAPABILITY_TASKS)
def test_task_items_are_fixed_and_stratified(task: str) -> None:
    a, b = task_items(task, 10, seed=0), task_items(task, 10, seed=0)
    assert a == b and len(a) == 10
    gold = [x["answer"] if task == "mmlu" else x["label"] for x in a]
    k = 4 if task == "mmlu" else 2
    counts = [gold.count(j) for j in range(k)]
    assert max(counts) - min(counts) <= 1
    assert task_items(task, 10, seed=1) != a


def test_label_scoring_fast_path_equals_teacher_forcing(llama) -> None:
    model, tok = llama
    prompts = ["Review: a fine film\nSentiment:", "Is it good? Answer:", "x " * 200 + "Answer:"]
    labels = ["A", "B", "the"]  # one token each for the tiny tokenizer
    assert all(len(tok(" " + lab, add_special_tokens=False)["input_ids"]) == 1 for lab in labels)
    fast = label_logprobs(model, tok, prompts, labels, batch_size=2)
    slow = label_logprobs(model, tok, prompts, labels, batch_size=2, single_token_fast_path=False)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    # a multi-token label: total log-probability of its tokens, checked by hand
    word = "basketball"
    ids = tok(" " + word, add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    got = label_logprobs(model, tok, prompts[:1], [word])[0, 0]
    p_ids = tok(prompts[0])["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([p_ids + ids])).logits[0], -1)
    want = sum(float(logp[len(p_ids) - 1 + i, t]) for i, t in enumerate(ids))
    assert float(got) == pytest.approx(want, abs=1e-4)


def test_zero_shot_accuracy_report(llama) -> None:
    model, tok = llama
    r = zero_shot_accuracy(model, tok, "mmlu", n_items=8)
    assert r["n"] == 8 and r["chance"] == 25.0 and r["labels"] == ["A", "B", "C", "D"]
    assert sum(r["predicted"].values()) == 8
    assert r["accuracy"] == pytest.approx(100 * r["correct"] / 8)
    lo, hi = wilson_interval(r["correct"], 8)
    assert r["ci95"] == pytest.approx([100 * lo, 100 * hi])
    assert zero_shot_accuracy(model, tok, "rte", n_items=4)["chance"] == 50.0
    with pytest.raises(ValueError, match="unknown task"):
        zero_shot_accuracy(model, tok, "imagenet")


def _direct_nll(model, ids: list[int]) -> tuple[float, int]:
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return -float(sum(logp[i - 1, ids[i]] for i in range(1, len(ids)))), len(ids) - 1


def test_perplexity_single_window_is_direct(llama) -> None:
    model, tok = llama
    ids = tok(TEXT, add_special_tokens=False)["input_ids"][:60]
    r = perplexity(model, tok, TEXT, n_tokens=60, window=64, stride=32)
    nll, n = _direct_nll(model, ids)
    assert r["tokens"] == n == 59 and r["windows"] == 1
    assert r["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert r["chance"] == model.config.vocab_size


def test_perplexity_strided_windows(llama) -> None:
    model, tok = llama
    ids = tok(TEXT, add_special_tokens=False)["input_ids"][:100]
    r = perplexity(model, tok, TEXT, n_tokens=100, window=40, stride=20, batch_size=3)
    # windows [0,40) scores 1..39, [20,60) scores 40..59, [40,80) 60..79, [60,100) 80..99
    total = 0.0
    for b, e, first in ((0, 40, 1), (20, 60, 40), (40, 80, 60), (60, 100, 80)):
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids[b:e]])).logits[0].double(), -1)
        total -= float(sum(logp[i - b - 1, ids[i]] for i in range(first, e)))
    assert r["tokens"] == 99 and r["windows"] == 4
    assert r["nll"] == pytest.approx(total / 99, rel=1e-5)
    lo, hi = r["ci95"]
    assert lo < r["perplexity"] < hi
    # a window longer than the model's context is capped (tiny models take 128 positions)
    assert perplexity(model, tok, TEXT, n_tokens=300, window=512, stride=256)["window"] == 128


def test_evaluate_capability_small(llama) -> None:
    model, tok = llama
    cfg = CapabilityConfig(tasks=("sst2", "cola"), n_items=4, ppl_tokens=64, ppl_window=32, ppl_stride=16)
    r = evaluate_capability(model, tok, cfg)
    assert set(r) >= {"config", "perplexity", "sst2", "cola", "seconds"}
    assert r["config"]["tasks"] == ["sst2", "cola"] and r["sst2"]["n"] == 4
    with pytest.raises(ValueError, match="unknown capability task"):
        CapabilityConfig(tasks=("nope",))
