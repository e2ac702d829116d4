"""Sequential editing experiments: a stream of CounterFact edits in batches, scored, resumable.

Layout of an experiment folder ``out``::

    spec.json            what was asked (model, method, dataset, split, edits, batch size, overrides)
    editor/              the editor's run directory (weights, state, recorded batches; see rlsedit.store)
    pre.json             per-case scores of the unedited model and their summary
    batches.json         the report of every applied batch (timings, residuals)
    checkpoints/N.json   scores after N edits (all edited cases so far, and the earliest ones)
    cases.jsonl          final per-case records
    results.json         final metrics, pre-edit metrics, timings, the full config

Every file is written atomically; a killed run started again with the same arguments resumes after the
last committed batch.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlsedit.datasets import CounterFactCase, load_counterfact, superseded_cases
from rlsedit.eval.counterfact import score_counterfact, summarize_counterfact
from rlsedit.store import RunStore, atomic_write_bytes, load_json, save_json

__all__ = ["ExperimentSpec", "run_experiment"]

log = logging.getLogger(__name__)

SPEC_FORMAT = "rlsedit-experiment/1"


@dataclass
class ExperimentSpec:
    """What a sequential run does.

    Attributes:
        model: built-in name or path. method: editor name. dataset: only ``"counterfact"`` so far.
        split: ``"test"`` (held out) or ``"tune"``. edits: number of cases, taken in case_id order
        (after skipping ``offset``). batch_size: requests per batch. eval_every: score every this many
        edits (0: only at the end). overrides: editor config overrides. retention: sizes of the earliest
        slices re-scored at each checkpoint.
    """

    model: str = "smollm2-135m"
    method: str = "rlsedit"
    dataset: str = "counterfact"
    split: str = "test"
    edits: int = 200
    offset: int = 0
    batch_size: int = 100
    eval_every: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)
    retention: list[int] = field(default_factory=lambda: [100, 1000])

    def __post_init__(self) -> None:
        if self.dataset != "counterfact":
            raise ValueError(f"dataset {self.dataset!r} is not supported yet (only 'counterfact')")
        if self.edits < 1 or self.batch_size < 1 or self.eval_every < 0 or self.offset < 0:
            raise ValueError("edits >= 1, batch_size >= 1, eval_every >= 0 and offset >= 0 are required")

    def to_dict(self) -> dict[str, Any]:
        return {"format": SPEC_FORMAT, **asdict(self)}


def _cases(spec: ExperimentSpec) -> list[CounterFactCase]:
    cases = load_counterfact(split=spec.split, limit=spec.offset + spec.edits)[spec.offset :]
    if len(cases) < spec.edits:
        raise ValueError(f"the {spec.split} split has only {len(cases)} cases after offset {spec.offset}")
    return cases


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    atomic_write_bytes(path, data.encode())


def _score(model, tok, cases: list[CounterFactCase], exclude: set) -> dict[str, Any]:
    t0 = time.perf_counter()
    recs = score_counterfact(model, tok, cases)
    return {
        "summary": summarize_counterfact(recs, exclude=exclude),
        "superseded": summarize_counterfact([r for r in recs if r["case_id"] in exclude]),
        "records": recs,
        "seconds": time.perf_counter() - t0,
    }


def run_experiment(
    spec: ExperimentSpec,
    out: str | Path,
    *,
    device: str | None = None,
    dtype: str | None = None,
    stats_dir: str | Path | None = None,
    command: str | None = None,
    targets_cache: str | Path | None = None,
) -> dict[str, Any]:
    """Run (or resume) the experiment ``spec`` in folder ``out``; return the results dict.

    A folder holding a different spec is refused (start a new folder instead). ``targets_cache``: a
    folder where optimised targets are kept and reused for exactly the same model state and requests
    (several methods run on the same stream share their first batch's targets).
    """
    from rlsedit.editors import load_editor, make_editor
    from rlsedit.models.load import load_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / "spec.json"
    if spec_path.exists():
        old = load_json(spec_path)
        if old != spec.to_dict():
            raise ValueError(f"{out} holds a different experiment ({old}); use a new folder")
    else:
        save_json(spec_path, spec.to_dict())
    cases = _cases(spec)
    superseded = set(superseded_cases(cases))
    t_load = time.perf_counter()
    model, tok = load_model(spec.model, device=device, dtype=dtype)
    log.info("model %s loaded in %.1fs", spec.model, time.perf_counter() - t_load)

    pre_path = out / "pre.json"
    if pre_path.exists():
        pre = load_json(pre_path)
    else:
        log.info("scoring the unedited model on %d cases", len(cases))
        pre = _score(model, tok, cases, superseded)
        save_json(pre_path, pre)

    editor_dir = out / "editor"
    store = RunStore(editor_dir)
    with store.lock():
        if store.load_manifest() is not None:
            editor = load_editor(store, model, tok)  # this store: it holds the lock
            log.info("resuming: %d batches already applied", len(editor.batches))
        else:
            t0 = time.perf_counter()
            editor = make_editor(spec.method, model, tok, stats_dir=stats_dir, **spec.overrides)
            editor.load_name = spec.model
            editor.attach(store)
            log.info("editor ready in %.1fs", time.perf_counter() - t0)
        editor.targets_cache = targets_cache
        batches_path = out / "batches.json"
        reports: list[dict[str, Any]] = load_json(batches_path) if batches_path.exists() else []
        (out / "checkpoints").mkdir(exist_ok=True)
        chunks = [cases[i : i + spec.batch_size] for i in range(0, len(cases), spec.batch_size)]
        done = 0
        for k, chunk in enumerate(chunks):
            rep = editor.edit([c.request for c in chunk])
            done += len(chunk)
            for b in rep.batches:
                reports.append({"chunk": k, "edits_after": done, **b.to_dict()})
                save_json(batches_path, reports)
                log.info(
                    "batch %d (%d edits): targets %.1fs keys %.1fs update %.2fs; residual %.2f -> %.2f",
                    b.batch_id,
                    done,
                    b.timings.get("targets", 0.0),
                    b.timings.get("keys", 0.0),
                    b.timings.get("update", 0.0),
                    b.residual_before,
                    b.residual_after,
                )
            ck = out / "checkpoints" / f"{done:06d}.json"
            at_checkpoint = spec.eval_every and done % spec.eval_every == 0 and done < len(cases)
            if at_checkpoint and not ck.exists():
                edited = cases[:done]
                exclude = set(superseded_cases(edited))
                res = _score(model, tok, edited, exclude)
                retention = {}
                for size in spec.retention:
                    if size < done:
                        retention[str(size)] = summarize_counterfact(res["records"][:size], exclude)
                save_json(ck, {"edits": done, "summary": res["summary"], "retention": retention})
                log.info("checkpoint at %d edits: %s", done, _fmt(res["summary"]))

    log.info("scoring the edited model on %d cases", len(cases))
    post = _score(model, tok, cases, superseded)
    _write_jsonl(
        out / "cases.jsonl",
        [
            {"case_id": a["case_id"], "pre": a, "post": b, "superseded": a["case_id"] in superseded}
            for a, b in zip(pre["records"], post["records"], strict=True)
        ],
    )
    checkpoints = [load_json(p) for p in sorted((out / "checkpoints").glob("*.json"))]
    timings: dict[str, float] = {}
    for r in reports:
        for key, v in r.get("timings", {}).items():
            timings[key] = timings.get(key, 0.0) + float(v)
    n_timed = sum(int(r["n_requests"]) for r in reports)
    if command is None and (out / "results.json").exists():
        command = load_json(out / "results.json").get("command")
    results = {
        "spec": spec.to_dict(),
        "command": command,
        "config": editor.config.to_dict(),
        "edits": len(cases),
        "superseded_cases": sorted(superseded),
        "pre": pre["summary"],
        "post": post["summary"],
        "post_superseded": post["superseded"],
        "checkpoints": checkpoints,
        "timings": {
            "seconds": timings,
            "per_edit": {k: v / n_timed for k, v in timings.items()} if n_timed else {},
            "edits_timed": n_timed,
            "note": "timings cover the batches applied by the invocations that produced batches.json",
        },
        "batches": reports,
    }
    save_json(out / "results.json", results)
    log.info("pre-edit:  %s", _fmt(pre["summary"]))
    log.info("post-edit: %s", _fmt(post["summary"]))
    return results


def _fmt(summary: dict[str, Any]) -> str:
    keys = ("efficacy", "generalization", "specificity")
    return ", ".join(f"{k} {summary[k]:.1f}" for k in keys if summary.get(k) is not None) + (
        f" (n={summary.get('n')})"
    )
