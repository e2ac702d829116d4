"""What a retraction restores, measured on the model.

Takes a finished ``rlsedit run`` folder of the RLSEdit editor, retracts one batch (default: the first),
and scores the retracted cases and the kept ones before and after the retraction, next to the unedited
model's scores of the same cases (from the run's ``pre.json``). The run folder is not modified: the
editor is loaded without attaching to it.

    python experiments/retraction.py /tmp/exp/rlsedit-test200 --batch 0 --out docs/retraction.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from rlsedit.datasets import load_counterfact
from rlsedit.editors import load_editor
from rlsedit.eval.counterfact import score_counterfact, summarize_counterfact
from rlsedit.models.load import load_model
from rlsedit.store import load_json, save_json

log = logging.getLogger("retraction")

_M = ("efficacy", "generalization", "specificity")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="experiment folder written by `rlsedit run --method rlsedit`")
    p.add_argument("--batch", type=int, default=0)
    p.add_argument("--out", required=True, help="JSON file for the figures")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    run = Path(args.run)
    spec = load_json(run / "spec.json")
    pre = {r["case_id"]: r for r in load_json(run / "pre.json")["records"]}
    model, tok = load_model(spec["model"])
    editor = load_editor(run / "editor", model, tok, attach=False)
    cases = load_counterfact(split=spec["split"], limit=spec["offset"] + spec["edits"])[spec["offset"] :]
    batch = next(b for b in editor.batches if b["id"] == args.batch)
    retracted_ids = {r.get("case_id") for r in batch["requests"]}
    gone = [c for c in cases if c.case_id in retracted_ids]
    kept = [c for c in cases if c.case_id not in retracted_ids]

    def score(group: list) -> dict:
        return summarize_counterfact(score_counterfact(model, tok, group))

    before = {"retracted": score(gone), "kept": score(kept)}
    info = editor.retract(args.batch)
    after = {"retracted": score(gone), "kept": score(kept)}
    unedited = {
        "retracted": summarize_counterfact([pre[c.case_id] for c in gone]),
        "kept": summarize_counterfact([pre[c.case_id] for c in kept]),
    }
    result = {
        "run": str(run),
        "batch": args.batch,
        "n_retracted": len(gone),
        "n_kept": len(kept),
        "weight_change_norms": {str(k): v for k, v in info["layers"].items()},
        "unedited": unedited,
        "before_retraction": before,
        "after_retraction": after,
        "command": "python experiments/retraction.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    save_json(args.out, result)
    lines = ["| cases | state | " + " | ".join(_M) + " |", "|---|---|---|---|---|"]
    for group in ("retracted", "kept"):
        for label, d in (("unedited", unedited), ("edited", before), ("after retraction", after)):
            s = d[group]
            lines.append(
                f"| {group} (n={s['n']}) | {label} | " + " | ".join(f"{s[m]:.1f}" for m in _M) + " |"
            )
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.write(json.dumps(result["weight_change_norms"]) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
