"""CounterFact metrics as in ROME/MEMIT: efficacy, generalization (paraphrase), specificity (neighbourhood).

Each metric compares the mean per-token NLL of the new object with the true object's:

- **efficacy**: on the edited prompt, the new object is preferred (NLL lower than the true one's);
- **generalization**: the same on each paraphrase prompt (averaged within a case, then over cases);
- **specificity**: on each neighbourhood prompt (other subjects, same relation) the true object stays
  preferred over the new one.

The ``*_acc`` variants ask for more: every token of the object (new for efficacy/generalization, true for
specificity) is the model's top-1 prediction under teacher forcing. All figures are percentages.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from rlsedit.datasets import CounterFactCase
from rlsedit.eval.scoring import target_scores
from rlsedit.eval.summary import summarize_metrics

__all__ = ["COUNTERFACT_METRICS", "counterfact_pairs", "score_counterfact", "summarize_counterfact"]

COUNTERFACT_METRICS = (
    "efficacy",
    "generalization",
    "specificity",
    "efficacy_acc",
    "generalization_acc",
    "specificity_acc",
)


def counterfact_pairs(
    cases: Sequence[CounterFactCase],
) -> tuple[list[str], list[str], list[tuple[int, str, str]]]:
    """The (prompt, target) pairs CounterFact scores: for each case, its prompt, each paraphrase and each
    neighbour, each with the new and the true object.

    Returns ``(prompts, targets, index)``, ``index[j] = (case position, group, "new" | "true")`` with
    group ``"prompt"``, ``"paraphrase"`` or ``"neighborhood"``.
    """
    prompts: list[str] = []
    targets: list[str] = []
    index: list[tuple[int, str, str]] = []

    def add(i: int, group: str, prompt: str, new: str, true: str) -> None:
        for which, tgt in (("new", new), ("true", true)):
            prompts.append(prompt)
            targets.append(tgt)
            index.append((i, group, which))

    for i, c in enumerate(cases):
        r = c.request
        true = r.target_true or ""
        if not true:
            raise ValueError(f"case {c.case_id}: CounterFact scoring needs target_true")
        add(i, "prompt", r.text, r.target_new, true)
        for p in c.paraphrase_prompts:
            add(i, "paraphrase", p, r.target_new, true)
        for p in c.neighborhood_prompts:
            add(i, "neighborhood", p, r.target_new, c.neighborhood_true)
    return prompts, targets, index


def score_counterfact(
    model: nn.Module, tokenizer: Any, cases: Sequence[CounterFactCase], batch_size: int = 32
) -> list[dict[str, Any]]:
    """Per-case records: NLLs and top-1 flags on the prompt, each paraphrase and each neighbour.

    Returns one dict per case with ``case_id``, ``efficacy``, ``generalization``, ``specificity`` (each
    in [0, 1] for that case), their ``*_acc`` variants and the raw NLLs (``prompt_nll_new``...).
    """
    prompts, targets, index = counterfact_pairs(cases)
    nll, top1 = target_scores(model, tokenizer, prompts, targets, batch_size=batch_size)
    raw: list[dict[str, dict[str, list[tuple[float, bool]]]]] = [{} for _ in cases]
    for (i, group, which), n, t in zip(index, nll.tolist(), top1.tolist(), strict=True):
        raw[i].setdefault(group, {}).setdefault(which, []).append((n, t))
    out = []
    for c, r in zip(cases, raw, strict=True):
        rec: dict[str, Any] = {"case_id": c.case_id}
        for group, metric, keep in (
            ("prompt", "efficacy", "new"),
            ("paraphrase", "generalization", "new"),
            ("neighborhood", "specificity", "true"),
        ):
            g = r.get(group)
            if not g:
                rec[metric] = rec[f"{metric}_acc"] = None
                continue
            new, true = g["new"], g["true"]
            if keep == "new":
                wins = [a[0] < b[0] for a, b in zip(new, true, strict=True)]
                acc = [a[1] for a in new]
            else:
                wins = [b[0] < a[0] for a, b in zip(new, true, strict=True)]
                acc = [b[1] for b in true]
            rec[metric] = sum(wins) / len(wins)
            rec[f"{metric}_acc"] = sum(acc) / len(acc)
            rec[f"{group}_nll_new"] = [a[0] for a in new]
            rec[f"{group}_nll_true"] = [b[0] for b in true]
        out.append(rec)
    return out


def summarize_counterfact(
    records: Iterable[dict[str, Any]], exclude: Iterable[Any] = ()
) -> dict[str, float | int | None]:
    """Mean of each metric over the records (percent), leaving out case ids in ``exclude`` (e.g. cases
    superseded by a later edit). Also gives ``n`` and a 95% normal-approximation half-width per metric
    (``<metric>_ci95``)."""
    return summarize_metrics(records, COUNTERFACT_METRICS, exclude)
