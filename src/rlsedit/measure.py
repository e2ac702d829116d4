"""What an experiment measures, and the files it computes once.

Per-case scores of a registered task (:mod:`rlsedit.tasks`) and their summaries, the final scoring in
resumable pieces, checkpoints (a spread sample of the edited cases plus the earliest slices), fluency and
consistency from generations, general capability, an editor's objective terms, and :func:`once`: a file
computed once (for one editor state) and read back after. :mod:`rlsedit.experiment` drives them over a
stream; ``rlsedit eval`` over a saved run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from rlsedit.datasets import superseded_cases
from rlsedit.store import atomic_write_bytes, load_json, save_json
from rlsedit.tasks import get_task

__all__ = [
    "PRE_CACHE_FORMAT",
    "SCORE_PIECE",
    "capability",
    "checkpoint",
    "fmt",
    "generation",
    "generation_at",
    "objective",
    "once",
    "records",
    "retention",
    "score",
    "score_in_pieces",
    "scored",
    "spread",
    "spread_indices",
    "state_key",
    "summarize",
    "summarize_cases",
    "unedited_records",
    "write_jsonl",
]

log = logging.getLogger(__name__)


def spread(cases: list[Any], k: int, skip: set) -> list[Any]:
    """``k`` cases spread evenly over ``cases`` (those in ``skip`` left out), in stream order."""
    pool = [c for c in cases if c.case_id not in skip]
    if k >= len(pool):
        return pool
    return [pool[i * len(pool) // k] for i in range(k)]


def spread_indices(n: int, k: int) -> list[int]:
    """``min(k, n)`` distinct indices spread evenly over ``range(n)``, the first and the last included."""
    if k >= n:
        return list(range(n))
    if k == 1:
        return [n - 1]
    return [j * (n - 1) // (k - 1) for j in range(k)]


#: Version of the per-case scoring kept in a pre-edit score cache (bump when the scoring changes).
PRE_CACHE_FORMAT = 1


def unedited_records(
    model, tok, cases: list[Any], dataset: str, cache_dir: str | Path | None
) -> list[dict[str, Any]]:
    """Per-case records of the unedited ``model`` on ``cases``, in order; with ``cache_dir``, records of
    earlier runs on the same model (fingerprint) and dataset are reused and new ones appended there."""
    from rlsedit.models.load import model_fingerprint

    if cache_dir is None:
        return records(model, tok, cases, dataset)
    path = Path(cache_dir) / f"pre-{model_fingerprint(model)}-{dataset}-v{PRE_CACHE_FORMAT}.jsonl"
    known: dict[Any, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():  # a torn last line (a crash while appending) is skipped and re-scored
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                known[rec["case_id"]] = rec
    todo = [c for c in cases if c.case_id not in known]
    log.info("pre-edit scores: %d of %d cases from %s", len(cases) - len(todo), len(cases), path)
    if todo:
        path.parent.mkdir(parents=True, exist_ok=True)
        for start in range(0, len(todo), 500):  # appended in pieces: an interrupted scoring keeps its work
            recs = records(model, tok, todo[start : start + 500], dataset)
            with path.open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
            known.update((r["case_id"], r) for r in recs)
    return [known[c.case_id] for c in cases]


def state_key(editor: Any) -> dict[str, Any]:
    """What identifies the editor's current state (for files computed after the last batch)."""
    last = editor.batches[-1] if editor.batches else None
    return {
        "batches": len(editor.batches),
        "last_hash": None if last is None else last["hash"],
        "active": int(editor.n_applied),
    }


def once(path: Path, compute: Any, key: dict[str, Any] | None = None) -> dict[str, Any]:
    """``path``'s content if it exists (and, with ``key``, was computed for that state); else compute it,
    save it atomically and return it."""
    if path.exists():
        saved = load_json(path)
        if key is None or saved.get("state") == key:
            return saved
        log.info("%s was computed for another editor state; recomputing", path.name)
    res = compute()
    if key is not None:
        res = {**res, "state": key}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_json(path, res)
    return res


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    atomic_write_bytes(path, data.encode())


def summarize_cases(dataset: str, records: list[dict[str, Any]], exclude: Any = ()) -> dict[str, Any]:
    """The dataset's summary (means, accuracies, intervals, ``n``) of per-case records, the cases in
    ``exclude`` (e.g. superseded ones) left out."""
    return summarize(dataset, records, exclude)


def summarize(dataset: str, records: list[dict[str, Any]], exclude: Any = ()) -> dict[str, Any]:
    return get_task(dataset).summarize(records, exclude)


def records(model, tok, cases: list[Any], dataset: str) -> list[dict[str, Any]]:
    """Per-case scores of ``model`` on ``cases`` (the dataset's scorer)."""
    return get_task(dataset).score(model, tok, cases)


def score(model, tok, cases: list[Any], exclude: set, dataset: str = "counterfact") -> dict[str, Any]:
    t0 = time.perf_counter()
    return scored(dataset, records(model, tok, cases, dataset), exclude, time.perf_counter() - t0)


#: Cases per piece of the final post-edit scoring (each piece is saved as it finishes).
SCORE_PIECE = 500


def score_in_pieces(
    partial: Path,
    model,
    tok,
    cases: list[Any],
    exclude: set,
    dataset: str,
    key: dict[str, Any],
    piece: int = SCORE_PIECE,
) -> dict[str, Any]:
    """:func:`score` of ``cases``, ``piece`` cases at a time, each piece appended to ``partial`` (JSON lines)
    as it finishes: scoring 10,000 CounterFact cases takes ~18 min for SmolLM2-135M on 2 CPU cores, and an
    interrupted one resumes after its last saved piece. The first line records the editor state (``key``)
    and the cases; pieces saved for another state or other cases are discarded, a torn last line is
    scored again."""
    head = {"state": key, "dataset": dataset, "case_ids": [c.case_id for c in cases]}
    rows: list[dict[str, Any]] = []
    if partial.exists():
        for line in partial.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a crash while appending: this piece is scored again
        if rows and rows[0] != head:
            log.info("%s was written for another editor state or other cases; starting again", partial.name)
            rows = []
    rows = rows or [head]
    # rewritten whole (without a torn tail), so the next piece starts on a line of its own
    atomic_write_bytes(partial, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    recs = [rec for row in rows[1:] for rec in row["records"]]
    seconds = sum(row["seconds"] for row in rows[1:])
    if recs:
        log.info("%s: %d of %d cases already scored", partial.name, len(recs), len(cases))
    for start in range(len(recs), len(cases), piece):
        t0 = time.perf_counter()
        new = records(model, tok, cases[start : start + piece], dataset)
        took = time.perf_counter() - t0
        with partial.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"records": new, "seconds": took}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        recs.extend(new)
        seconds += took
        log.info("scored %d of %d cases (%.0f s)", len(recs), len(cases), seconds)
    return scored(dataset, recs, exclude, seconds)


def scored(dataset: str, recs: list[dict[str, Any]], exclude: set, seconds: float) -> dict[str, Any]:
    return {
        "summary": summarize(dataset, recs, exclude),
        "superseded": summarize(dataset, [r for r in recs if r["case_id"] in exclude]),
        "records": recs,
        "seconds": seconds,
    }


def generation(model, tok, cases: list[Any], consistency_dir: str | None) -> dict[str, Any]:
    """Fluency / consistency records and summary of CounterFact ``cases``."""
    from rlsedit.eval.fluency import ConsistencyReference, score_generation, summarize_generation

    t0 = time.perf_counter()
    ref = ConsistencyReference.load(consistency_dir) if consistency_dir else None
    recs = score_generation(model, tok, cases, reference=ref)
    return {
        "summary": summarize_generation(recs, reference=ref is not None),
        "records": recs,
        "seconds": time.perf_counter() - t0,
    }


def generation_at(
    out: Path, done: int, editor: Any, model, tok, cases: list[Any], spec: Any
) -> dict[str, Any]:
    """``generation/<done>.json``: fluency / consistency of the model as it is after ``done`` edits (the
    same cases as ``generation/pre.json``), computed once for this editor state."""
    path = out / "generation" / f"{done:06d}.json"
    if not path.exists():
        log.info("generating after %d edits (%d cases)", done, len(cases))
    res = once(
        path,
        lambda: {"edits": done, **generation(model, tok, cases, spec.consistency_dir)},
        state_key(editor),
    )
    log.info("fluency after %d edits: %s", done, fmt({**res["summary"], "n": len(cases)}))
    return res


def capability(model, tok, config: dict[str, Any]) -> dict[str, Any]:
    from rlsedit.eval.capability import evaluate_capability

    return evaluate_capability(model, tok, config)


def objective(editor: Any) -> dict[str, Any] | None:
    """The editor's objective terms per layer (None for an editor without a stated objective)."""
    from rlsedit.editors.base import HasObjective

    if not isinstance(editor, HasObjective):
        return None
    return {str(layer): terms for layer, terms in editor.objective_terms().items()}


def checkpoint(model, tok, spec: Any, edited: list[Any]) -> dict[str, Any]:
    """Scores after ``len(edited)`` edits: the summary over every edited case, or over
    ``spec.checkpoint_cases`` of them spread evenly, and each earliest ``retention`` slice in full."""
    done = len(edited)
    exclude = set(superseded_cases(edited))
    sizes = [size for size in spec.retention if size < done]
    sample = spread_indices(done, spec.checkpoint_cases) if spec.checkpoint_cases else list(range(done))
    scored = sorted(set(sample) | set(range(max(sizes, default=0))))
    t0 = time.perf_counter()
    recs = score(model, tok, [edited[i] for i in scored], exclude, spec.dataset)["records"]
    at = dict(zip(scored, recs, strict=True))
    return {
        "edits": done,
        "summary": summarize(spec.dataset, [at[i] for i in sample], exclude),
        "summary_cases": len(sample),
        "retention": {
            str(size): summarize(spec.dataset, [at[i] for i in range(size)], exclude) for size in sizes
        },
        "cases_scored": len(scored),
        "seconds": time.perf_counter() - t0,
    }


def retention(spec: Any, records: list[dict[str, Any]], exclude: set) -> dict[str, Any]:
    """Summaries of the earliest ``spec.retention`` slices of a stream's per-case ``records`` (in stream
    order), ``exclude`` left out; slices as long as the stream or longer are skipped, as at checkpoints."""
    return {
        str(size): summarize(spec.dataset, records[:size], exclude)
        for size in spec.retention
        if size < len(records)
    }


def fmt(summary: dict[str, Any]) -> str:
    keys = ("efficacy", "generalization", "specificity", "fluency", "consistency")
    return ", ".join(f"{k} {summary[k]:.1f}" for k in keys if summary.get(k) is not None) + (
        f" (n={summary.get('n')})"
    )
