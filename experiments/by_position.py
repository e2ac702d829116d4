"""Scores of a finished run by position in its stream: one row per slice of consecutive cases.

Reads a run's per-case records (``DIR/cases.jsonl``, written when a run scores every case after its
stream) and summarises the post-edit scores of each slice of ``--every`` consecutive cases with the
dataset's own summary (superseded cases left out), so a row shows how well the edits of that part of
the stream survived to the end.

    python experiments/by_position.py docs/results/runs/memit-zsre --every 100
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rlsedit.experiment import summarize_cases


def by_position(run: str | Path, every: int) -> list[dict]:
    """Per slice: ``first`` / ``last`` (1-based positions in the stream) and the summary of its cases."""
    run = Path(run)
    spec = json.loads((run / "spec.json").read_text())
    rows = [json.loads(line) for line in (run / "cases.jsonl").read_text().splitlines() if line.strip()]
    out = []
    for start in range(0, len(rows), every):
        part = rows[start : start + every]
        skip = {r["case_id"] for r in part if r.get("superseded")}
        summary = summarize_cases(spec["dataset"], [r["post"] for r in part], skip)
        out.append({"first": start + 1, "last": start + len(part), **summary})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a finished run directory (with cases.jsonl)")
    p.add_argument("--every", type=int, default=100, help="cases per slice (default 100)")
    args = p.parse_args(argv)
    if args.every < 1:
        p.error(f"--every must be at least 1, got {args.every}")
    if not (Path(args.run) / "cases.jsonl").is_file():
        p.error(f"{args.run} has no cases.jsonl: only a run scored after its whole stream has one")
    rows = by_position(args.run, args.every)
    metrics = [k for k in rows[0] if k in ("efficacy", "generalization", "specificity")]
    lines = ["| cases | n | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for r in rows:
        vals = " | ".join(f"{r[m]:.1f}" for m in metrics)
        lines.append(f"| {r['first']}-{r['last']} | {r['n']} | {vals} |")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
