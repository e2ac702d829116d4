"""Scores of a finished run by position in its stream: one row per slice of consecutive cases.

Reads a run's per-case records (``DIR/cases.jsonl``, written when a run scores every case after its
stream, or ``DIR/cases.jsonl.gz``, the same compressed) and summarises the post-edit scores of each
slice of ``--every`` consecutive cases with the dataset's own summary (superseded cases left out), so a
row shows how well the edits of that part of the stream survived to the end. Several runs of the same
stream give one table of ``--metric``: a column per run, beside the unedited model's score of the same
cases.

    python experiments/by_position.py docs/results/runs/memit-zsre --every 100
    python experiments/by_position.py docs/results/runs/{rlsedit,memit}-zsre --metric generalization
    python experiments/by_position.py docs/results/runs/rlsedit-cf10k --every 1000 --metric efficacy
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

from rlsedit.experiment import summarize_cases
from rlsedit.store import load_json

METRICS = ("efficacy", "generalization", "specificity")


def _load(run: Path) -> tuple[str, list[dict]]:
    """A run's dataset and per-case records, in stream order."""
    spec = load_json(run / "spec.json")
    path = run / "cases.jsonl"
    if not path.exists() and (run / "cases.jsonl.gz").exists():  # as committed for a long stream
        text = gzip.decompress((run / "cases.jsonl.gz").read_bytes()).decode("utf-8")
    else:
        text = path.read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return spec["dataset"], rows


def _slices(dataset: str, rows: list[dict], every: int, side: str) -> list[dict]:
    out = []
    for start in range(0, len(rows), every):
        part = rows[start : start + every]
        skip = {r["case_id"] for r in part if r.get("superseded")}
        summary = summarize_cases(dataset, [r[side] for r in part], skip)
        out.append({"first": start + 1, "last": start + len(part), **summary})
    return out


def by_position(run: str | Path, every: int, side: str = "post") -> list[dict]:
    """Per slice: ``first`` / ``last`` (1-based positions in the stream) and the summary of its cases,
    scored after the stream (``side="post"``) or by the unedited model (``side="pre"``)."""
    return _slices(*_load(Path(run)), every, side)


def side_by_side(runs: list[Path], every: int, metric: str) -> str:
    """A markdown table of ``metric`` by position: the unedited model, then one column per run."""
    loaded = [_load(run) for run in runs]
    ids = [[r["case_id"] for r in rows] for _, rows in loaded]
    if len({dataset for dataset, _ in loaded}) > 1 or any(i != ids[0] for i in ids[1:]):
        raise ValueError("the runs are not of the same stream (dataset and cases in order differ)")
    cols = [_slices(*loaded[0], every, "pre")] + [_slices(*run, every, "post") for run in loaded]
    names = ["unedited"] + [run.name for run in runs]
    lines = [f"{metric} by position", "", "| cases | n | " + " | ".join(names) + " |"]
    lines.append("|---|---|" + "---|" * len(names))
    for k, row in enumerate(cols[0]):
        vals = " | ".join(f"{col[k][metric]:.1f}" for col in cols)
        lines.append(f"| {row['first']}-{row['last']} | {cols[1][k]['n']} | {vals} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="run", help="finished runs (with cases.jsonl[.gz])")
    p.add_argument("--every", type=int, default=100, help="cases per slice (default 100)")
    p.add_argument(
        "--metric",
        choices=METRICS,
        default=None,
        help="one metric beside the unedited model's: a column per run (default with several runs: efficacy)",
    )
    args = p.parse_args(argv)
    if args.every < 1:
        p.error(f"--every must be at least 1, got {args.every}")
    runs = [Path(r) for r in args.runs]
    for run in runs:
        if not (run / "cases.jsonl").is_file() and not (run / "cases.jsonl.gz").is_file():
            p.error(f"{run} has no cases.jsonl(.gz): only a run scored after its whole stream has one")
    if len(runs) > 1 or args.metric:
        try:
            sys.stdout.write(side_by_side(runs, args.every, args.metric or "efficacy"))
        except ValueError as e:
            p.error(str(e))
        return 0
    rows = by_position(runs[0], args.every)
    metrics = [k for k in rows[0] if k in METRICS]
    lines = ["| cases | n | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for r in rows:
        vals = " | ".join(f"{r[m]:.1f}" for m in metrics)
        lines.append(f"| {r['first']}-{r['last']} | {r['n']} | {vals} |")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
