"""Sequential editing experiments: a stream of CounterFact or zsRE edits in batches, scored, resumable.

Layout of an experiment folder ``out``::

    spec.json            what was asked (model, method, dataset, split, edits, batch size, overrides, evals)
    editor/              the editor's run directory (weights, state, recorded batches; see rlsedit.store)
    pre.json             per-case scores of the unedited model and their summary (after the stream)
    batches.json         the report of every applied batch (timings, residuals; RLSEdit: objective terms)
    checkpoints/N.json   scores after N edits (all edited cases so far, and the earliest ones)
    generation/pre.json  CounterFact fluency / consistency of the unedited model (spec.fluency cases)
    generation/N.json    the same after N edits: at each checkpoint, and where ``stop_after`` stopped a stream
    generation/post.json the same after the last batch
    capability/pre.json  general capability before editing (spec.capability), capability/N.json after N
    post.partial.jsonl   the post-edit scoring so far, in pieces of cases (removed once post.json is written)
    post.json            per-case scores after the last batch and their summary
    cases.jsonl          final per-case records
    results.json         final metrics, pre-edit metrics, capability, timings, the full config

Every file is written atomically and computed once; a killed run started again with the same arguments
resumes after the last committed batch. Files computed after the last batch (``post.json``,
``generation/post.json``, the last ``capability/N.json``) record the editor state they measured and are
recomputed if it changed.

Metrics: CounterFact ``efficacy``, ``generalization``, ``specificity`` (+ ``*_acc``; see
:mod:`rlsedit.eval.counterfact`) and ``fluency``, ``consistency`` (:mod:`rlsedit.eval.fluency`;
consistency is None without ROME's reference files); zsRE ``efficacy``, ``generalization``,
``specificity`` as token accuracies (:mod:`rlsedit.eval.zsre`).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlsedit.datasets import CounterFactCase, ZsreCase, superseded_cases
from rlsedit.memory import max_rss_bytes, rss_bytes
from rlsedit.replay import REPLAY_MISMATCH_FILE, REPLAY_RTOL, Replay, ReplayMismatch, machine
from rlsedit.runs import load_checkpoints, load_results, timing_sums
from rlsedit.store import RunStore, atomic_write_bytes, load_json, save_json
from rlsedit.tasks import get_task, task_names

__all__ = [
    "DATASETS",
    "ExperimentSpec",
    "evaluate_run",
    "load_checkpoints",
    "run_experiment",
    "summarize_cases",
    "unedited_records",
]

#: Datasets an experiment can stream (the registered tasks, :mod:`rlsedit.tasks`).
DATASETS = task_names()
#: Spec fields added after the first spec format, with the value an older spec.json stands for.
_LATER_FIELDS: dict[str, Any] = {
    "fluency": 100,
    "capability": None,
    "consistency_dir": None,
    "checkpoint_cases": 0,
    "targets": "dynamic",
}

log = logging.getLogger(__name__)

SPEC_FORMAT = "rlsedit-experiment/1"
#: How a run's targets are obtained (see ``ExperimentSpec.targets``).
TARGET_PROTOCOLS = ("dynamic", "static")


@dataclass
class ExperimentSpec:
    """What a sequential run does.

    Attributes:
        model: built-in name or path. method: editor name. dataset: ``"counterfact"`` or ``"zsre"`` (the
        valid zsRE cases; only the ``"test"`` split, which is all of them).
        split: ``"test"`` (held out), ``"tune"`` or ``"sweep"`` (test 10,000-18,999, then tune). edits:
        number of cases, taken in case_id order
        (after skipping ``offset``). batch_size: requests per batch. eval_every: score every this many
        edits (0: only at the end). overrides: editor config overrides. retention: sizes of the earliest
        slices re-scored at each checkpoint.
        fluency: CounterFact only: the number of cases (spread evenly over the stream, superseded ones
        left out) whose prompts are generated from for fluency and consistency, before and after editing
        (0: off).
        capability: general-capability settings (:class:`rlsedit.eval.capability.CapabilityConfig` as a
        dict; ``{}`` for the defaults), measured before editing, at each checkpoint and at the end; None:
        off.
        consistency_dir: a folder with ROME's consistency reference files (see
        :class:`rlsedit.eval.fluency.ConsistencyReference`); None: consistency is reported unavailable.
        checkpoint_cases: at a checkpoint, score this many of the cases edited so far (spread evenly over
        them, the latest batch's last case included) for the checkpoint's summary, plus the earliest
        ``retention`` slices in full; 0: every edited case (the cost of a checkpoint then grows with the
        stream: ~0.3 s per case for SmolLM2 on 2 CPU cores). The final scoring always covers every case.
        targets: "dynamic" (each batch's targets optimised on the model as edited so far, the papers'
            protocol) or "static" (read from a store optimised once on the unedited model, ``rlsedit
            targets``; the run is then given the store's folder).
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
    fluency: int = 100
    capability: dict[str, Any] | None = None
    consistency_dir: str | None = None
    checkpoint_cases: int = 0
    targets: str = "dynamic"

    def __post_init__(self) -> None:
        from rlsedit.editors.base import check_option_names, editor_class
        from rlsedit.eval.capability import CapabilityConfig

        # an unknown method or option is refused here, before a folder is written or the model loaded
        check_option_names(editor_class(self.method).config_class, self.overrides)
        get_task(self.dataset).check_split(self.split)
        if self.edits < 1 or self.batch_size < 1 or self.eval_every < 0 or self.offset < 0:
            raise ValueError("edits >= 1, batch_size >= 1, eval_every >= 0 and offset >= 0 are required")
        if self.fluency < 0:
            raise ValueError("fluency (a number of cases) must be >= 0")
        if self.checkpoint_cases < 0:
            raise ValueError("checkpoint_cases must be >= 0 (0: every edited case)")
        if self.targets not in TARGET_PROTOCOLS:
            raise ValueError(f"targets must be one of {TARGET_PROTOCOLS}, got {self.targets!r}")
        if not get_task(self.dataset).generation_metrics:
            self.fluency = 0  # fluency and consistency are measured where the task has them
            if self.consistency_dir is not None:
                raise ValueError(f"consistency_dir is not for {get_task(self.dataset).label}")
        if self.capability is not None:
            self.capability = CapabilityConfig(**self.capability).to_dict()

    def to_dict(self) -> dict[str, Any]:
        return {"format": SPEC_FORMAT, **asdict(self)}

    def matches(self, saved: dict[str, Any]) -> bool:
        """Whether a saved ``spec.json`` describes this experiment (a spec written before a field existed
        stands for that field's old behaviour, see ``_LATER_FIELDS``)."""
        return {**_LATER_FIELDS, **saved} == self.to_dict()


Case = CounterFactCase | ZsreCase


def _cases(spec: ExperimentSpec) -> list[Case]:
    cases: list[Case] = get_task(spec.dataset).cases(spec.split, spec.offset, spec.edits)
    if len(cases) < spec.edits:
        raise ValueError(
            f"{spec.dataset} ({spec.split}) has only {len(cases)} cases after offset {spec.offset}"
        )
    return cases


def _spread(cases: list[Case], k: int, skip: set) -> list[Case]:
    """``k`` cases spread evenly over ``cases`` (those in ``skip`` left out), in stream order."""
    pool = [c for c in cases if c.case_id not in skip]
    if k >= len(pool):
        return pool
    return [pool[i * len(pool) // k] for i in range(k)]


def _spread_indices(n: int, k: int) -> list[int]:
    """``min(k, n)`` distinct indices spread evenly over ``range(n)``, the first and the last included."""
    if k >= n:
        return list(range(n))
    if k == 1:
        return [n - 1]
    return [j * (n - 1) // (k - 1) for j in range(k)]


#: Version of the per-case scoring kept in a pre-edit score cache (bump when the scoring changes).
PRE_CACHE_FORMAT = 1


def unedited_records(
    model, tok, cases: list[Case], dataset: str, cache_dir: str | Path | None
) -> list[dict[str, Any]]:
    """Per-case records of the unedited ``model`` on ``cases``, in order; with ``cache_dir``, records of
    earlier runs on the same model (fingerprint) and dataset are reused and new ones appended there."""
    from rlsedit.models.load import model_fingerprint

    if cache_dir is None:
        return _records(model, tok, cases, dataset)
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
            recs = _records(model, tok, todo[start : start + 500], dataset)
            with path.open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
            known.update((r["case_id"], r) for r in recs)
    return [known[c.case_id] for c in cases]


class _Pace:
    """The editing pace of one invocation of a stream, for the remaining time its log lines give."""

    def __init__(self, end: int) -> None:
        self.end = end  # the edits this invocation stops at
        self.edits = 0
        self.seconds = 0.0

    def add(self, edits: int, seconds: float) -> None:
        self.edits += edits
        self.seconds += seconds

    def left(self, done: int) -> str:
        """``", ~N min of editing left"`` at ``done`` edits (empty before any timed chunk or at the end)."""
        if self.edits == 0 or done >= self.end:
            return ""
        return f", ~{(self.end - done) * self.seconds / self.edits / 60:.0f} min of editing left"


def _steps(b: Any) -> str:
    """A batch report's step timings as the editor named them (``total`` left out), and its residual where
    the editor measures one: ``"targets 140.2s keys 11.0s update 0.21s save 0.40s; residual 23.10 -> 4.20"``
    (FT: ``"finetune 450.3s keys 0.00s update 0.01s save 0.05s"``, no residual)."""
    steps = " ".join(
        f"{name} {sec:.2f}s" if sec < 1 else f"{name} {sec:.1f}s"
        for name, sec in b.timings.items()
        if name != "total"
    )
    if math.isfinite(b.residual_before) and math.isfinite(b.residual_after):
        steps += f"; residual {b.residual_before:.2f} -> {b.residual_after:.2f}"
    return steps


def _state_key(editor: Any) -> dict[str, Any]:
    """What identifies the editor's current state (for files computed after the last batch)."""
    last = editor.batches[-1] if editor.batches else None
    return {
        "batches": len(editor.batches),
        "last_hash": None if last is None else last["hash"],
        "active": int(editor.n_applied),
    }


def _once(path: Path, compute: Any, key: dict[str, Any] | None = None) -> dict[str, Any]:
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


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    atomic_write_bytes(path, data.encode())


def summarize_cases(dataset: str, records: list[dict[str, Any]], exclude: Any = ()) -> dict[str, Any]:
    """The dataset's summary (means, accuracies, intervals, ``n``) of per-case records, the cases in
    ``exclude`` (e.g. superseded ones) left out."""
    return _summarize(dataset, records, exclude)


def _summarize(dataset: str, records: list[dict[str, Any]], exclude: Any = ()) -> dict[str, Any]:
    return get_task(dataset).summarize(records, exclude)


def _records(model, tok, cases: list[Case], dataset: str) -> list[dict[str, Any]]:
    """Per-case scores of ``model`` on ``cases`` (the dataset's scorer)."""
    return get_task(dataset).score(model, tok, cases)


def _score(model, tok, cases: list[Case], exclude: set, dataset: str = "counterfact") -> dict[str, Any]:
    t0 = time.perf_counter()
    return _scored(dataset, _records(model, tok, cases, dataset), exclude, time.perf_counter() - t0)


#: Cases per piece of the final post-edit scoring (each piece is saved as it finishes).
SCORE_PIECE = 500


def _score_in_pieces(
    partial: Path,
    model,
    tok,
    cases: list[Case],
    exclude: set,
    dataset: str,
    key: dict[str, Any],
    piece: int = SCORE_PIECE,
) -> dict[str, Any]:
    """:func:`_score` of ``cases``, ``piece`` cases at a time, each piece appended to ``partial`` (JSON lines)
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
        new = _records(model, tok, cases[start : start + piece], dataset)
        took = time.perf_counter() - t0
        with partial.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"records": new, "seconds": took}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        recs.extend(new)
        seconds += took
        log.info("scored %d of %d cases (%.0f s)", len(recs), len(cases), seconds)
    return _scored(dataset, recs, exclude, seconds)


def _scored(dataset: str, recs: list[dict[str, Any]], exclude: set, seconds: float) -> dict[str, Any]:
    return {
        "summary": _summarize(dataset, recs, exclude),
        "superseded": _summarize(dataset, [r for r in recs if r["case_id"] in exclude]),
        "records": recs,
        "seconds": seconds,
    }


def _generation(model, tok, cases: list[Case], consistency_dir: str | None) -> dict[str, Any]:
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


def _generation_at(
    out: Path, done: int, editor: Any, model, tok, cases: list[Case], spec: ExperimentSpec
) -> dict[str, Any]:
    """``generation/<done>.json``: fluency / consistency of the model as it is after ``done`` edits (the
    same cases as ``generation/pre.json``), computed once for this editor state."""
    path = out / "generation" / f"{done:06d}.json"
    if not path.exists():
        log.info("generating after %d edits (%d cases)", done, len(cases))
    res = _once(
        path,
        lambda: {"edits": done, **_generation(model, tok, cases, spec.consistency_dir)},
        _state_key(editor),
    )
    log.info("fluency after %d edits: %s", done, _fmt({**res["summary"], "n": len(cases)}))
    return res


def _capability(model, tok, config: dict[str, Any]) -> dict[str, Any]:
    from rlsedit.eval.capability import evaluate_capability

    return evaluate_capability(model, tok, config)


def _objective(editor: Any) -> dict[str, Any] | None:
    """The editor's objective terms per layer (None for an editor without a stated objective)."""
    from rlsedit.editors.base import HasObjective

    if not isinstance(editor, HasObjective):
        return None
    return {str(layer): terms for layer, terms in editor.objective_terms().items()}


def _checkpoint(model, tok, spec: ExperimentSpec, edited: list[Case]) -> dict[str, Any]:
    """Scores after ``len(edited)`` edits: the summary over every edited case, or over
    ``spec.checkpoint_cases`` of them spread evenly, and each earliest ``retention`` slice in full."""
    done = len(edited)
    exclude = set(superseded_cases(edited))
    sizes = [size for size in spec.retention if size < done]
    sample = _spread_indices(done, spec.checkpoint_cases) if spec.checkpoint_cases else list(range(done))
    scored = sorted(set(sample) | set(range(max(sizes, default=0))))
    t0 = time.perf_counter()
    recs = _score(model, tok, [edited[i] for i in scored], exclude, spec.dataset)["records"]
    at = dict(zip(scored, recs, strict=True))
    return {
        "edits": done,
        "summary": _summarize(spec.dataset, [at[i] for i in sample], exclude),
        "summary_cases": len(sample),
        "retention": {
            str(size): _summarize(spec.dataset, [at[i] for i in range(size)], exclude) for size in sizes
        },
        "cases_scored": len(scored),
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
    pre_cache: str | Path | None = None,
    stop_after: int | None = None,
    replay_rtol: float = REPLAY_RTOL,
    static_targets: str | Path | None = None,
) -> dict[str, Any]:
    """Run (or resume) the experiment ``spec`` in folder ``out``; return the results dict.

    ``stop_after``: stop once this many edits are applied (and their checkpoint, if one falls there, is
    scored), leaving the run resumable; no final scoring is done, and the returned dict is then what
    :func:`rlsedit.runs.load_results` assembles of a run in progress (``"partial": True``, ``"post"`` the
    last checkpoint's summary, ``"edits"`` its edits) plus ``"stopped_after"``, the edits applied. A
    stream that is already further along is not rolled back: the call just stops before applying
    anything more.

    A folder holding a different spec is refused (start a new folder instead). ``targets_cache``: a
    folder where optimised targets are kept and reused for exactly the same model state and requests
    (several methods run on the same stream share their first batch's targets). The unedited model is
    scored on every case after the stream (on a fresh copy of the model), so that editing starts at once;
    ``pre_cache``: a folder keeping those per-case scores, shared by runs on the same model and dataset.

    A folder seeded with a recorded run's files but no editor state (what is committed of a run)
    replays the recorded batches first, each with the targets its record names, and refuses to go on
    past one whose report differs from the record by more than ``replay_rtol`` (relative); each replayed
    batch's largest difference is kept in :data:`REPLAY_FILE`.

    ``static_targets``: the folder of a :class:`rlsedit.locate.provider.StaticTargetStore` (``rlsedit
    targets``), required when ``spec.targets`` is "static" and refused otherwise. A store made for another
    model, last layer, templates or target settings, or lacking a request of the stream, is refused
    before anything is written.
    """
    from rlsedit.editors import load_editor, make_editor
    from rlsedit.editors.base import check_config, editor_class
    from rlsedit.locate.provider import StaticTargetStore, TargetProvider, target_settings
    from rlsedit.locate.templates import generate_context_templates
    from rlsedit.models.load import load_model

    out = Path(out)
    if (out / REPLAY_MISMATCH_FILE).is_file():
        raise ReplayMismatch(load_json(out / REPLAY_MISMATCH_FILE)["message"])
    if stop_after is not None and stop_after < 0:
        raise ValueError(f"stop_after must be >= 0, got {stop_after}")
    # bad input is refused before anything is written: too few cases, another experiment in the folder,
    # settings the model cannot take (layers it lacks, values out of range)
    cases = _cases(spec)
    spec_path = out / "spec.json"
    if spec_path.exists():
        old = load_json(spec_path)
        if not spec.matches(old):
            raise ValueError(f"{out} holds a different experiment ({old}); use a new folder")
    if (spec.targets == "static") != (static_targets is not None):
        raise ValueError(
            "a static-target run needs the store's folder (--static-targets DIR); only such a run takes one"
        )
    if spec.targets == "static" and not editor_class(spec.method).uses_targets:
        raise ValueError(f"{spec.method} optimises no targets: it cannot read static ones")
    static = None if static_targets is None else StaticTargetStore(static_targets)
    superseded = set(superseded_cases(cases))
    t_load = time.perf_counter()
    model, tok = load_model(spec.model, device=device, dtype=dtype)
    log.info("model %s loaded in %.1fs", spec.model, time.perf_counter() - t_load)
    config = check_config(spec.method, model, spec.overrides)
    # the edits this call applies: a stop falls at the end of the chunk that reaches stop_after
    end = (
        len(cases)
        if stop_after is None
        else min(len(cases), -(-stop_after // spec.batch_size) * spec.batch_size)
    )
    if static is not None:
        templates = generate_context_templates(
            model, tok, n=config.n_templates, length=config.template_length, seed=config.seed
        )
        # only the requests this call applies (a later call with a larger stop_after checks its own)
        static.check(
            model,
            target_settings(config.layers[-1], templates, config.targets),
            [c.request for c in cases[:end]],
        )
    out.mkdir(parents=True, exist_ok=True)
    if not spec_path.exists():
        save_json(spec_path, spec.to_dict())
    if command is not None:  # every invocation of the folder (a run in progress has no results.json yet)
        inv_path = out / "invocations.json"
        save_json(inv_path, [*(load_json(inv_path) if inv_path.exists() else []), command])

    gen_cases = _spread(cases, spec.fluency, superseded) if spec.fluency else []
    gen_pre = None
    if gen_cases:
        log.info("generating from the unedited model (%d cases)", len(gen_cases))
        gen_pre = _once(
            out / "generation" / "pre.json", lambda: _generation(model, tok, gen_cases, spec.consistency_dir)
        )
    capability: dict[str, Any] = {}
    if spec.capability is not None:
        log.info("general capability of the unedited model")
        cap_cfg = spec.capability
        capability["pre"] = _once(out / "capability" / "pre.json", lambda: _capability(model, tok, cap_cfg))

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
        editor.use_targets(TargetProvider(cache_dir=targets_cache, static=static))
        batches_path = out / "batches.json"
        reports: list[dict[str, Any]] = load_json(batches_path) if batches_path.exists() else []
        (out / "checkpoints").mkdir(exist_ok=True)
        chunks = [cases[i : i + spec.batch_size] for i in range(0, len(cases), spec.batch_size)]
        # batches recorded in batches.json that the editor's state does not hold: a folder seeded with a
        # recorded run's files (no editor/) replays them and checks each against its record
        replay = Replay(out, reports, len(editor.batches), command, replay_rtol, len(cases))
        here = machine()  # each batch applied now says where (a stream carried across machines mixes them)
        done = 0
        stopped_at: int | None = None  # the index of the first chunk not applied, if stopped
        pace = _Pace(end)
        for k, chunk in enumerate(chunks):
            if stop_after is not None and done >= stop_after:
                stopped_at = k
                break
            replaying = k in replay  # this chunk's batch is in batches.json, but not in the editor's state
            keys = replay.target_keys(k, targets_cache) if static is None else None
            with editor.targets_provider.recorded(keys):
                rep = editor.edit([c.request for c in chunk])
            done += len(chunk)
            if rep.batches and not replaying:  # applied now (a resumed run skips the chunks applied before)
                pace.add(len(chunk), rep.seconds())
            objective = _objective(editor) if rep.batches else None
            for b in rep.batches:
                entry = {"chunk": k, "edits_after": done, **b.to_dict()}
                entry["memory"] = {"rss_bytes": rss_bytes(), "max_rss_bytes": max_rss_bytes()}
                if objective is not None:
                    entry["objective"] = objective
                if replaying:
                    replay.check(k, entry)
                    continue
                entry["machine"] = here
                reports.append(entry)
                save_json(batches_path, reports)
                log.info(
                    "batch %d (%d of %d edits%s): %s",
                    b.batch_id,
                    done,
                    len(cases),
                    pace.left(done),
                    _steps(b),
                )
            ck = out / "checkpoints" / f"{done:06d}.json"
            at_checkpoint = spec.eval_every and done % spec.eval_every == 0 and done < len(cases)
            # the model holds exactly the first `done` edits only right after this chunk's batch
            at_head = len(editor.batches) == k + 1
            if at_checkpoint and not ck.exists() and at_head:
                scores = _checkpoint(model, tok, spec, cases[:done])
                save_json(ck, scores)
                log.info("checkpoint at %d edits: %s", done, _fmt(scores["summary"]))
            if at_checkpoint and gen_cases and at_head:
                _generation_at(out, done, editor, model, tok, gen_cases, spec)
            cap_ck = out / "capability" / f"{done:06d}.json"
            if at_checkpoint and spec.capability is not None and not cap_ck.exists() and at_head:
                log.info("general capability after %d edits", done)
                save_json(cap_ck, {"edits": done, **_capability(model, tok, spec.capability)})
    replay.close()
    if stopped_at is not None:
        if gen_cases and len(editor.batches) == stopped_at:  # the model holds exactly the first `done` edits
            _generation_at(out, done, editor, model, tok, gen_cases, spec)
        log.info(
            "stopped after %d of %d edits (%d batches applied); the same command resumes the run",
            done,
            len(cases),
            len(editor.batches),
        )
        return {**load_results(out, partial=True), "stopped_after": done}

    key = _state_key(editor)
    log.info("scoring the edited model on %d cases", len(cases))
    partial = out / "post.partial.jsonl"
    post = _once(
        out / "post.json",
        lambda: _score_in_pieces(partial, model, tok, cases, superseded, spec.dataset, key),
        key,
    )
    partial.unlink(missing_ok=True)
    gen_post = None
    if gen_cases:
        log.info("generating from the edited model (%d cases)", len(gen_cases))
        gen_post = _once(
            out / "generation" / "post.json",
            lambda: _generation(model, tok, gen_cases, spec.consistency_dir),
            key,
        )
    if spec.capability is not None:
        log.info("general capability after %d edits", len(cases))
        cap_cfg = spec.capability
        capability["post"] = _once(
            out / "capability" / f"{len(cases):06d}.json",
            lambda: {"edits": len(cases), **_capability(model, tok, cap_cfg)},
            key,
        )
        capability["checkpoints"] = [
            load_json(p) for p in sorted((out / "capability").glob("[0-9]*.json")) if int(p.stem) < len(cases)
        ]
    config = editor.config.to_dict()
    pre_path = out / "pre.json"
    if pre_path.exists():
        pre = load_json(pre_path)
    else:
        del editor, model  # the unedited model is scored on a fresh copy: free the edited one first
        gc.collect()
        log.info("scoring the unedited model on %d cases (a fresh copy of it)", len(cases))
        model0, tok0 = load_model(spec.model, device=device, dtype=dtype)
        t0 = time.perf_counter()
        recs = unedited_records(model0, tok0, cases, spec.dataset, pre_cache)
        pre = _scored(spec.dataset, recs, superseded, time.perf_counter() - t0)
        save_json(pre_path, pre)
        del model0
    pre_summary, post_summary = dict(pre["summary"]), dict(post["summary"])
    if gen_pre is not None and gen_post is not None:
        pre_summary.update(gen_pre["summary"])
        post_summary.update(gen_post["summary"])
    _write_jsonl(
        out / "cases.jsonl",
        [
            {"case_id": a["case_id"], "pre": a, "post": b, "superseded": a["case_id"] in superseded}
            for a, b in zip(pre["records"], post["records"], strict=True)
        ],
    )
    checkpoints = load_checkpoints(out)
    timings, n_timed = timing_sums(reports)
    computed_sums, n_computed = timing_sums(reports, skip_cached_targets=spec.targets == "dynamic")
    if command is None and (out / "results.json").exists():
        command = load_json(out / "results.json").get("command")
    results = {
        "spec": spec.to_dict(),
        "command": command,
        "config": config,
        "edits": len(cases),
        "superseded_cases": sorted(superseded),
        "pre": pre_summary,
        "post": post_summary,
        "post_superseded": post["superseded"],
        # the earliest edits at the end of the stream, as at each checkpoint (and the unedited model's)
        "retention": _retention(spec, post["records"], superseded),
        "pre_retention": _retention(spec, pre["records"], superseded),
        "checkpoints": checkpoints,
        "capability": capability or None,
        "timings": {
            "seconds": timings,
            "per_edit": {k: v / n_timed for k, v in timings.items()} if n_timed else {},
            "edits_timed": n_timed,
            "per_edit_targets_computed": (
                {k: v / n_computed for k, v in computed_sums.items()} if n_computed else {}
            ),
            "edits_targets_computed": n_computed,
            "note": "timings cover the batches applied by the invocations that produced batches.json; "
            "per_edit_targets_computed leaves out batches whose targets came from --targets-cache",
        },
        "batches": reports,
    }
    save_json(out / "results.json", results)
    log.info("pre-edit:  %s", _fmt(pre_summary))
    log.info("post-edit: %s", _fmt(post_summary))
    return results


def _retention(spec: ExperimentSpec, records: list[dict[str, Any]], exclude: set) -> dict[str, Any]:
    """Summaries of the earliest ``spec.retention`` slices of a stream's per-case ``records`` (in stream
    order), ``exclude`` left out; slices as long as the stream or longer are skipped, as at checkpoints."""
    return {
        str(size): _summarize(spec.dataset, records[:size], exclude)
        for size in spec.retention
        if size < len(records)
    }


def _fmt(summary: dict[str, Any]) -> str:
    keys = ("efficacy", "generalization", "specificity", "fluency", "consistency")
    return ", ".join(f"{k} {summary[k]:.1f}" for k in keys if summary.get(k) is not None) + (
        f" (n={summary.get('n')})"
    )


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
        out["objective"] = _objective(editor)
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
        res = _score(model, tokenizer, cases, exclude, dataset)
        out.update(summary=res["summary"], excluded=sorted(exclude, key=str), records=res["records"])
        if fluency:
            gen = _generation(model, tokenizer, _spread(cases, fluency, exclude), consistency_dir)
            out["generation"] = gen
            out["summary"] = {**res["summary"], **gen["summary"]}
    if capability is not None:
        out["capability"] = _capability(model, tokenizer, capability)
    return out
