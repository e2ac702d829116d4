"""The ``rlsedit`` command line: ``edit | retract | export | stats | run | targets | eval | report | demo |
methods`` (what each does: :mod:`rlsedit.commands`)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from rlsedit.commands import (
    cmd_demo,
    cmd_edit,
    cmd_eval,
    cmd_export,
    cmd_methods,
    cmd_report,
    cmd_retract,
    cmd_run,
    cmd_stats,
    cmd_targets,
)

log = logging.getLogger("rlsedit")


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _layer_list(text: str) -> list[int]:
    """argparse type: comma-separated layer indices (integers >= 0), at least one."""
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None
    if not layers or min(layers) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices >= 0, got {text!r}")
    return layers


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _add_model_args(p: argparse.ArgumentParser, required: bool = False, device_map: bool = False) -> None:
    p.add_argument(
        "--model",
        default=None,
        required=required,
        help="built-in name (smollm2-135m), local Hugging Face directory or hub id",
    )
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument("--dtype", default=None, help="model dtype: float32 (default), bfloat16, float16")
    if device_map:
        p.add_argument(
            "--device-map",
            default=None,
            help="spread the model over the GPUs (accelerate), e.g. auto or balanced; excludes --device",
        )


def _add_eval_args(p: argparse.ArgumentParser, fluency_default: int) -> None:
    p.add_argument(
        "--fluency",
        type=int,
        default=fluency_default,
        metavar="N",
        help=f"CounterFact: cases generated from for fluency and consistency (default {fluency_default})",
    )
    p.add_argument(
        "--consistency-dir",
        default=None,
        help="ROME's attribute_snippets.json, idf.npy, tfidf_vocab.json and counterfact.json (consistency)",
    )
    p.add_argument(
        "--capability", action="store_true", help="measure general capability (WikiText, GLUE, MMLU)"
    )
    p.add_argument("--capability-items", type=_positive_int, default=100, help="items per capability task")
    p.add_argument("--capability-tasks", default="", help="comma-separated subset of sst2,mrpc,cola,rte,mmlu")
    p.add_argument("--ppl-tokens", type=_positive_int, default=4096, help="WikiText-2 tokens for perplexity")
    p.add_argument(
        "--lm-eval",
        default=None,
        metavar="TASKS",
        help="comma-separated tasks scored by lm-evaluation-harness on the edited model in memory: the "
        "bundled sst2,mrpc,cola,rte,mmlu (our items and prompts, offline) or any harness task name",
    )
    p.add_argument(
        "--lm-eval-limit", type=_positive_int, default=None, help="documents per harness-defined task"
    )


def _add_config_args(p: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE`` and ``--target-step``: the editor's settings."""
    from rlsedit.locate.targets import STEP_RULES

    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (JSON)")
    p.add_argument(
        "--target-step",
        choices=sorted(STEP_RULES),
        default=None,
        help="a named target step rule (memit: 25 Adam steps, MEMIT's; fast: see RESULTS.md); --set wins",
    )


def _dataset_help() -> str:
    from rlsedit.tasks import task_names

    return f"{', '.join(task_names())}, or a file of KnowEdit-style records (JSON array or JSON Lines)"


def _parser_edit(sub: Any) -> None:
    """``edit``: apply requests."""
    e = sub.add_parser("edit", help="apply edit requests (JSONL) to a model; resumable run directory")
    _add_model_args(e, device_map=True)
    e.add_argument("--method", default="rlsedit", help="editor name (see `rlsedit methods`)")
    e.add_argument("--requests", required=True, help="JSONL file of requests")
    e.add_argument("--run", required=True, help="run directory (created, or resumed if it exists)")
    e.add_argument("--batch-size", type=_positive_int, default=100)
    e.add_argument("--stats", default=None, help="statistics folder (written by `rlsedit stats --out`)")
    _add_config_args(e)
    e.set_defaults(func=cmd_edit)


def _parser_runs(sub: Any) -> None:
    """``retract``, ``export``, ``stats``, ``demo``."""
    r = sub.add_parser("retract", help="take an applied batch (or one request of it) back")
    _add_model_args(r, device_map=True)
    r.add_argument("--run", required=True)
    r.add_argument("--batch", type=int, required=True)
    r.add_argument("--request", type=int, default=None, help="index of one request in the batch")
    r.set_defaults(func=cmd_retract)

    x = sub.add_parser("export", help="write the edited model and, separately, the weight changes")
    _add_model_args(x, device_map=True)
    x.add_argument("--run", required=True)
    x.add_argument("--out", required=True)
    x.add_argument("--deltas-only", action="store_true")
    x.set_defaults(func=cmd_export)

    s = sub.add_parser(
        "stats",
        help="compute and cache second-moment statistics of layers' keys (runs under torchrun as well)",
    )
    _add_model_args(s, device_map=True)
    s.add_argument(
        "--layers",
        type=_layer_list,
        default=None,
        help="comma-separated layer indices (default: the model's)",
    )
    s.add_argument("--samples", type=_positive_int, default=None, help="texts (default: the model's)")
    s.add_argument("--max-len", type=_positive_int, default=None, help="tokens per text (default: model's)")
    s.add_argument("--batch-size", type=_positive_int, default=8, help="texts per forward")
    s.add_argument("--corpus", default=None, help="JSONL (field text) or text file; default: wikipedia-leads")
    s.add_argument("--out", default=None, help="statistics folder (default: the user cache)")
    s.set_defaults(func=cmd_stats)

    d = sub.add_parser("demo", help="edit a few CounterFact facts into the default model, before and after")
    _add_model_args(d)
    d.add_argument("--method", default="rlsedit")
    d.add_argument("-n", type=int, default=4, help="number of facts")
    d.set_defaults(func=cmd_demo)


def _parser_run(sub: Any) -> None:
    """``run``: a sequential experiment."""
    rn = sub.add_parser(
        "run", help="a sequential editing experiment on CounterFact or zsRE, scored; resumable"
    )
    _add_model_args(rn)
    rn.add_argument("--method", default="rlsedit")
    rn.add_argument(
        "--dataset",
        default="counterfact",
        help=_dataset_help(),
    )
    rn.add_argument(
        "--split",
        default="test",
        choices=["test", "tune", "sweep"],
        help="test: held out; tune: settings; sweep: test 10,000-18,999 then tune (long streams that "
        "choose settings)",
    )
    rn.add_argument("--edits", type=int, default=200)
    rn.add_argument("--offset", type=int, default=0, help="skip this many cases of the split first")
    rn.add_argument("--batch-size", type=int, default=100)
    rn.add_argument("--eval-every", type=int, default=0, help="score every K edits (0: only at the end)")
    rn.add_argument(
        "--checkpoint-cases",
        type=int,
        default=0,
        help="at checkpoints, score N edited cases spread over the stream (plus the retention slices); "
        "0: all (the final scoring always covers all)",
    )
    rn.add_argument("--out", required=True, help="experiment folder (resumed if it exists)")
    rn.add_argument(
        "--stop-after",
        type=_positive_int,
        default=None,
        help="stop once N edits are applied (checkpoint there included), leaving the run resumable",
    )
    rn.add_argument("--stats", default=None, help="statistics folder (written by `rlsedit stats --out`)")
    rn.add_argument(
        "--targets-cache",
        default=None,
        help="folder keeping optimised targets; reused for the same model state and requests",
    )
    rn.add_argument(
        "--static-targets",
        default=None,
        metavar="DIR",
        help="read every target from a store made by `rlsedit targets` (optimised once on the unedited "
        "model) instead of optimising each batch's on the edited model",
    )
    rn.add_argument(
        "--replay-rtol",
        type=_positive_float,
        default=None,
        help="relative tolerance of a replayed batch against its record, for a folder seeded with a "
        "recorded run's files (default 1e-6: the same machine; another CPU differs in the last bits)",
    )
    rn.add_argument(
        "--pre-cache",
        default=None,
        help="folder keeping the unedited model's per-case scores, shared by runs on the same model",
    )
    _add_config_args(rn)
    _add_eval_args(rn, fluency_default=100)
    rn.set_defaults(func=cmd_run)


def _parser_targets(sub: Any) -> None:
    """``targets``: a static target store."""
    tg = sub.add_parser(
        "targets",
        help="optimise the targets of a dataset range once on the unedited model (for run --static-targets); "
        "resumable, and disjoint ranges may fill one folder side by side",
    )
    _add_model_args(tg)
    tg.add_argument("--method", default="rlsedit", help="whose settings (last layer, target settings)")
    tg.add_argument(
        "--dataset",
        default="counterfact",
        help=_dataset_help(),
    )
    tg.add_argument("--split", default="test", choices=["test", "tune", "sweep"])
    tg.add_argument("--edits", type=_positive_int, required=True)
    tg.add_argument("--offset", type=int, default=0, help="skip this many cases of the split first")
    tg.add_argument("--piece", type=_positive_int, default=100, help="requests optimised together per file")
    tg.add_argument("--out", required=True, help="the store's folder (resumed if it exists)")
    _add_config_args(tg)
    tg.set_defaults(func=cmd_targets)


def _parser_eval(sub: Any) -> None:
    """``eval``, ``report``, ``methods``."""
    from rlsedit.tasks import task_names

    ev = sub.add_parser(
        "eval", help="score the edited state of a run directory (CounterFact/zsRE, capability)"
    )
    _add_model_args(ev)
    ev.add_argument(
        "--run",
        required=True,
        help="run directory of `rlsedit edit`, or an experiment folder of `rlsedit run`",
    )
    ev.add_argument(
        "--dataset",
        default=None,
        help=f"edit cases to score: {', '.join(task_names())}, or a file of KnowEdit-style records",
    )
    ev.add_argument("--split", default="test", choices=["test", "tune", "all"], help="with --limit")
    ev.add_argument("--offset", type=int, default=0, help="with --limit: skip this many cases first")
    ev.add_argument(
        "--limit", type=_positive_int, default=None, help="score the first N cases (default: the run's cases)"
    )
    ev.add_argument("--objective", action="store_true", help="RLSEdit: the objective's terms per layer")
    ev.add_argument("--unedited", action="store_true", help="score the base model instead of the edited one")
    ev.add_argument("--out", default=None, help="write the full results (JSON) here")
    _add_eval_args(ev, fluency_default=0)
    ev.set_defaults(func=cmd_eval)

    rp = sub.add_parser("report", help="side-by-side table and curves of experiment folders")
    rp.add_argument("runs", nargs="+", help="experiment folders written by `rlsedit run`")
    rp.add_argument("--out", required=True, help="folder for REPORT.md and the figures (PNG)")
    rp.add_argument("--columns", default="", help="config keys shown as columns, e.g. mu,layers")
    rp.add_argument("--no-plots", action="store_true")
    rp.add_argument(
        "--partial", action="store_true", help="include runs still in progress (up to their last checkpoint)"
    )
    rp.set_defaults(func=cmd_report)

    m = sub.add_parser("methods", help="list the registered editors")
    m.set_defaults(func=cmd_methods)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlsedit", description="Lifelong knowledge editing of language models.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_parser_edit, _parser_runs, _parser_run, _parser_targets, _parser_eval):
        add(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    level = logging.WARNING - 10 * min(args.verbose, 2) if args.verbose else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("transformers", "accelerate", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from rlsedit.requests import RequestError

    try:
        return int(args.func(args) or 0)
    except RequestError as exc:
        sys.stderr.write(f"rlsedit: invalid request: {exc}\n")
        return 2
    except (OSError, ValueError, KeyError, NotImplementedError, RuntimeError) as exc:
        sys.stderr.write(f"rlsedit: error: {exc}\n")
        return 1
