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
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlsedit import measure
from rlsedit.datasets import CounterFactCase, ZsreCase, superseded_cases
from rlsedit.measure import summarize_cases, unedited_records
from rlsedit.memory import max_rss_bytes, rss_bytes
from rlsedit.replay import REPLAY_MISMATCH_FILE, REPLAY_RTOL, Replay, ReplayMismatch, machine
from rlsedit.runs import load_checkpoints, load_results, timing_sums
from rlsedit.store import RunStore, load_json, save_json
from rlsedit.tasks import get_task, task_names

__all__ = [
    "DATASETS",
    "ExperimentSpec",
    "load_checkpoints",
    "run_experiment",
    "summarize_cases",
    "unedited_records",
]

#: Datasets an experiment can stream (the registered tasks, :mod:`rlsedit.tasks`).
DATASETS = task_names()

log = logging.getLogger(__name__)

SPEC_FORMAT = "rlsedit-experiment/2"
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
        """Whether a saved ``spec.json`` describes this experiment (ValueError for a spec of an older
        format: ``scripts/migrate_runs.py`` upgrades it)."""
        if saved.get("format") != SPEC_FORMAT:
            raise ValueError(
                f"the experiment's spec.json has format {saved.get('format')!r} (written by an older "
                f"rlsedit; this one writes {SPEC_FORMAT!r}): upgrade the folder first with "
                "python scripts/migrate_runs.py"
            )
        return saved == self.to_dict()


Case = CounterFactCase | ZsreCase


def _cases(spec: ExperimentSpec) -> list[Case]:
    cases: list[Case] = get_task(spec.dataset).cases(spec.split, spec.offset, spec.edits)
    if len(cases) < spec.edits:
        raise ValueError(
            f"{spec.dataset} ({spec.split}) has only {len(cases)} cases after offset {spec.offset}"
        )
    return cases


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
    scored, at the stream's end too), leaving the run resumable; no final scoring is done, and the
    returned dict is then what :func:`rlsedit.runs.load_results` assembles of a run in progress
    (``"partial": True``, ``"post"`` the last checkpoint's summary, ``"edits"`` its edits) plus
    ``"stopped_after"``, the edits applied. A
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
    out = Path(out)
    if (out / REPLAY_MISMATCH_FILE).is_file():
        raise ReplayMismatch(load_json(out / REPLAY_MISMATCH_FILE)["message"])
    if stop_after is not None and stop_after < 0:
        raise ValueError(f"stop_after must be >= 0, got {stop_after}")
    run = _open(spec, out, device=device, dtype=dtype, stop_after=stop_after, static_targets=static_targets)
    if command is not None:  # every invocation of the folder (a run in progress has no results.json yet)
        inv_path = out / "invocations.json"
        save_json(inv_path, [*(load_json(inv_path) if inv_path.exists() else []), command])
    _measure_unedited(run)
    editor, reports, done, stopped_at = _edit_stream(
        run, stats_dir, targets_cache, command, replay_rtol, stop_after
    )
    if stopped_at is not None:
        if run.gen_cases and len(editor.batches) == stopped_at:  # the model holds exactly `done` edits
            measure.generation_at(out, done, editor, run.model, run.tok, run.gen_cases, spec)
        log.info(
            "stopped after %d of %d edits (%d batches applied); the same command resumes the run",
            done,
            len(run.cases),
            len(editor.batches),
        )
        return {**load_results(out, partial=True), "stopped_after": done}
    post, gen_post = _measure_edited(run, editor)
    config = editor.config.to_dict()
    del editor  # the unedited model is scored on a fresh copy: free the edited one first
    pre = _measure_unedited_cases(run, device=device, dtype=dtype, pre_cache=pre_cache)
    if command is None and (out / "results.json").exists():
        command = load_json(out / "results.json").get("command")
    results = _results(run, config, pre, post, gen_post, reports, command)
    save_json(out / "results.json", results)
    log.info("pre-edit:  %s", measure.fmt(results["pre"]))
    log.info("post-edit: %s", measure.fmt(results["post"]))
    return results


@dataclass
class _Stream:
    """What the phases of one :func:`run_experiment` call share."""

    spec: ExperimentSpec
    out: Path
    cases: list[Case]
    superseded: set
    model: Any
    tok: Any
    static: Any  # a StaticTargetStore, or None
    end: int  # the edits this call applies: a stop falls at the end of the chunk that reaches stop_after
    gen_cases: list[Case] = field(default_factory=list)
    gen_pre: dict[str, Any] | None = None
    capability: dict[str, Any] = field(default_factory=dict)


def _open(
    spec: ExperimentSpec,
    out: Path,
    *,
    device: str | None,
    dtype: str | None,
    stop_after: int | None,
    static_targets: str | Path | None,
) -> _Stream:
    """Check everything that can be refused before anything is written (too few cases, another experiment
    in the folder, settings the model cannot take, a static store that does not fit), load the model,
    then write ``spec.json``."""
    from rlsedit.editors.base import check_config, editor_class
    from rlsedit.locate.provider import StaticTargetStore, target_settings
    from rlsedit.locate.templates import generate_context_templates
    from rlsedit.models.load import load_model

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
    t_load = time.perf_counter()
    model, tok = load_model(spec.model, device=device, dtype=dtype)
    log.info("model %s loaded in %.1fs", spec.model, time.perf_counter() - t_load)
    config = check_config(spec.method, model, spec.overrides)
    end = len(cases)
    if stop_after is not None:
        end = min(len(cases), -(-stop_after // spec.batch_size) * spec.batch_size)
    if static is not None:
        templates = generate_context_templates(
            model, tok, n=config.n_templates, length=config.template_length, seed=config.seed
        )
        # only the requests this call applies (a later call with a larger stop_after checks its own)
        settings = target_settings(config.layers[-1], templates, config.targets)
        static.check(model, settings, [c.request for c in cases[:end]])
    out.mkdir(parents=True, exist_ok=True)
    if not spec_path.exists():
        save_json(spec_path, spec.to_dict())
    return _Stream(spec, out, cases, set(superseded_cases(cases)), model, tok, static, end)


def _measure_unedited(run: _Stream) -> None:
    """Before the first edit: generations of the unedited model (fluency) and its general capability."""
    spec, out, model, tok = run.spec, run.out, run.model, run.tok
    run.gen_cases = measure.spread(run.cases, spec.fluency, run.superseded) if spec.fluency else []
    if run.gen_cases:
        log.info("generating from the unedited model (%d cases)", len(run.gen_cases))
        run.gen_pre = measure.once(
            out / "generation" / "pre.json",
            lambda: measure.generation(model, tok, run.gen_cases, spec.consistency_dir),
        )
    if spec.capability is not None:
        log.info("general capability of the unedited model")
        cap_cfg = spec.capability
        run.capability["pre"] = measure.once(
            out / "capability" / "pre.json", lambda: measure.capability(model, tok, cap_cfg)
        )


def _edit_stream(
    run: _Stream,
    stats_dir: str | Path | None,
    targets_cache: str | Path | None,
    command: str | None,
    replay_rtol: float,
    stop_after: int | None,
) -> tuple[Any, list[dict[str, Any]], int, int | None]:
    """Apply the stream's chunks (resuming, replaying a seeded record), with the checkpoints that fall in
    it; returns ``(editor, batch reports, edits applied, index of the first chunk not applied or None)``."""
    from rlsedit.editors import load_editor, make_editor
    from rlsedit.locate.provider import TargetProvider

    spec, out, cases = run.spec, run.out, run.cases
    store = RunStore(out / "editor")
    with store.lock():
        if store.load_manifest() is not None:
            editor = load_editor(store, run.model, run.tok)  # this store: it holds the lock
            log.info("resuming: %d batches already applied", len(editor.batches))
        else:
            t0 = time.perf_counter()
            editor = make_editor(spec.method, run.model, run.tok, stats_dir=stats_dir, **spec.overrides)
            editor.load_name = spec.model
            editor.attach(store)
            log.info("editor ready in %.1fs", time.perf_counter() - t0)
        editor.use_targets(TargetProvider(cache_dir=targets_cache, static=run.static))
        batches_path = out / "batches.json"
        reports: list[dict[str, Any]] = load_json(batches_path) if batches_path.exists() else []
        (out / "checkpoints").mkdir(exist_ok=True)
        chunks = [cases[i : i + spec.batch_size] for i in range(0, len(cases), spec.batch_size)]
        # batches recorded in batches.json that the editor's state does not hold: a folder seeded with a
        # recorded run's files (no editor/) replays them and checks each against its record
        replay = Replay(out, reports, len(editor.batches), command, replay_rtol, len(cases))
        here = machine()  # each batch applied now says where (a stream carried across machines mixes them)
        done = 0
        stopped_at: int | None = None
        pace = _Pace(run.end)
        for k, chunk in enumerate(chunks):
            if stop_after is not None and done >= stop_after:
                stopped_at = k
                break
            replaying = k in replay  # this chunk's batch is in batches.json, but not in the editor's state
            keys = replay.target_keys(k, targets_cache) if run.static is None else None
            with editor.targets_provider.recorded(keys):
                rep = editor.edit([c.request for c in chunk])
            done += len(chunk)
            if rep.batches and not replaying:  # applied now (a resumed run skips the chunks applied before)
                pace.add(len(chunk), rep.seconds())
            objective = measure.objective(editor) if rep.batches else None
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
            # the model holds exactly the first `done` edits only right after this chunk's batch
            if len(editor.batches) == k + 1:
                _checkpoint_at(run, editor, done, stopping=stop_after is not None and done >= stop_after)
        if stopped_at is None and stop_after is not None and done >= stop_after:
            stopped_at = len(chunks)  # a stop at the stream's end: its checkpoint, no final scoring
    replay.close()
    return editor, reports, done, stopped_at


def _checkpoint_at(run: _Stream, editor: Any, done: int, stopping: bool = False) -> None:
    """At a checkpoint (every ``eval_every`` edits, before the end, or at the end where the call stops
    there): scores, generations, capability."""
    spec, out, model, tok = run.spec, run.out, run.model, run.tok
    if not (spec.eval_every and done % spec.eval_every == 0 and (done < len(run.cases) or stopping)):
        return
    ck = out / "checkpoints" / f"{done:06d}.json"
    if not ck.exists():
        scores = measure.checkpoint(model, tok, spec, run.cases[:done])
        save_json(ck, scores)
        log.info("checkpoint at %d edits: %s", done, measure.fmt(scores["summary"]))
    if run.gen_cases:
        measure.generation_at(out, done, editor, model, tok, run.gen_cases, spec)
    cap_ck = out / "capability" / f"{done:06d}.json"
    if spec.capability is not None and not cap_ck.exists():
        log.info("general capability after %d edits", done)
        save_json(cap_ck, {"edits": done, **measure.capability(model, tok, spec.capability)})


def _measure_edited(run: _Stream, editor: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """After the stream: every case scored (in resumable pieces), generations, capability; each computed
    once for the editor's state. Returns ``(post, generation post)``."""
    spec, out, model, tok, cases = run.spec, run.out, run.model, run.tok, run.cases
    key = measure.state_key(editor)
    log.info("scoring the edited model on %d cases", len(cases))
    partial = out / "post.partial.jsonl"
    post = measure.once(
        out / "post.json",
        lambda: measure.score_in_pieces(partial, model, tok, cases, run.superseded, spec.dataset, key),
        key,
    )
    partial.unlink(missing_ok=True)
    gen_post = None
    if run.gen_cases:
        log.info("generating from the edited model (%d cases)", len(run.gen_cases))
        gen_post = measure.once(
            out / "generation" / "post.json",
            lambda: measure.generation(model, tok, run.gen_cases, spec.consistency_dir),
            key,
        )
    if spec.capability is not None:
        log.info("general capability after %d edits", len(cases))
        cap_cfg = spec.capability
        run.capability["post"] = measure.once(
            out / "capability" / f"{len(cases):06d}.json",
            lambda: {"edits": len(cases), **measure.capability(model, tok, cap_cfg)},
            key,
        )
        run.capability["checkpoints"] = [
            load_json(p) for p in sorted((out / "capability").glob("[0-9]*.json")) if int(p.stem) < len(cases)
        ]
    return post, gen_post


def _measure_unedited_cases(
    run: _Stream, *, device: str | None, dtype: str | None, pre_cache: str | Path | None
) -> dict[str, Any]:
    """``pre.json``: every case scored on the unedited model, a fresh copy of it loaded once the edited
    one is freed (``run.model`` is dropped)."""
    from rlsedit.models.load import load_model

    pre_path = run.out / "pre.json"
    if pre_path.exists():
        return load_json(pre_path)
    run.model = None
    gc.collect()
    spec, cases = run.spec, run.cases
    log.info("scoring the unedited model on %d cases (a fresh copy of it)", len(cases))
    model0, tok0 = load_model(spec.model, device=device, dtype=dtype)
    t0 = time.perf_counter()
    recs = measure.unedited_records(model0, tok0, cases, spec.dataset, pre_cache)
    pre = measure.scored(spec.dataset, recs, run.superseded, time.perf_counter() - t0)
    save_json(pre_path, pre)
    return pre


def _results(
    run: _Stream,
    config: dict[str, Any],
    pre: dict[str, Any],
    post: dict[str, Any],
    gen_post: dict[str, Any] | None,
    reports: list[dict[str, Any]],
    command: str | None,
) -> dict[str, Any]:
    """``results.json`` (and ``cases.jsonl``, written here) of a finished stream."""
    spec, out, superseded = run.spec, run.out, run.superseded
    pre_summary, post_summary = dict(pre["summary"]), dict(post["summary"])
    if run.gen_pre is not None and gen_post is not None:
        pre_summary.update(run.gen_pre["summary"])
        post_summary.update(gen_post["summary"])
    measure.write_jsonl(
        out / "cases.jsonl",
        [
            {"case_id": a["case_id"], "pre": a, "post": b, "superseded": a["case_id"] in superseded}
            for a, b in zip(pre["records"], post["records"], strict=True)
        ],
    )
    timings, n_timed = timing_sums(reports)
    computed_sums, n_computed = timing_sums(reports, skip_cached_targets=spec.targets == "dynamic")
    return {
        "spec": spec.to_dict(),
        "command": command,
        "config": config,
        "edits": len(run.cases),
        "superseded_cases": sorted(superseded),
        "pre": pre_summary,
        "post": post_summary,
        "post_superseded": post["superseded"],
        # the earliest edits at the end of the stream, as at each checkpoint (and the unedited model's)
        "retention": measure.retention(spec, post["records"], superseded),
        "pre_retention": measure.retention(spec, pre["records"], superseded),
        "checkpoints": load_checkpoints(out),
        "capability": run.capability or None,
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
