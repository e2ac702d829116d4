"""Hyper-parameter sweep of a closed-form editor on the CounterFact *tuning* split, one batch.

Target optimisation is ~all of an edit's cost and, for the first batch, depends only on the unedited
model, the last edited layer and the target settings. So the targets of one batch are optimised once (and
cached in OUT/targets-L<layer>.safetensors), and every configuration of the grid that shares the last
edited layer reuses them: only keys, the solve and scoring run per configuration. The unedited weights
are restored between configurations. This measures one batch; the chosen configuration is then checked
sequentially (several batches) with ``rlsedit run`` on the held-out split.

    python experiments/sweep.py --out /tmp/sweep --edits 100 \\
        --grid 'mu=[10,31.6,100]' --grid 'layers=[[7],[5,6,7],[3,4,5,6,7]]'

Writes OUT/sweep.json (every row) and OUT/SWEEP.md (a table, the command).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from pathlib import Path
from unittest import mock

import torch

from rlsedit.datasets import load_counterfact
from rlsedit.editors import base as editor_base
from rlsedit.editors import make_editor
from rlsedit.eval.counterfact import score_counterfact, summarize_counterfact
from rlsedit.locate.targets import TargetResult
from rlsedit.models.arch import get_module, mlp_out_name, weight_kv
from rlsedit.models.load import load_model
from rlsedit.store import load_json, load_tensors, save_json, save_tensors

log = logging.getLogger("sweep")


def _grid(items: list[str]) -> list[dict]:
    keys, values = [], []
    for item in items:
        k, v = item.split("=", 1)
        keys.append(k)
        values.append(json.loads(v))
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="rlsedit")
    p.add_argument("--edits", type=int, default=100)
    p.add_argument("--out", required=True)
    p.add_argument("--grid", action="append", default=[], help="KEY=JSON list of values")
    p.add_argument("--set", action="append", default=[], help="KEY=JSON fixed override")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fixed = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
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
        last = editor.config.layers[-1]
        tpath = out / f"targets-L{last}.safetensors"
        cached: dict[str, torch.Tensor] | None = load_tensors(tpath) if tpath.exists() else None
        real = editor_base.compute_targets

        def targets(model_, tok_, reqs_, layer, templates, tcfg, _last=last, _path=tpath, _real=real):
            nonlocal cached
            assert layer == _last and len(reqs_) == len(reqs)
            if cached is None:
                r = _real(model_, tok_, reqs_, layer, templates, tcfg)
                cached = {"z": r.z, "h0": r.h0, "nll_init": r.nll_init, "nll_final": r.nll_final}
                cached["steps"] = r.steps
                cached["seconds"] = torch.tensor(r.seconds)
                save_tensors(_path, cached)
            c = cached
            return TargetResult(
                c["z"], c["h0"], c["nll_init"], c["nll_final"], c["steps"], float(c["seconds"])
            )

        names = {layer: mlp_out_name(model, layer) for layer in editor.config.layers}
        saved = {n: weight_kv(get_module(model, n)).detach().clone() for n in names.values()}
        t0 = time.perf_counter()
        with mock.patch.object(editor_base, "compute_targets", targets):
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
            "residual_before": b.residual_before,
            "residual_after": b.residual_after,
            "seconds_without_targets": t_edit,
            "target_seconds": float(cached["seconds"]) if cached else None,
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
        cells.append(f"{r['residual_before']:.2f} -> {r['residual_after']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    cmd = "python experiments/sweep.py " + " ".join(
        f"'{a}'" if " " in a or "[" in a else a for a in sys.argv[1:]
    )
    text = f"Command: `{cmd}`\n\n{len(cases)} tuning cases, one batch.\n\n" + "\n".join(lines) + "\n"
    (out / "SWEEP.md").write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
