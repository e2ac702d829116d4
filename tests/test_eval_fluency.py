"""Fluency (ROME's weighted n-gram entropy), generation, and consistency (TF-IDF, only with reference
files)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rlsedit.datasets import load_counterfact
from rlsedit.eval.fluency import (
    CONSISTENCY_UNAVAILABLE,
    ConsistencyReference,
    compute_n_gram_entropy,
    generate_ids,
    generate_texts,
    n_gram_entropy,
    score_generation,
    summarize_generation,
    tfidf_similarity,
    word_tokenize,
)
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", seed=1)


def test_word_tokenize_like_treebank() -> None:
    text = "Good muffins cost $3.88\nin New York.  Please buy me\ntwo of them.\nThanks."
    assert word_tokenize(text) == (
        "Good muffins cost $ 3.88 in New York . Please buy me two of them . Thanks .".split()
    )
    assert word_tokenize("They don't like John's well-known car, do they?") == [
        "They", "do", "n't", "like", "John", "'s", "well-known", "car", ",", "do", "they", "?"
    ]  # fmt: skip


def test_n_gram_entropy_by_hand() -> None:
    # "a b a b": bigrams ab x2, ba x1; trigrams aba, bab
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    h3 = 1.0
    assert compute_n_gram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    # all n-grams distinct: H_n = log2(count)
    words = "one two three four five six seven eight".split()
    want = (2 / 3 * math.log2(7) + 4 / 3 * math.log2(6)) / 2
    assert compute_n_gram_entropy(" ".join(words)) == pytest.approx(want)
    # repetition lowers it; too short a text has zero entropy
    assert compute_n_gram_entropy("the the the the the the the the") == 0.0
    assert compute_n_gram_entropy("hello") == 0.0
    assert n_gram_entropy(["a b a b", " ".join(words)]) == pytest.approx(
        (compute_n_gram_entropy("a b a b") + want) / 2
    )


def test_generate_texts_shape_seed_and_length(llama) -> None:
    model, tok = llama
    prompts = ["The mother tongue of Danielle Darrieux is", "Paris is", "The Eiffel Tower is located in"]
    state = torch.get_rng_state()
    a = generate_texts(model, tok, prompts, max_length=30, seed=3, batch_size=2)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    b = generate_texts(model, tok, prompts, max_length=30, seed=3, batch_size=2)
    c = generate_texts(model, tok, prompts, max_length=30, seed=4, batch_size=2)
    assert a == b and a != c
    ids = generate_ids(model, tok, prompts, max_length=30, seed=3, batch_size=2)
    for p, t, row in zip(prompts, a, ids, strict=True):
        assert t.startswith(p) and t == tok.decode(row, skip_special_tokens=True)
        assert len(row) == 30 and row[: len(tok(p)["input_ids"])] == tok(p)["input_ids"]
    # greedy decoding does not depend on the seed or on batching
    g1 = generate_texts(model, tok, prompts, max_length=20, top_k=1, seed=0, batch_size=1)
    g2 = generate_texts(model, tok, prompts, max_length=20, top_k=1, seed=9, batch_size=3)
    assert g1 == g2


def test_score_generation_records(llama) -> None:
    model, tok = llama
    cases = load_counterfact(split="tune", limit=3)
    recs = score_generation(model, tok, cases, max_length=24)
    assert [r["case_id"] for r in recs] == [c.case_id for c in cases]
    for c, r in zip(cases, recs, strict=True):
        assert len(r["texts"]) == 1 + len(c.paraphrase_prompts)
        assert r["fluency"] == pytest.approx(n_gram_entropy(r["texts"]))
        assert r["consistency"] is None
    s = summarize_generation(recs)
    assert s["fluency"] == pytest.approx(100 * sum(r["fluency"] for r in recs) / 3)
    assert s["consistency"] is None and s["consistency_note"] == CONSISTENCY_UNAVAILABLE
    assert s["generation_n"] == 3


def _write_reference(d: Path, case_id: int) -> tuple[dict[str, int], list[float]]:
    vocab = {"paris": 0, "french": 1, "language": 2, "city": 3}
    idf = [1.5, 2.0, 1.0, 3.0]
    d.mkdir()
    np.save(d / "idf.npy", np.array(idf))
    (d / "tfidf_vocab.json").write_text(json.dumps(vocab))
    snips = [
        {
            "relation_id": "P103",
            "target_id": "Q150",
            "samples": [{"name": "X", "text": "French is a language"}],
        },
        {"relation_id": "P103", "target_id": "Q150", "samples": [{"name": "Y", "text": "Paris, city."}]},
    ]
    (d / "attribute_snippets.json").write_text(json.dumps(snips))
    rome = [
        {
            "case_id": case_id,
            "requested_rewrite": {"relation_id": "P103", "target_new": {"str": "French", "id": "Q150"}},
        }
    ]
    (d / "counterfact.json").write_text(json.dumps(rome))
    return vocab, idf


def test_tfidf_similarity_by_hand() -> None:
    vocab = {"paris": 0, "french": 1, "city": 2}
    idf = [1.0, 2.0, 3.0]
    # a: paris x2, french x1 -> (2, 2, 0); b: french, city -> (0, 2, 3)
    got = tfidf_similarity("Paris paris French unknown", "french CITY", vocab, idf)
    assert got == pytest.approx(4 / (math.sqrt(8) * math.sqrt(13)))
    assert tfidf_similarity("nothing known", "paris", vocab, idf) is None


def test_consistency_with_reference_files(tmp_path: Path, llama) -> None:
    model, tok = llama
    cases = load_counterfact(split="tune", limit=2)
    vocab, idf = _write_reference(tmp_path / "ref", cases[0].case_id)
    ref = ConsistencyReference.load(tmp_path / "ref")
    assert ref.reference_texts(cases[0].case_id) == ["French is a language", "Paris, city."]
    texts = ["Paris is a French city", "the language of Paris"]
    want = tfidf_similarity(" ".join(texts), "French is a language Paris, city.", vocab, idf)
    assert ref.score(cases[0].case_id, texts) == pytest.approx(want)
    recs = score_generation(model, tok, cases, reference=ref, max_length=20)
    assert recs[1]["consistency"] is None  # no snippets for the second case
    s = summarize_generation(recs, reference=True)
    if recs[0]["consistency"] is not None:
        assert s["consistency"] == pytest.approx(100 * recs[0]["consistency"])


def test_reference_missing_file_is_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="attribute_snippets.json"):
        ConsistencyReference.load(tmp_path)
