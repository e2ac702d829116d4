"""Generation metrics of CounterFact as in ROME: fluency (weighted n-gram entropy) and consistency (TF-IDF).

**Fluency** (ROME's ``n_gram_entropy``, our own implementation): for one text, the Shannon entropy in
bits of the frequency distribution of its word bigrams and of its word trigrams, weighted 2/3 and 4/3,
averaged: ``(2/3 H_2 + 4/3 H_3) / 2``. A case's value is the mean over its generated texts; the summary
is the mean over cases times 100, as ROME's summaries report it (so ~600 is a fluent model, and edits that
make the model repeat itself lower it). ROME tokenises words with NLTK's ``word_tokenize``; we use a
regular-expression approximation of it (:func:`word_tokenize`: words, numbers, punctuation, English
clitics such as ``n't`` and ``'s``), so values can differ slightly on unusual punctuation.

**Generation.** The bundled CounterFact has no ``generation_prompts``; we generate from the edit prompt
and the paraphrase prompts of each case instead (a stand-in, said as such in results). As ROME's
``generate_fast``: top-k sampling with k = 5 at temperature 1, until each text (prompt included) is 100
tokens long, not stopping at the end-of-text token (special tokens are dropped from the decoded text), the
prompt kept in the text. Sampling is seeded (``seed`` plus the batch index), so a run is reproducible for
the same model, prompts, batch size and device; ``top_k=1`` gives greedy decoding instead.

**Consistency** (ROME's ``reference_score``): the cosine similarity of TF-IDF vectors of the joined
generated texts and the joined Wikipedia snippets about the new object (same relation). It needs ROME's
reference files (``attribute_snippets.json``, ``idf.npy``, ``tfidf_vocab.json``) and each case's
relation id and new-object id, which the bundled compact CounterFact lacks: without them it is reported
as unavailable (``None`` and a reason), never approximated. See :class:`ConsistencyReference`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlsedit.eval.summary import summarize_metrics
from rlsedit.locate.tokens import pad_id_of
from rlsedit.models.arch import input_device

__all__ = [
    "CONSISTENCY_UNAVAILABLE",
    "ConsistencyReference",
    "GENERATION_NOTE",
    "compute_n_gram_entropy",
    "generate_ids",
    "generate_texts",
    "n_gram_entropy",
    "score_generation",
    "summarize_generation",
    "tfidf_similarity",
    "word_tokenize",
]

log = logging.getLogger(__name__)

#: Why consistency is None when no ROME reference files are given.
CONSISTENCY_UNAVAILABLE = (
    "consistency needs ROME's attribute snippets, idf and TF-IDF vocabulary and each case's relation and "
    "new-object ids; none were supplied (the bundled CounterFact has neither)"
)
#: How the texts were generated (recorded next to the fluency figures).
GENERATION_NOTE = (
    "generated from the edit prompt and the paraphrase prompt(s) (the bundled CounterFact has no "
    "generation_prompts); top-k sampling as ROME (k=5, 100 tokens including the prompt, seeded)"
)

_WORD_RE = re.compile(
    r"""\w+(?=n't\b)          # "do" of "don't" (Treebank splits the clitic off)
      | n't\b
      | '(?:s|re|ve|ll|d|m)\b  # 's 're 've 'll 'd 'm
      | \w+(?:[-.]\w+)*        # words, numbers (3.88), hyphenated words
      | \.\.\.
      | --
      | [^\w\s]                # any other punctuation mark, one at a time
    """,
    re.VERBOSE | re.IGNORECASE,
)


def word_tokenize(text: str) -> list[str]:
    """Words and punctuation of ``text``: a regular-expression approximation of NLTK's ``word_tokenize``
    (Treebank): ``"Good muffins cost $3.88 in New York."`` gives ``Good muffins cost $ 3.88 in New York .``
    and ``"don't"`` gives ``do n't``."""
    return _WORD_RE.findall(text)


def _entropy_bits(counts: Counter) -> float:
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return -math.fsum(c / total * math.log2(c / total) for c in counts.values())


def compute_n_gram_entropy(
    text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float:
    """ROME's weighted n-gram entropy of one text: the mean over ``n`` of ``weight_n * H_n``, with
    ``H_n`` the entropy (bits) of the frequency distribution of the text's word ``n``-grams (0 when the
    text has fewer than ``n`` words)."""
    if len(ns) != len(weights):
        raise ValueError("ns and weights must have the same length")
    words = word_tokenize(text)
    terms = []
    for n, w in zip(ns, weights, strict=True):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        terms.append(w * _entropy_bits(grams))
    return math.fsum(terms) / len(terms)


def n_gram_entropy(texts: Sequence[str]) -> float:
    """Arithmetic mean of :func:`compute_n_gram_entropy` over ``texts`` (ROME's ``n_gram_entropy``)."""
    if not texts:
        raise ValueError("no texts")
    return math.fsum(compute_n_gram_entropy(t) for t in texts) / len(texts)


def _clean(text: str) -> str:
    """ROME's post-processing of generated text."""
    return unicodedata.normalize("NFKD", text).replace("\n\n", " ")


def generate_texts(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_length: int = 100,
    top_k: int = 5,
    seed: int = 0,
    batch_size: int = 16,
) -> list[str]:
    """Prompt plus generated continuation for each prompt, as ROME's ``generate_fast``.

    Each row is left-padded in batches of ``batch_size``; a row is continued until it holds
    ``max_length`` tokens (prompt included; capped by the model's context length), by top-k sampling
    (``top_k=1``: greedy), never stopping at the end-of-text token. Batch ``b`` samples from
    ``torch.manual_seed(seed + b)`` inside a forked RNG (the caller's RNG state is left alone). Special
    tokens are dropped from the decoded text; ``"\\n\\n"`` becomes a space (as ROME).

    Returns:
        one string per prompt, in order.
    """
    ids = generate_ids(
        model, tokenizer, prompts, max_length=max_length, top_k=top_k, seed=seed, batch_size=batch_size
    )
    return [_clean(tokenizer.decode(row, skip_special_tokens=True)) for row in ids]


@torch.no_grad()
def generate_ids(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_length: int = 100,
    top_k: int = 5,
    seed: int = 0,
    batch_size: int = 16,
) -> list[list[int]]:
    """Token ids of prompt plus continuation for each prompt: ``max_length`` ids per row (see
    :func:`generate_texts`; a prompt longer than that keeps its last ``max_length - 1`` tokens)."""
    from rlsedit.models.arch import context_limit

    if top_k < 1 or max_length < 2 or batch_size < 1:
        raise ValueError("top_k >= 1, max_length >= 2 and batch_size >= 1 are required")
    limit = context_limit(model)
    if limit is not None:
        max_length = min(max_length, limit)
    device = input_device(model)
    pad = pad_id_of(tokenizer)
    encoded = [list(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]
    out: list[list[int]] = []
    for b, s in enumerate(range(0, len(encoded), batch_size)):
        rows = [ids[-(max_length - 1) :] for ids in encoded[s : s + batch_size]]  # room for one new token
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
        new = max_length - min(len(r) for r in rows)
        sampling: dict[str, Any] = (
            {"do_sample": True, "top_k": top_k, "top_p": 1.0, "temperature": 1.0}
            if top_k > 1
            else {"do_sample": False}
        )
        cuda = (
            [device.index if device.index is not None else torch.cuda.current_device()]
            if (device.type == "cuda")
            else []
        )
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed + b)
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=new,
                pad_token_id=pad,
                eos_token_id=None,  # as ROME: never stop early
                **sampling,
            )
        for i, r in enumerate(rows):
            cont = gen[i, width : width + max_length - len(r)].tolist()
            out.append(r + cont)
    return out


# ------------------------------------------------------------------------------------------ consistency


def _tfidf_terms(text: str) -> list[str]:
    """scikit-learn's default ``TfidfVectorizer`` analyser: lower-cased ``(?u)\\b\\w\\w+\\b`` tokens."""
    return re.findall(r"(?u)\b\w\w+\b", text.lower())


def tfidf_similarity(
    text_a: str, text_b: str, vocab: Mapping[str, int], idf: Sequence[float]
) -> float | None:
    """Cosine similarity of the TF-IDF vectors of two texts (raw term counts times ``idf``, terms outside
    ``vocab`` ignored), as ROME's ``tfidf_similarity`` with its fitted vectoriser. None when either
    vector is zero (ROME would divide by zero)."""

    def vec(text: str) -> dict[int, float]:
        counts = Counter(vocab[t] for t in _tfidf_terms(text) if t in vocab)
        return {j: c * float(idf[j]) for j, c in counts.items()}

    a, b = vec(text_a), vec(text_b)
    na = math.sqrt(math.fsum(v * v for v in a.values()))
    nb = math.sqrt(math.fsum(v * v for v in b.values()))
    if na == 0.0 or nb == 0.0:
        return None
    return math.fsum(v * b.get(j, 0.0) for j, v in a.items()) / (na * nb)


@dataclass(frozen=True)
class ConsistencyReference:
    """ROME's reference data for consistency.

    Attributes:
        snippets: ``{relation_id: {target_id: [snippet text, ...]}}`` (ROME's ``AttributeSnippets``).
        vocab: TF-IDF vocabulary ``{term: column}``. idf: ``(len(vocab),)`` inverse document frequencies.
        case_ids: ``{case_id: (relation_id, target_new_id)}`` for the cases that can be scored.
    """

    snippets: Mapping[str, Mapping[str, Sequence[str]]]
    vocab: Mapping[str, int]
    idf: Sequence[float]
    case_ids: Mapping[int, tuple[str, str]]

    @classmethod
    def load(cls, directory: str | Path, cases_file: str | Path | None = None) -> ConsistencyReference:
        """Read ``attribute_snippets.json``, ``idf.npy`` and ``tfidf_vocab.json`` from ``directory``, and
        each case's ``requested_rewrite.relation_id`` and ``target_new.id`` from ROME's full
        ``counterfact.json`` (``cases_file``, default ``directory/counterfact.json``).

        Raises ``FileNotFoundError`` naming a missing file. ``idf.npy`` is read without pickle.
        """
        import numpy as np

        d = Path(directory)
        cases_path = Path(cases_file) if cases_file is not None else d / "counterfact.json"
        paths = [d / "attribute_snippets.json", d / "idf.npy", d / "tfidf_vocab.json", cases_path]
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"consistency reference: {p} is missing")
        snippets: dict[str, dict[str, list[str]]] = {}
        for el in json.loads(paths[0].read_text(encoding="utf-8")):
            bucket = snippets.setdefault(str(el["relation_id"]), {}).setdefault(str(el["target_id"]), [])
            bucket.extend(s["text"] for s in el["samples"])
        idf = np.load(paths[1], allow_pickle=False).astype(float).ravel().tolist()
        vocab = {str(k): int(v) for k, v in json.loads(paths[2].read_text(encoding="utf-8")).items()}
        if vocab and max(vocab.values()) >= len(idf):
            raise ValueError(f"{paths[2]}: a column index is past the {len(idf)} idf values")
        case_ids: dict[int, tuple[str, str]] = {}
        for rec in json.loads(cases_path.read_text(encoding="utf-8")):
            rw = rec.get("requested_rewrite", {})
            if "relation_id" in rw and isinstance(rw.get("target_new"), dict) and "id" in rw["target_new"]:
                case_ids[int(rec["case_id"])] = (str(rw["relation_id"]), str(rw["target_new"]["id"]))
        return cls(snippets, vocab, idf, case_ids)

    def reference_texts(self, case_id: int) -> list[str]:
        """The snippets about case ``case_id``'s new object (empty if unknown)."""
        ids = self.case_ids.get(case_id)
        if ids is None:
            return []
        return list(self.snippets.get(ids[0], {}).get(ids[1], []))

    def score(self, case_id: int, texts: Sequence[str]) -> float | None:
        """ROME's consistency of the generated ``texts`` of one case (None if it has no snippets)."""
        ref = self.reference_texts(case_id)
        if not ref:
            return None
        return tfidf_similarity(" ".join(texts), " ".join(ref), self.vocab, self.idf)


# ---------------------------------------------------------------------------------------- per-case API


def score_generation(
    model: nn.Module,
    tokenizer: Any,
    cases: Sequence[Any],
    *,
    reference: ConsistencyReference | None = None,
    max_length: int = 100,
    top_k: int = 5,
    seed: int = 0,
    batch_size: int = 16,
    keep_texts: bool = True,
) -> list[dict[str, Any]]:
    """Per-case fluency and consistency of CounterFact cases (see the module docstring).

    ``cases``: :class:`~rlsedit.datasets.CounterFactCase` (the edit prompt ``request.text`` and the
    ``paraphrase_prompts`` are the generation prompts). Returns one dict per case: ``case_id``,
    ``fluency`` (ROME's n-gram entropy of the case's texts, not scaled), ``consistency`` (None without
    ``reference`` or when the case has no reference snippets) and, with ``keep_texts``, ``texts``.
    """
    prompts: list[str] = []
    owner: list[int] = []
    for i, c in enumerate(cases):
        for p in (c.request.text, *c.paraphrase_prompts):
            prompts.append(p)
            owner.append(i)
    texts = generate_texts(
        model, tokenizer, prompts, max_length=max_length, top_k=top_k, seed=seed, batch_size=batch_size
    )
    per_case: list[list[str]] = [[] for _ in cases]
    for i, t in zip(owner, texts, strict=True):
        per_case[i].append(t)
    out = []
    for c, ts in zip(cases, per_case, strict=True):
        rec: dict[str, Any] = {
            "case_id": c.case_id,
            "fluency": n_gram_entropy(ts),
            "consistency": None if reference is None else reference.score(c.case_id, ts),
        }
        if keep_texts:
            rec["texts"] = ts
        out.append(rec)
    return out


def summarize_generation(
    records: Sequence[dict[str, Any]], exclude: Sequence[Any] = (), reference: bool = False
) -> dict[str, Any]:
    """``fluency`` and ``consistency`` (means times 100, as ROME reports them) with 95% half-widths,
    ``n``, and ``consistency_note`` saying why consistency is None when it is."""
    s = summarize_metrics(records, ("fluency", "consistency"), exclude)
    out: dict[str, Any] = {
        "fluency": s["fluency"],
        "fluency_ci95": s["fluency_ci95"],
        "consistency": s["consistency"],
        "consistency_ci95": s["consistency_ci95"],
        "generation_n": s["n"],
        "generation_note": GENERATION_NOTE,
    }
    if s["consistency"] is None:
        out["consistency_note"] = (
            CONSISTENCY_UNAVAILABLE if not reference else "no case had reference snippets"
        )
    return out
