"""Paired differences between two finished runs of the same cases: B - A per metric, with a 95% interval.

Two runs of the same stream (same cases, other settings) differ case by case much less than two
independent samples: the interval of the paired difference (mean of B - A over the cases both scored,
normal approximation) is the one to read when asking whether a setting changed a score.

    python experiments/paired_runs.py RUN_A RUN_B [--metrics efficacy,generalization,specificity]
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
from pathlib import Path


def _post(run: Path) -> dict:
    """Each case's post-edit record, from ``cases.jsonl`` (or its committed ``cases.jsonl.gz``)."""
    out = {}
    plain = run / "cases.jsonl"
    opener = open if plain.exists() else gzip.open
    with opener(plain if plain.exists() else run / "cases.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            out[rec["case_id"]] = rec["post"]
    return out


def paired(a: dict, b: dict, metric: str) -> dict:
    """``{"n", "a", "b", "diff", "ci95", "b_better", "a_better"}`` (percent) over the cases both have."""
    ids = [i for i in a if i in b and a[i].get(metric) is not None and b[i].get(metric) is not None]
    d = [float(b[i][metric]) - float(a[i][metric]) for i in ids]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / max(1, n - 1)
    return {
        "n": n,
        "a": 100 * sum(float(a[i][metric]) for i in ids) / n,
        "b": 100 * sum(float(b[i][metric]) for i in ids) / n,
        "diff": 100 * mean,
        "ci95": 100 * 1.96 * math.sqrt(var / n),
        "b_better": sum(x > 0 for x in d),
        "a_better": sum(x < 0 for x in d),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--metrics", default="efficacy,generalization,specificity")
    args = ap.parse_args()
    a, b = _post(Path(args.a)), _post(Path(args.b))
    lines = [
        f"| metric | n | A ({Path(args.a).name}) | B ({Path(args.b).name}) | B - A | 95% "
        "| cases B better / A better |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in args.metrics.split(","):
        r = paired(a, b, m)
        lines.append(
            f"| {m} | {r['n']} | {r['a']:.1f} | {r['b']:.1f} | {r['diff']:+.1f} | +-{r['ci95']:.1f} | "
            f"{r['b_better']} / {r['a_better']} |"
        )
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
