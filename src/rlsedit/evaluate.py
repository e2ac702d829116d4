"""``rlsedit eval``: score the edited state saved in a run directory (it is only read)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rlsedit import measure
from rlsedit.datasets import CounterFactCase, ZsreCase, superseded_cases
from rlsedit.tasks import get_task

__all__ = ["evaluate_run"]

log = logging.getLogger(__name__)

Case = CounterFactCase | ZsreCase


def _run_cases(editor: Any, dataset: str) -> tuple[list[Case], set]:
    """The dataset cases edited in ``editor``'s run (matched by the requests' ``case_id``, in run order)
    and the case ids to leave out of summaries: superseded by a later request of the run, or whose last
    request is no longer active (retracted)."""
    pool: dict[Any, Case] = {c.case_id: c for c in get_task(dataset).every_case()}
    order: list[Any] = []
    last_active: dict[Any, bool] = {}
    for b in editor.batches:
        for j, rd in enumerate(b["requests"]):
            cid = rd.get("case_id")
            if cid is None:
                continue
            if cid not in last_active:
                order.append(cid)
            last_active[cid] = bool(b["active"][j])
    if not order:
        raise ValueError("the run's requests carry no case_id: choose the cases with limit (and offset)")
    missing = [cid for cid in order if cid not in pool]
    if missing:
        raise ValueError(f"{len(missing)} case id(s) of the run are not in {dataset} (e.g. {missing[:5]})")
    cases = [pool[cid] for cid in order]
    exclude = set(superseded_cases(cases)) | {cid for cid, a in last_active.items() if not a}
    return cases, exclude


def evaluate_run(
    run: str | Path,
    model: Any,
    tokenizer: Any,
    *,
    dataset: str | None = None,
    split: str = "test",
    offset: int = 0,
    limit: int | None = None,
    fluency: int = 0,
    consistency_dir: str | None = None,
    capability: dict[str, Any] | None = None,
    objective: bool = False,
    unedited: bool = False,
) -> dict[str, Any]:
    """Score the edited state saved in ``run`` (a directory of ``rlsedit edit`` or an experiment's
    ``editor/``); ``model`` must be the base model (or the run's edited state). The run is only read.

    Args:
        dataset: ``"counterfact"`` or ``"zsre"`` to score edit cases; None: none.
        split / offset / limit: with ``limit``, score the first ``limit`` cases of ``split`` after
            ``offset``; without, the cases the run edited (by the requests' ``case_id``), leaving cases
            superseded or retracted in the run out of the summary.
        fluency: CounterFact: generate from this many cases (spread evenly) for fluency / consistency.
        consistency_dir: ROME's consistency reference files (else consistency is reported unavailable).
        capability: general-capability settings (a ``CapabilityConfig`` dict; ``{}``: defaults); None: off.
        objective: RLSEdit: the objective's terms per layer.
        unedited: score the base model instead (the run's edited weights are replaced by ``W_0``).

    Returns:
        ``{"run", "method", "requests_active", "unedited", "dataset", "summary", "excluded", "records",
        "generation", "capability", "objective"}`` (absent parts None).
    """
    import torch

    from rlsedit.editors import load_editor
    from rlsedit.models.arch import get_module, weight_kv

    task = None if dataset is None else get_task(dataset)
    if fluency and (task is None or not task.generation_metrics):
        raise ValueError("fluency is measured on CounterFact cases: pass dataset='counterfact'")
    editor = load_editor(run, model, tokenizer, attach=False)
    out: dict[str, Any] = {
        "run": str(run),
        "method": editor.name,
        "requests_active": int(editor.n_applied),
        "unedited": unedited,
        "dataset": dataset,
        "summary": None,
        "excluded": [],
        "records": None,
        "generation": None,
        "capability": None,
        "objective": None,
    }
    if objective:
        out["objective"] = measure.objective(editor)
    if unedited:
        with torch.no_grad():
            for layer, name in editor.modules.items():
                w = weight_kv(get_module(model, name))
                w.copy_(editor.W0[layer].to(device=w.device, dtype=w.dtype))
    if dataset is not None:
        if limit is not None:
            assert task is not None
            cases: list[Case] = task.cases(split, offset, limit)
            exclude: set = set()
        else:
            cases, exclude = _run_cases(editor, dataset)
        log.info("scoring %d %s cases", len(cases), dataset)
        res = measure.score(model, tokenizer, cases, exclude, dataset)
        out.update(summary=res["summary"], excluded=sorted(exclude, key=str), records=res["records"])
        if fluency:
            gen = measure.generation(
                model, tokenizer, measure.spread(cases, fluency, exclude), consistency_dir
            )
            out["generation"] = gen
            out["summary"] = {**res["summary"], **gen["summary"]}
    if capability is not None:
        out["capability"] = measure.capability(model, tokenizer, capability)
    return out
