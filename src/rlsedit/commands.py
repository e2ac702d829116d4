"""What each ``rlsedit`` subcommand does (:mod:`rlsedit.cli` parses the command line and calls these)."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("rlsedit")


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _overrides(items: Sequence[str] | None, step: str | None = None) -> dict[str, Any]:
    """``--set KEY=VALUE`` options, over the settings of the named target step rule ``step``."""
    out: dict[str, Any] = {}
    if step is not None:
        from rlsedit.locate.targets import STEP_RULES

        out.update(STEP_RULES[step])
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"rlsedit: --set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = _parse_value(v)
    return out


def _generation_metrics(dataset: str | None) -> bool:
    """Whether fluency and consistency are measured on ``dataset``'s cases."""
    from rlsedit.tasks import get_task

    return dataset is not None and get_task(dataset).generation_metrics


def _check_same_overrides(editor: Any, overrides: dict[str, Any], run: Path) -> None:
    """On resume, ``--set`` may only repeat the run's settings (so the same command can be re-run)."""
    from rlsedit.editors.base import build_config

    current = editor.config.to_dict()
    wanted = build_config(type(editor.config), current, overrides).to_dict()
    changed = sorted(k for k in wanted if wanted[k] != current[k])
    if changed:
        raise SystemExit(
            f"rlsedit: run {run} was created with other settings ({', '.join(changed)}); "
            "--set cannot change a run's settings"
        )


def _load(args: argparse.Namespace, default: str = "smollm2-135m"):
    from rlsedit.models.load import load_model

    name = args.model or default
    t0 = time.perf_counter()
    device_map = getattr(args, "device_map", None)
    model, tok = load_model(name, device=args.device, dtype=args.dtype, device_map=device_map)
    log.info("loaded %s in %.1fs", name, time.perf_counter() - t0)
    return name, model, tok


def _run_model_name(run: Path) -> str | None:
    from rlsedit.store import RunStore

    try:
        m = RunStore(run, create=False).load_manifest()
    except (FileNotFoundError, OSError):
        return None
    return None if m is None else m.get("model", {}).get("load_name")


def _has_run(run: Path) -> bool:
    """Whether ``run`` holds a committed run (a manifest; its validity is checked when it is loaded)."""
    from rlsedit.store import RunStore

    return (run / RunStore.MANIFEST).exists()


def _saved_editor_dir(text: str, experiment: bool = True) -> Path:
    """The folder of the saved editor that ``--run`` names: a run directory of ``rlsedit edit``, or (where
    ``experiment``: commands that only read it) an experiment folder of ``rlsedit run``, whose ``editor/``
    it returns; anything else is refused before a model is loaded."""
    run = Path(text)
    for folder in (run, run / "editor") if experiment else (run,):
        if _has_run(folder):
            return folder
    if _has_run(run / "editor"):
        raise SystemExit(
            f"rlsedit: {text} is an experiment folder of `rlsedit run`; its stream is the experiment's, "
            "so this command does not change it (work on a copy of its editor/ instead)"
        )
    raise SystemExit(
        f"rlsedit: {text} holds no saved editor (no committed manifest): pass a run directory of "
        "`rlsedit edit`" + (" or an experiment folder of `rlsedit run`" if experiment else "")
    )


def _check_requests(editor: Any, requests: list[Any], lines: list[int], source: str) -> None:
    """The editor's checks of the requests against the model, errors naming the line in ``source``."""
    from rlsedit.requests import RequestError

    check = getattr(editor, "check_requests", None)
    if check is None:
        return
    try:
        check(requests)
    except RequestError as err:
        if err.unit == "index" and err.record is not None and 0 <= err.record < len(lines):
            raise err.located(lines[err.record], source=source, unit="line") from None
        raise


def cmd_edit(args: argparse.Namespace) -> int:
    from rlsedit.editors import load_editor, make_editor
    from rlsedit.editors.base import check_option_names, editor_class
    from rlsedit.requests import RequestError, read_requests_jsonl_numbered
    from rlsedit.store import RunStore

    # Every line is validated before anything is loaded, and every request against the model before the
    # run directory is created or changed.
    numbered = read_requests_jsonl_numbered(args.requests)
    source = Path(args.requests).name
    if not numbered:
        raise RequestError("no requests in the file", source=source)
    lines = [number for number, _ in numbered]
    requests = [request for _, request in numbered]
    overrides = _overrides(args.set, args.target_step)
    if not editor_class(args.method).uses_targets:
        raise SystemExit(f"rlsedit: {args.method} optimises no targets; pick a locate-then-edit method")
    check_option_names(editor_class(args.method).config_class, overrides)  # before the model is loaded
    run = Path(args.run)
    if not _has_run(run) and (run / "spec.json").exists():
        raise SystemExit(
            f"rlsedit: {run} is an experiment folder of `rlsedit run`: its stream is the experiment's "
            "(go on with `rlsedit run`, or edit a copy of its editor/)"
        )
    previous = _run_model_name(run)
    if previous and args.model and args.model != previous:
        raise SystemExit(f"rlsedit: run {run} was made with --model {previous}, not {args.model}")
    args.model = args.model or previous
    name, model, tok = _load(args)
    fresh = None
    if not _has_run(run):  # a new run: check everything before the directory is created
        fresh = make_editor(args.method, model, tok, stats_dir=args.stats, **overrides)
        _check_requests(fresh, requests, lines, source)
    store = RunStore(run)
    with store.lock():
        if store.load_manifest() is not None:
            editor = load_editor(store, model, tok)  # this store: it holds the lock
            if editor.name != args.method:
                raise SystemExit(f"rlsedit: run {run} uses method {editor.name}, not {args.method}")
            _check_same_overrides(editor, overrides, run)
            _check_requests(editor, requests, lines, source)
            log.info("resuming %s: %d batches already applied", run, len(editor.batches))
        else:
            editor = fresh or make_editor(args.method, model, tok, stats_dir=args.stats, **overrides)
            _check_requests(editor, requests, lines, source)
            editor.load_name = name
            editor.attach(store)  # this store holds the lock (re-entrant): saved, then every batch committed
        report = editor.edit(requests, batch_size=args.batch_size, progress=True)
    _out(
        f"applied {report.n_requests} request(s) in {len(report.batches)} batch(es); "
        f"{report.skipped} batch(es) were already in {run}"
    )
    for b in report.batches:
        t = b.timings
        _out(
            f"  batch {b.batch_id}: {b.n_requests} requests, targets {t.get('targets', 0):.1f}s, "
            f"keys {t.get('keys', 0):.1f}s, update {t.get('update', 0):.2f}s, residual "
            f"{b.residual_before:.2f} -> {b.residual_after:.2f}"
        )
    return 0


def cmd_retract(args: argparse.Namespace) -> int:
    from rlsedit.editors import load_editor
    from rlsedit.editors.base import Retractable
    from rlsedit.store import RunStore

    run = _saved_editor_dir(args.run, experiment=False)
    args.model = args.model or _run_model_name(run)
    _, model, tok = _load(args)
    store = RunStore(run, create=False)
    with store.lock():
        editor = load_editor(store, model, tok)  # this store: it holds the lock
        if not isinstance(editor, Retractable):
            raise SystemExit(f"rlsedit: method {editor.name} cannot retract edits")
        result = editor.retract(args.batch, args.request)
    _out(
        f"retracted batch {result['batch']} request(s) {result['requests']}; "
        + ", ".join(f"layer {k}: ||dW||={v:.4g}" for k, v in result["layers"].items())
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from rlsedit.editors import load_editor
    from rlsedit.export import export_model, save_deltas

    run = _saved_editor_dir(args.run)
    args.model = args.model or _run_model_name(run)
    name, model, tok = _load(args)
    editor = load_editor(run, model, tok, attach=False)
    out = Path(args.out)
    save_deltas(
        out / "deltas",
        editor.weight_deltas(),
        {"base_model": name, "method": editor.name, "requests": editor.n_applied},
        model=model,
    )
    if not args.deltas_only:
        export_model(model, tok, out / "model")
    _out(f"wrote {out / 'deltas'}" + ("" if args.deltas_only else f" and {out / 'model'}"))
    return 0


def _stats_defaults(model: Any) -> dict[str, Any]:
    """What ``rlsedit stats`` computes by default for ``model``: the statistics its editors will ask for.

    ``layers``: every layer an editor that uses statistics edits by default (per-model config, else the
    generic layers); ``samples``, ``max_len``, ``corpus``: the per-model ``stats_*`` settings, else the
    editors' defaults.
    """
    from rlsedit.configs import model_defaults
    from rlsedit.editors.base import EditorConfig

    base = EditorConfig()
    layers: set[int] = set()
    settings: dict[str, Any] = {}
    for method in ("rlsedit", "memit", "alphaedit", "rome"):
        d = model_defaults(model, method)
        layers.update(int(x) for x in d.get("layers", base.layers))
        if method == "rlsedit":
            settings = d
    return {
        "layers": sorted(layers),
        "samples": int(settings.get("stats_samples", base.stats_samples)),
        "max_len": int(settings.get("stats_max_len", base.stats_max_len)),
        "corpus": settings.get("stats_corpus", base.stats_corpus),
    }


def cmd_stats(args: argparse.Namespace) -> int:
    import torch

    from rlsedit.editors.base import check_layers
    from rlsedit.models.arch import mlp_out_name
    from rlsedit.models.load import model_fingerprint
    from rlsedit.stats import (
        corpus_texts,
        init_distributed_from_env,
        second_moments,
        stats_cache_dir,
        stats_key,
    )

    # Under torchrun (WORLD_SIZE set) every rank joins the process group (NCCL on GPUs, gloo on CPUs),
    # streams its shard of the texts, the sums are all-reduced and rank 0 writes the files.
    rank_device = init_distributed_from_env(args.device)
    distributed = rank_device is not None
    if distributed:
        if getattr(args, "device_map", None):
            torch.distributed.destroy_process_group()
            raise SystemExit("rlsedit: --device-map cannot be combined with torchrun (one device per rank)")
        args.device = str(rank_device)
    rank = torch.distributed.get_rank() if distributed else 0
    try:
        _, model, tok = _load(args)
        defaults = _stats_defaults(model)
        if args.layers:
            layers = args.layers
            check_layers(model, layers)
        else:
            layers = defaults["layers"]
            log.info("layers from the model's defaults: %s", ",".join(map(str, layers)))
        samples = args.samples if args.samples is not None else defaults["samples"]
        max_len = args.max_len if args.max_len is not None else defaults["max_len"]
        corpus = args.corpus if args.corpus is not None else defaults["corpus"]
        names = [mlp_out_name(model, layer) for layer in layers]
        res = second_moments(
            model,
            tok,
            names,
            samples=samples,
            corpus=corpus,
            max_len=max_len,
            batch_size=args.batch_size,
            cache_dir=args.out,
        )
        if rank == 0:
            folder = stats_cache_dir(args.out) / model_fingerprint(model)
            folder = folder / stats_key(corpus_texts(corpus)[1], samples, max_len)
            for n, sigma in res.items():
                _out(f"{n}: d_k={sigma.shape[0]}, trace={float(sigma.trace()):.4g}")
            _out(f"statistics in {folder}")
            _out(
                f"editors use them with --stats {args.out or stats_cache_dir(None)} "
                f"(and stats_samples={samples}, stats_max_len={max_len}"
                + (f", stats_corpus={corpus}" if corpus is not None else "")
                + " if these differ from the model's defaults)"
            )
    finally:
        if distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


def _capability_config(args: argparse.Namespace) -> dict[str, Any] | None:
    """The general-capability settings asked for on the command line (None: not asked). ``--lm-eval``
    has lm-evaluation-harness score its tasks: the bundled ones (sst2, ..., mmlu) on our items and prompts,
    any other name as the harness defines it."""
    from rlsedit.eval.capability import CAPABILITY_TASKS
    from rlsedit.eval.lmeval import harness_available

    harness = [t for t in (args.lm_eval or "").split(",") if t]
    if not args.capability and not harness:
        return None
    cfg: dict[str, Any] = {"n_items": args.capability_items, "ppl_tokens": args.ppl_tokens}
    if args.capability_tasks:
        cfg["tasks"] = [t for t in args.capability_tasks.split(",") if t]
    if harness:
        if not harness_available():
            raise SystemExit("rlsedit: --lm-eval needs lm-evaluation-harness: pip install 'rlsedit[lmeval]'")
        bundled = [t for t in harness if t in CAPABILITY_TASKS]
        if args.capability:  # ours as asked, plus the harness's
            cfg["tasks"] = list(dict.fromkeys([*cfg.get("tasks", CAPABILITY_TASKS), *bundled]))
        else:
            cfg["tasks"], cfg["perplexity"] = bundled, False
        cfg["backend"] = "lm-eval"
        cfg["lm_eval"] = [t for t in harness if t not in CAPABILITY_TASKS]
        cfg["lm_eval_limit"] = args.lm_eval_limit
    return cfg


def _print_capability(cap: dict[str, Any], label: str) -> None:
    parts = []
    if "perplexity" in cap:
        parts.append(f"ppl {cap['perplexity']['perplexity']:.2f}")
    for task in ("sst2", "mrpc", "cola", "rte", "mmlu"):
        if task in cap:
            r = cap[task]
            lo, hi = r["ci95"]
            by = " lm-eval" if r.get("backend") == "lm-eval" else ""
            parts.append(f"{task}{by} {r['accuracy']:.1f} [{lo:.0f},{hi:.0f}] (chance {r['chance']:.0f})")
    for task, r in (cap.get("lm_eval") or {}).get("results", {}).items():
        figures = ", ".join(f"{k} {v:.3g}" for k, v in r.items() if isinstance(v, float))
        parts.append(f"{task} (lm-eval) {figures}")
    _out(f"{label:16}" + "; ".join(parts))


_METRIC_COLUMNS = (("efficacy", "efficacy"), ("generalization", "general."), ("specificity", "specif."))


_GEN_COLUMNS = (("fluency", "fluency"), ("consistency", "consist."))


def _print_summaries(rows: list[tuple[str, dict[str, Any]]]) -> None:
    cols = list(_METRIC_COLUMNS) + [c for c in _GEN_COLUMNS if any(c[0] in s for _, s in rows)]
    _out(f"{'':16}" + "".join(f"{h:>10}" for _, h in cols))
    for label, s in rows:
        cells = ["         -" if s.get(k) is None else f"{s[k]:10.1f}" for k, _ in cols]
        _out(f"{label:16}" + "".join(cells))


def cmd_targets(args: argparse.Namespace) -> int:
    """Optimise the targets of a dataset range once on the unedited model (a static target store)."""
    from rlsedit.editors.base import check_config, check_option_names, editor_class
    from rlsedit.experiment import ExperimentSpec, _cases
    from rlsedit.locate.provider import StaticTargetStore, fill_static_targets, store_meta, target_settings
    from rlsedit.locate.templates import generate_context_templates

    overrides = _overrides(args.set, args.target_step)
    if not editor_class(args.method).uses_targets:
        raise SystemExit(f"rlsedit: {args.method} optimises no targets; pick a locate-then-edit method")
    check_option_names(editor_class(args.method).config_class, overrides)
    # the same case list a run of this dataset, split, offset and size edits (bad ranges refused here)
    spec = ExperimentSpec(
        method=args.method,
        dataset=args.dataset,
        split=args.split,
        edits=args.edits,
        offset=args.offset,
        overrides=overrides,
        fluency=0,
    )
    cases = _cases(spec)
    name, model, tok = _load(args)
    config = check_config(args.method, model, overrides)
    templates = generate_context_templates(
        model, tok, n=config.n_templates, length=config.template_length, seed=config.seed
    )
    layer = config.layers[-1]
    settings = target_settings(layer, templates, config.targets)
    meta = store_meta(model, name, settings, dataset=args.dataset, split=args.split)
    try:
        store = StaticTargetStore.create(args.out, meta)
    except ValueError as exc:
        raise SystemExit(f"rlsedit: {exc}") from None
    positions = list(range(args.offset, args.offset + len(cases)))
    res = fill_static_targets(
        store,
        model,
        tok,
        [c.request for c in cases],
        positions,
        layer,
        templates,
        config.targets,
        piece_size=args.piece,
        progress=True,
    )
    per = res["seconds"] / res["computed"] if res["computed"] else float("nan")
    _out(
        f"static targets at layer {layer} for {args.dataset} {args.split} {args.offset}-"
        f"{args.offset + len(cases)}: {res['computed']} computed ({per:.2f} s per edit), "
        f"{res['skipped']} already there; store {args.out}"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from rlsedit.experiment import ExperimentSpec, run_experiment

    spec = ExperimentSpec(
        model=args.model or "smollm2-135m",
        method=args.method,
        dataset=args.dataset,
        split=args.split,
        edits=args.edits,
        offset=args.offset,
        batch_size=args.batch_size,
        eval_every=args.eval_every,
        overrides=_overrides(args.set, args.target_step),
        fluency=args.fluency if _generation_metrics(args.dataset) else 0,
        capability=_capability_config(args),
        consistency_dir=args.consistency_dir,
        checkpoint_cases=args.checkpoint_cases,
        targets="static" if args.static_targets else "dynamic",
    )
    res = run_experiment(
        spec,
        args.out,
        device=args.device,
        dtype=args.dtype,
        stats_dir=args.stats,
        command="rlsedit " + " ".join(shlex.quote(a) for a in args.argv),
        targets_cache=args.targets_cache,
        pre_cache=args.pre_cache,
        stop_after=args.stop_after,
        static_targets=args.static_targets,
        **({} if args.replay_rtol is None else {"replay_rtol": args.replay_rtol}),
    )
    if res.get("stopped_after") is not None:
        rows = [("before editing", res["pre"])] if res["pre"] else []
        if res["checkpoints"]:
            rows.append((f"after {res['edits']} edits", res["post"]))
        if rows:
            _print_summaries(rows)
        _out(
            f"stopped after {res['stopped_after']} of {res['spec']['edits']} edits; the same command "
            f"(without --stop-after, or with a larger one) resumes the run: {args.out}"
        )
        return 0
    _print_summaries([("before editing", res["pre"]), (f"after {res['edits']} edits", res["post"])])
    if res["post"].get("consistency_note"):
        _out(f"consistency: {res['post']['consistency_note']}")
    cap = res.get("capability") or {}
    if cap:
        _print_capability(cap["pre"], "capability pre")
        _print_capability(cap["post"], "capability post")
    per = res["timings"]["per_edit"]
    if per:
        _out(
            "seconds per edit: "
            + ", ".join(
                f"{k} {per[k]:.2f}" for k in ("targets", "finetune", "keys", "update", "total") if k in per
            )
        )
    _out(f"results: {Path(args.out) / 'results.json'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from rlsedit.evaluate import evaluate_run
    from rlsedit.store import save_json

    run = _saved_editor_dir(args.run)
    args.model = args.model or _run_model_name(run)
    _, model, tok = _load(args)
    res = evaluate_run(
        run,
        model,
        tok,
        dataset=args.dataset,
        split=args.split,
        offset=args.offset,
        limit=args.limit,
        fluency=args.fluency if _generation_metrics(args.dataset) else 0,
        consistency_dir=args.consistency_dir,
        capability=_capability_config(args),
        objective=args.objective,
        unedited=args.unedited,
    )
    what = (
        "unedited base model" if args.unedited else f"{res['method']} ({res['requests_active']} active edits)"
    )
    _out(f"{run}: {what}")
    if res["summary"] is not None:
        _print_summaries([(f"{args.dataset} n={res['summary']['n']}", res["summary"])])
        if res["excluded"]:
            _out(f"left out of the summary (superseded or retracted): {len(res['excluded'])} case(s)")
        if res["summary"].get("consistency_note"):
            _out(f"consistency: {res['summary']['consistency_note']}")
    if res["capability"] is not None:
        _print_capability(res["capability"], "capability")
    if res["objective"] is not None:
        for layer, t in res["objective"].items():
            _out(
                f"layer {layer}: fit(batch) {t['fit_batch']:.4g}, fit(all) {t['fit_total']:.4g}, "
                f"||W-W0||^2 {t['dist_w0']:.4g}, anchor {t['anchor']:.4g}, J {t['objective']:.4g}"
            )
    if args.out:
        save_json(args.out, res)
        _out(f"results: {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from rlsedit.report import write_report

    keys = [k for k in (args.columns or "").split(",") if k]
    path = write_report(args.runs, args.out, label_keys=keys, plots=not args.no_plots, partial=args.partial)
    _out(path.read_text(encoding="utf-8"))
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from rlsedit.editors import list_editors

    for name in list_editors():
        _out(name)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rlsedit.demo import run_demo

    return run_demo(
        model_name=args.model or "smollm2-135m",
        n=args.n,
        method=args.method,
        device=args.device,
        dtype=args.dtype,
        out=_out,
    )
