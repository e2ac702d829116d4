"""zsRE metrics as in MEMIT: token-level top-1 accuracy under teacher forcing.

For each case (``rlsedit.datasets.ZsreCase``):

- **efficacy**: the fraction of the tokens of the new answer ``" " + alt`` that are the model's top-1
  prediction after the question ``src`` and the answer tokens before them;
- **generalization**: the same after the paraphrased question ``rephrase``;
- **specificity**: the same for the NQ answer ``" " + loc_ans`` after ``loc + "?"`` (the NQ question with
  its ``"nq question: "`` prefix, a question mark appended as MEMIT does). It measures what the model
  knows about an unrelated question, so it is low even before editing; the change is what matters.

MEMIT re-tokenises ``prompt + decode(answer tokens so far)`` for every answer token; feeding the prompt's
tokens followed by the answer's tokens, as here, is the same teacher forcing without the round trip.
Per-case values are in [0, 1]; summaries average over cases and report percentages.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from rlsedit.datasets import ZsreCase
from rlsedit.eval.scoring import target_token_top1
from rlsedit.eval.summary import summarize_metrics

__all__ = ["ZSRE_METRICS", "score_zsre", "summarize_zsre"]

ZSRE_METRICS = ("efficacy", "generalization", "specificity")


def score_zsre(
    model: nn.Module, tokenizer: Any, cases: Sequence[ZsreCase], batch_size: int = 32
) -> list[dict[str, Any]]:
    """Per-case records: ``case_id``, ``efficacy``, ``generalization``, ``specificity`` (token accuracies
    in [0, 1]) and the per-token top-1 flags (``efficacy_tokens``...: lists of 0/1).

    Raises ``ValueError`` for a case without a valid request (see ``load_zsre(valid_only=False)``).
    """
    prompts: list[str] = []
    targets: list[str] = []
    for c in cases:
        if c.request is None:
            raise ValueError(f"zsRE case {c.case_id} is invalid ({c.error}); it cannot be scored")
        prompts += [c.request.text, c.rephrase, c.loc + "?"]
        targets += [c.request.target_new, c.request.target_new, c.loc_ans]
    hits = target_token_top1(model, tokenizer, prompts, targets, batch_size=batch_size)
    out = []
    for i, c in enumerate(cases):
        rec: dict[str, Any] = {"case_id": c.case_id}
        for j, metric in enumerate(ZSRE_METRICS):
            h = hits[3 * i + j]
            rec[metric] = float(h.float().mean())
            rec[f"{metric}_tokens"] = [int(x) for x in h.tolist()]
        out.append(rec)
    return out


def summarize_zsre(records: Iterable[dict[str, Any]], exclude: Iterable[Any] = ()) -> dict[str, Any]:
    """Mean token accuracy per metric over the records (percent) with ``n`` and 95% half-widths
    (``<metric>_ci95``), leaving out case ids in ``exclude``."""
    return summarize_metrics(records, ZSRE_METRICS, exclude)
