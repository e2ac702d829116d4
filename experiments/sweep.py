"""Hyper-parameter sweeps of the closed-form editors, on cases apart from the reported streams.

Target optimisation is ~all of an edit's cost and, on the unedited model, depends only on the request,
the last edited layer and the target settings. So the targets are optimised once into a static target
store (``rlsedit targets``) and every configuration that shares the last edited layer reads them: only
keys, the solve and scoring run per configuration.

**One batch** (the default): ``--edits`` tune cases edited in one batch per configuration (the unedited
weights restored between configurations); the targets are kept in OUT/targets-L<layer>/.

    python experiments/sweep.py --out /tmp/sweep --edits 100 \\
        --grid 'mu=[10,31.6,100]' --grid 'layers=[[7],[5,6,7],[3,4,5,6,7]]'

Writes OUT/sweep.json (every row) and OUT/SWEEP.md (a table, the command).

**Streams** (``--stream``): every configuration is a static-target ``rlsedit run`` of the *sweep* split
(CounterFact test positions 10,000-18,999, then the tune split: apart from the reported streams of test
positions 0-9,999), with checkpoints scoring ``--checkpoint-cases`` edited cases and WikiText-2 perplexity,
in OUT/runs/<method>-<settings>/ (each resumable). ``--stop-after`` ends a point there (no final scoring:
a coarse point); a later call with a larger one carries it on. ``--shard i/n`` runs every n-th point, so
two processes (one thread each) can share a grid. The report of all points (frontier table and figure) is
written to OUT/report/ by every call.

    OMP_NUM_THREADS=1 python experiments/sweep.py --stream --static-targets /work/runs/static/sweep-L7 \\
        --out /work/runs/frontier --stop-after 5000 --grid 'lam=[1,10,30]' --grid 'mu=[31.6,100,316]'
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

from rlsedit.datasets import load_counterfact
from rlsedit.editors import make_editor
from rlsedit.eval.counterfact import score_counterfact, summarize_counterfact
from rlsedit.locate.provider import (
    StaticTargetStore,
    TargetProvider,
    fill_static_targets,
    store_meta,
)
from rlsedit.models.arch import get_module, weight_kv
from rlsedit.models.load import load_model
from rlsedit.store import load_json, save_json

log = logging.getLogger("sweep")


def _grid(items: list[str]) -> list[dict]:
    keys, values = [], []
    for item in items:
        k, v = item.split("=", 1)
        keys.append(k)
        values.append(json.loads(v))
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]


def point_name(method: str, cfg: dict) -> str:
    """A run folder's name for a grid point: the method and its settings, e.g. ``rlsedit-lam1-mu100``."""
    parts = [method]
    for k in sorted(cfg):
        v = cfg[k]
        if isinstance(v, list):
            v = "-".join(str(x) for x in v)
        elif isinstance(v, bool):
            v = "on" if v else "off"
        parts.append(f"{k.replace('_', '')}{v}")
    return "-".join(parts).replace("/", "_")


def stream_main(args: argparse.Namespace, fixed: dict) -> int:
    from rlsedit.experiment import ExperimentSpec, run_experiment
    from rlsedit.report import write_report

    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    shard, n_shards = (int(x) for x in args.shard.split("/"))
    grid = _grid(args.grid) if args.grid else [{}]
    capability = {"tasks": [], "perplexity": True}
    for k, point in enumerate(grid):
        if k % n_shards != shard:
            continue
        cfg = {**fixed, **point}
        # named by the grid's settings (the fixed ones are in every point's spec.json)
        name = point_name(args.method, point)
        spec = ExperimentSpec(
            model=args.model,
            method=args.method,
            split="sweep",
            edits=args.edits,
            batch_size=args.batch_size,
            eval_every=args.eval_every,
            overrides=cfg,
            fluency=0,
            capability=capability,
            checkpoint_cases=args.checkpoint_cases,
            retention=args.retention,
            targets="static" if args.static_targets else "dynamic",
        )
        log.info("point %d of %d: %s", k + 1, len(grid), name)
        t0 = time.perf_counter()
        run_experiment(
            spec,
            out / "runs" / name,
            stats_dir=args.stats,
            command="python experiments/sweep.py " + " ".join(sys.argv[1:]),
            static_targets=args.static_targets,
            pre_cache=out / "pre-cache",
            stop_after=args.stop_after,
        )
        log.info("point %s: %.0f s", name, time.perf_counter() - t0)
    runs = sorted(p for p in (out / "runs").iterdir() if (p / "spec.json").exists())
    keys = sorted({k for point in grid for k in point}) or sorted(fixed)
    done = [r for r in runs if (r / "checkpoints").is_dir() and any((r / "checkpoints").iterdir())]
    if done:
        path = write_report(done, out / "report", label_keys=keys, partial=True)
        log.info("report: %s", path)
    return 0


def _static_targets(args: argparse.Namespace, out: Path, editor, model, tok, reqs) -> float:
    """Fill (once) the static store of the tune requests for ``editor``'s last layer and target settings in
    OUT/targets-L<layer>-<hash>/ and point the editor at it; returns the seconds spent optimising."""
    last = editor.config.layers[-1]
    settings = editor.target_settings()
    meta = store_meta(model, args.model, settings, dataset="counterfact", split="tune")
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    store = StaticTargetStore.create(out / f"targets-L{last}-{digest}", meta)
    t0 = time.perf_counter()
    tcfg = editor.config.targets
    fill_static_targets(store, model, tok, reqs, range(len(reqs)), last, editor.templates, tcfg, len(reqs))
    editor.use_targets(TargetProvider(static=store))
    return time.perf_counter() - t0


def batch_main(args: argparse.Namespace, fixed: dict) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(args.model)
    cases = load_counterfact(split="tune", limit=args.edits)
    reqs = [c.request for c in cases]
    rows_path = out / "sweep.json"
    rows = load_json(rows_path) if rows_path.exists() else []
    pre_path = out / "pre.json"
    if pre_path.exists():
        pre = load_json(pre_path)
    else:
        pre = summarize_counterfact(score_counterfact(model, tok, cases))
        save_json(pre_path, pre)
    log.info("unedited: %s", pre)
    done = {json.dumps(r["config"], sort_keys=True) for r in rows}
    for cfg in _grid(args.grid):
        cfg = {**fixed, **cfg}
        if json.dumps(cfg, sort_keys=True) in done:
            continue
        editor = make_editor(args.method, model, tok, **cfg)
        t_targets = 0.0
        if editor.uses_targets:
            t_targets = _static_targets(args, out, editor, model, tok, reqs)
        saved = {n: weight_kv(get_module(model, n)).detach().clone() for n in editor.modules.values()}
        t0 = time.perf_counter()
        report = editor.edit(reqs)
        t_edit = time.perf_counter() - t0
        post = summarize_counterfact(score_counterfact(model, tok, cases))
        for n, w in saved.items():
            with torch.no_grad():
                weight_kv(get_module(model, n)).copy_(w)
        b = report.batches[0]
        row = {
            "config": cfg,
            "post": post,
            # None where the editor has no residual (UltraEdit, FT)
            "residual_before": b.residual_before if math.isfinite(b.residual_before) else None,
            "residual_after": b.residual_after if math.isfinite(b.residual_after) else None,
            "target_nll": [b.target_nll_init, b.target_nll_final],
            "seconds_without_targets": t_edit,
            "target_seconds": t_targets,
        }
        rows.append(row)
        save_json(rows_path, rows)
        log.info(
            "%s -> %s", cfg, {k: round(post[k], 1) for k in ("efficacy", "generalization", "specificity")}
        )
    # table
    keys = sorted({k for r in rows for k in r["config"]})
    head = [*keys, "efficacy", "generalization", "specificity", "resid. before -> after"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append(
        "| "
        + " | ".join(["unedited"] + [""] * (len(keys) - 1))
        + f" | {pre['efficacy']:.1f} | {pre['generalization']:.1f} | {pre['specificity']:.1f} | |"
    )
    for r in rows:
        c, q = r["config"], r["post"]
        cells = [json.dumps(c.get(k)).replace(" ", "") for k in keys]
        cells += [f"{q['efficacy']:.1f}", f"{q['generalization']:.1f}", f"{q['specificity']:.1f}"]
        if r["residual_before"] is None:
            cells.append("-")
        else:
            cells.append(f"{r['residual_before']:.2f} -> {r['residual_after']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    cmd = "python experiments/sweep.py " + " ".join(
        f"'{a}'" if " " in a or "[" in a else a for a in sys.argv[1:]
    )
    text = f"Command: `{cmd}`\n\n{len(cases)} tuning cases, one batch.\n\n" + "\n".join(lines) + "\n"
    (out / "SWEEP.md").write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="rlsedit")
    p.add_argument("--edits", type=int, default=None, help="one batch: 100; streams: 10000")
    p.add_argument("--out", required=True)
    p.add_argument("--grid", action="append", default=[], help="KEY=JSON list of values")
    p.add_argument("--set", action="append", default=[], help="KEY=JSON fixed override")
    p.add_argument("--stream", action="store_true", help="one static-target stream per point (see above)")
    p.add_argument("--static-targets", default=None, help="streams: the sweep split's target store")
    p.add_argument("--stop-after", type=int, default=None, help="streams: stop each point at N edits")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--checkpoint-cases", type=int, default=200)
    p.add_argument(
        "--retention",
        type=json.loads,
        default=[100, 1000],
        help="streams: JSON list of earliest-edit slices scored in full at checkpoints (default [100,1000])",
    )
    p.add_argument("--stats", default=None, help="statistics folder")
    p.add_argument("--shard", default="0/1", help="i/n: run every n-th point from the i-th")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    fixed = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    if args.stream:
        args.edits = args.edits or 10000
        return stream_main(args, fixed)
    args.edits = args.edits or 100
    return batch_main(args, fixed)


if __name__ == "__main__":
    raise SystemExit(main())
