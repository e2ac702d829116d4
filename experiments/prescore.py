"""Score the unedited model on the first N cases of a stream, and summarise slices of them.

The per-case scores go to (or come from) a pre-edit score cache (``rlsedit run --pre-cache``): a long run
scores the unedited model only after its stream, so its pre-edit rows at checkpoints come from here.

    python experiments/prescore.py --edits 2000 --slices 100,1000,2000 --pre-cache /tmp/exp/pre \\
        --out docs/results/pre-counterfact.json
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from rlsedit.datasets import load_counterfact, load_zsre, superseded_cases
from rlsedit.experiment import summarize_cases, unedited_records
from rlsedit.models.load import load_model
from rlsedit.store import save_json

log = logging.getLogger("prescore")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="counterfact", choices=["counterfact", "zsre"])
    p.add_argument("--split", default="test", choices=["test", "tune"])
    p.add_argument("--edits", type=int, required=True, help="the first N cases of the stream")
    p.add_argument("--slices", default="", help="comma-separated slice sizes to summarise (default: N)")
    p.add_argument("--pre-cache", default=None, help="pre-edit score cache folder (shared with rlsedit run)")
    p.add_argument("--out", required=True, help="JSON file for the summaries")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    slices = sorted({int(x) for x in args.slices.split(",") if x.strip()} or {args.edits})
    if args.edits < 1 or any(not 1 <= n <= args.edits for n in slices):
        p.error("--edits must be >= 1 and every slice between 1 and --edits")
    if args.dataset == "zsre":
        cases = list(load_zsre()[: args.edits])
    else:
        cases = load_counterfact(split=args.split, limit=args.edits)
    model, tok = load_model(args.model)
    recs = unedited_records(model, tok, cases, args.dataset, args.pre_cache)
    out = {
        "command": shlex.join(
            ["python", "experiments/prescore.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "model": args.model,
        "dataset": args.dataset,
        "split": args.split,
        "slices": {},
    }
    for n in slices:
        skip = set(superseded_cases(cases[:n]))
        out["slices"][str(n)] = summarize_cases(args.dataset, recs[:n], skip)
        log.info("first %d cases (%d superseded left out): %s", n, len(skip), out["slices"][str(n)])
    save_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
