"""Cheaper target steps, first look: each candidate's targets for the same requests, side by side in one run.

For ``--edits`` requests of a split (default: the tune split, apart from every reported stream) it
optimises the targets once per candidate (``--cand NAME=JSON``: overrides of the default method's target
settings, plus ``n_templates`` and ``template_length``: the context templates) and reports seconds per
edit, mean steps, the final NLL of the new object (mean over the context templates), the share of deltas
at the clamp's length and the cosine of each delta to the reference
candidate's (the first). Quality after a stream is measured apart (static-target streams, FRONTIER.md);
this only says which candidates are worth one.

    OMP_NUM_THREADS=1 python experiments/target_steps.py --edits 30 --out /tmp/steps.json \\
        --cand 'adam25={}' --cand 'adam5={"steps":5}' --cand 'grad4={"init":"gradient","steps":4}'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time

import torch

from rlsedit.datasets import load_counterfact
from rlsedit.editors.base import check_config
from rlsedit.locate.targets import compute_targets
from rlsedit.locate.templates import generate_context_templates
from rlsedit.models.load import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="rlsedit")
    ap.add_argument("--split", default="tune")
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--edits", type=int, default=30)
    ap.add_argument("--cand", action="append", required=True, help="NAME=JSON target overrides")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    model, tok = load_model(args.model)
    config = check_config(args.method, model, {})
    cases = load_counterfact(split=args.split, limit=args.offset + args.edits)[args.offset :]
    requests = [c.request for c in cases]
    layer = config.layers[-1]
    rows, ref = [], None
    for item in args.cand:
        name, _, raw = item.partition("=")
        over = json.loads(raw or "{}")
        n_templates = over.pop("n_templates", config.n_templates)
        length = over.pop("template_length", config.template_length)
        templates = generate_context_templates(model, tok, n=n_templates, length=length, seed=config.seed)
        tcfg = dataclasses.replace(config.targets, **over)
        t0 = time.perf_counter()
        res = compute_targets(model, tok, requests, layer, templates, tcfg)
        sec = time.perf_counter() - t0
        d = res.z - res.h0
        at_clamp = (d.norm(dim=1) >= 0.999 * tcfg.clamp_norm_factor * res.h0.norm(dim=1)).float().mean()
        cos = float("nan") if ref is None else float(torch.nn.functional.cosine_similarity(d, ref).mean())
        ref = d if ref is None else ref
        row = {
            "name": name,
            "overrides": json.loads(raw or "{}"),
            "s_per_edit": sec / len(requests),
            "mean_steps": float(res.steps.float().mean()),
            "nll_final_mean": float(res.nll_final.mean()),
            "nll_final_median": float(res.nll_final.median()),
            "nll_final_max": float(res.nll_final.max()),
            "at_clamp": float(at_clamp),
            "cos_to_first": cos,
        }
        rows.append(row)
        logging.info("%s", json.dumps(row))
    meta = {"split": args.split, "offset": args.offset, "edits": args.edits, "layer": layer}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [
        "| candidate | s/edit | steps | NLL mean | NLL median | NLL max | at clamp | cos to first |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['s_per_edit']:.2f} | {r['mean_steps']:.1f} | {r['nll_final_mean']:.3f} | "
            f"{r['nll_final_median']:.3f} | {r['nll_final_max']:.3f} | {r['at_clamp']:.2f} | "
            f"{r['cos_to_first']:.3f} |"
        )
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
