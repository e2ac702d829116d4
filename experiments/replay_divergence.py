"""How far did replays of recorded streams drift from their records? Reads each run folder's
``replays.json`` (written by ``rlsedit run`` when it replays recorded batches) and prints, side by side,
each batch's largest relative difference from its record, every ``--every`` batches.

    python experiments/replay_divergence.py docs/results/runs/rlsedit-cf10k \
        docs/results/runs/memit-cf10k-rerun --every 5

A batch replayed by several invocations (a replay refused and run again, or carried on in pieces) shows
its last replay that was not refused. The machine each replay ran on is printed under the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlsedit.store import load_json


def batch_differences(run: Path) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """``({batch_id: comparison}, [machine of each replay])`` from ``run/replays.json``; later replays of a
    batch replace earlier ones, refused comparisons are left out."""
    replays = load_json(run / "replays.json")
    out: dict[int, dict[str, Any]] = {}
    for replay in replays:
        for checked in replay["batches"]:
            if not checked.get("refused"):
                out[int(checked["batch_id"])] = checked
    return out, [r.get("machine") or {} for r in replays]


def table(runs: Sequence[Path], diffs: Sequence[dict[int, dict[str, Any]]], every: int) -> str:
    """A Markdown table: one row per ``every``-th batch id (and the last), one column per run (``diffs``:
    each run's :func:`batch_differences`)."""
    ids = sorted(set().union(*diffs))
    shown = [i for i in ids if i % every == 0 or i == ids[-1]]
    lines = [
        "| batch id | " + " | ".join(r.name for r in runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    for i in shown:
        cells = [f"{d[i]['max_relative_difference']:.1e}" if i in d else "-" for d in diffs]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders holding replays.json")
    ap.add_argument("--every", type=int, default=5, help="show every N-th batch id (default 5)")
    args = ap.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "replays.json").is_file()]
    if missing:
        sys.stderr.write(f"replay_divergence: no replays.json in {', '.join(missing)}\n")
        return 2
    if args.every < 1:
        sys.stderr.write("replay_divergence: --every must be >= 1\n")
        return 2
    read = [batch_differences(run) for run in args.runs]  # each replays.json read once
    sys.stdout.write(table(args.runs, [diffs for diffs, _ in read], args.every) + "\n\n")
    for run, (_, machines_of_replays) in zip(args.runs, read, strict=True):
        machines = {json.dumps(m, sort_keys=True) for m in machines_of_replays if m}
        where = ", ".join(sorted(machines)) or "an unrecorded machine"
        sys.stdout.write(f"{run.name}: replayed on {where}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
