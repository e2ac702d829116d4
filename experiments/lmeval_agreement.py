"""Our zero-shot scoring and lm-evaluation-harness's on the same items and prompts, side by side.

Both backends of :func:`rlsedit.eval.capability.evaluate_capability` score the bundled tasks' fixed
samples (``--items`` per task, seed 0) on the unedited model; the table gives each one's accuracy and
predictions per label. Writes OUT/agreement.json and OUT/AGREEMENT.md.

    python experiments/lmeval_agreement.py --out docs/results/lm-eval --items 100
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from rlsedit.eval.capability import CAPABILITY_TASKS, zero_shot_accuracy
from rlsedit.eval.lmeval import lm_eval_accuracy
from rlsedit.models.load import load_model
from rlsedit.store import save_json


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--items", type=int, default=100)
    p.add_argument("--tasks", default=",".join(CAPABILITY_TASKS))
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    tasks = [t for t in args.tasks.split(",") if t]
    model, tok = load_model(args.model)
    t0 = time.perf_counter()
    harness = lm_eval_accuracy(model, tok, tasks, n_items=args.items)
    t_harness = time.perf_counter() - t0
    rows = []
    t_ours = 0.0
    for task in tasks:
        ours = zero_shot_accuracy(model, tok, task, n_items=args.items)
        t_ours += ours["seconds"]
        h = harness[task]
        rows.append(
            {
                "task": task,
                "n": ours["n"],
                "ours": ours["accuracy"],
                "harness": h["accuracy"],
                "harness_ci95": h["ci95"],
                "harness_predicted": h["predicted"],
                "ours_predicted": ours["predicted"],
            }
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "model": args.model,
        "items": args.items,
        "harness_version": next(iter(harness.values()))["harness"],
        "seconds": {"harness": t_harness, "ours": t_ours},
        "rows": rows,
        "command": "python experiments/lmeval_agreement.py " + " ".join(sys.argv[1:]),
    }
    save_json(out / "agreement.json", record)
    lines = [
        f"Command: `{record['command']}` (lm-eval {record['harness_version']}, model {args.model}).",
        "",
        "| task | items | ours | lm-eval harness [95% CI] | predictions per label: ours / harness |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["harness_ci95"]
        lines.append(
            f"| {r['task']} | {r['n']} | {r['ours']:.1f} | {r['harness']:.1f} [{lo:.0f}, {hi:.0f}] | "
            f"{json.dumps(r['ours_predicted'])} / {json.dumps(r['harness_predicted'])} |"
        )
    lines.append("")
    lines.append(f"Seconds: harness {t_harness:.0f}, ours {t_ours:.0f} (one process, same machine).")
    (out / "AGREEMENT.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
