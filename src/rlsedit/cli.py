"""The ``rlsedit`` command line: ``edit | retract | export | stats | demo | methods``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("rlsedit")


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _overrides(items: Sequence[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"rlsedit: --set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = _parse_value(v)
    return out


def _load(args: argparse.Namespace, default: str = "smollm2-135m"):
    from rlsedit.models.load import load_model

    name = args.model or default
    t0 = time.perf_counter()
    model, tok = load_model(name, device=args.device, dtype=args.dtype)
    log.info("loaded %s in %.1fs", name, time.perf_counter() - t0)
    return name, model, tok


def _add_model_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--model",
        default=None,
        required=required,
        help="built-in name (smollm2-135m), local Hugging Face directory or hub id",
    )
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument("--dtype", default=None, help="model dtype: float32 (default), bfloat16, float16")


def _run_model_name(run: Path) -> str | None:
    from rlsedit.store import RunStore

    try:
        m = RunStore(run, create=False).load_manifest()
    except (FileNotFoundError, OSError):
        return None
    return None if m is None else m.get("model", {}).get("load_name")


def cmd_edit(args: argparse.Namespace) -> int:
    from rlsedit.editors import load_editor, make_editor
    from rlsedit.requests import read_requests_jsonl
    from rlsedit.store import RunStore

    requests = read_requests_jsonl(args.requests)  # validates every line before anything is loaded
    run = Path(args.run)
    previous = _run_model_name(run)
    if previous and args.model and args.model != previous:
        raise SystemExit(f"rlsedit: run {run} was made with --model {previous}, not {args.model}")
    args.model = args.model or previous
    name, model, tok = _load(args)
    store = RunStore(run)
    with store.lock():
        if store.load_manifest() is not None:
            editor = load_editor(run, model, tok)
            if editor.name != args.method:
                raise SystemExit(f"rlsedit: run {run} uses method {editor.name}, not {args.method}")
            if args.set:
                raise SystemExit("rlsedit: --set applies only when a run is created")
            log.info("resuming %s: %d batches already applied", run, len(editor.batches))
        else:
            editor = make_editor(args.method, model, tok, stats_dir=args.stats, **_overrides(args.set))
            editor.load_name = name
            editor._store = store
            editor.save(run)
        report = editor.edit(requests, batch_size=args.batch_size, progress=True)
    _out(
        f"applied {report.n_requests} request(s) in {len(report.batches)} batch(es); "
        f"{report.skipped} batch(es) were already in {run}"
    )
    for b in report.batches:
        t = b.timings
        _out(
            f"  batch {b.batch_id}: {b.n_requests} requests, targets {t.get('targets', 0):.1f}s, "
            f"keys {t.get('keys', 0):.1f}s, update {t.get('update', 0):.2f}s, residual "
            f"{b.residual_before:.2f} -> {b.residual_after:.2f}"
        )
    return 0


def cmd_retract(args: argparse.Namespace) -> int:
    from rlsedit.editors import load_editor
    from rlsedit.store import RunStore

    run = Path(args.run)
    args.model = args.model or _run_model_name(run)
    _, model, tok = _load(args)
    store = RunStore(run, create=False)
    with store.lock():
        editor = load_editor(run, model, tok)
        if not hasattr(editor, "retract"):
            raise SystemExit(f"rlsedit: method {editor.name} cannot retract edits")
        result = editor.retract(args.batch, args.request)
    _out(
        f"retracted batch {result['batch']} request(s) {result['requests']}; "
        + ", ".join(f"layer {k}: ||dW||={v:.4g}" for k, v in result["layers"].items())
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from rlsedit.editors import load_editor
    from rlsedit.export import export_model, save_deltas

    run = Path(args.run)
    args.model = args.model or _run_model_name(run)
    name, model, tok = _load(args)
    editor = load_editor(run, model, tok, attach=False)
    out = Path(args.out)
    save_deltas(
        out / "deltas",
        editor.weight_deltas(),
        {"base_model": name, "method": editor.name, "requests": editor.n_applied},
    )
    if not args.deltas_only:
        export_model(model, tok, out / "model")
    _out(f"wrote {out / 'deltas'}" + ("" if args.deltas_only else f" and {out / 'model'}"))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from rlsedit.models.arch import mlp_out_name
    from rlsedit.stats import second_moments

    _, model, tok = _load(args)
    layers = [int(x) for x in args.layers.split(",") if x.strip()]
    names = [mlp_out_name(model, layer) for layer in layers]
    res = second_moments(
        model, tok, names, samples=args.samples, corpus=args.corpus, max_len=args.max_len, cache_dir=args.out
    )
    for n, s in res.items():
        _out(f"{n}: d_k={s.shape[0]}, trace={float(s.trace()):.4g}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from rlsedit.editors import list_editors

    for name in list_editors():
        _out(name)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rlsedit.demo import run_demo

    return run_demo(
        model_name=args.model or "smollm2-135m",
        n=args.n,
        method=args.method,
        device=args.device,
        dtype=args.dtype,
        out=_out,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlsedit", description="Lifelong knowledge editing of language models.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("edit", help="apply edit requests (JSONL) to a model; resumable run directory")
    _add_model_args(e)
    e.add_argument("--method", default="rlsedit", help="editor name (see `rlsedit methods`)")
    e.add_argument("--requests", required=True, help="JSONL file of requests")
    e.add_argument("--run", required=True, help="run directory (created, or resumed if it exists)")
    e.add_argument("--batch-size", type=int, default=100)
    e.add_argument("--stats", default=None, help="folder of cached second-moment statistics")
    e.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (JSON)")
    e.set_defaults(func=cmd_edit)

    r = sub.add_parser("retract", help="take an applied batch (or one request of it) back")
    _add_model_args(r)
    r.add_argument("--run", required=True)
    r.add_argument("--batch", type=int, required=True)
    r.add_argument("--request", type=int, default=None, help="index of one request in the batch")
    r.set_defaults(func=cmd_retract)

    x = sub.add_parser("export", help="write the edited model and, separately, the weight changes")
    _add_model_args(x)
    x.add_argument("--run", required=True)
    x.add_argument("--out", required=True)
    x.add_argument("--deltas-only", action="store_true")
    x.set_defaults(func=cmd_export)

    s = sub.add_parser("stats", help="compute and cache second-moment statistics of layers' keys")
    _add_model_args(s)
    s.add_argument("--layers", required=True, help="comma-separated layer indices")
    s.add_argument("--samples", type=int, default=1000)
    s.add_argument("--max-len", type=int, default=128)
    s.add_argument("--corpus", default=None, help="JSONL (field text) or text file; default: wikipedia-leads")
    s.add_argument("--out", default=None, help="statistics folder (default: the user cache)")
    s.set_defaults(func=cmd_stats)

    d = sub.add_parser("demo", help="edit a few CounterFact facts into the default model, before and after")
    _add_model_args(d)
    d.add_argument("--method", default="rlsedit")
    d.add_argument("-n", type=int, default=4, help="number of facts")
    d.set_defaults(func=cmd_demo)

    m = sub.add_parser("methods", help="list the registered editors")
    m.set_defaults(func=cmd_methods)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
    except (FileNotFoundError, ValueError, KeyError, NotImplementedError, RuntimeError) as exc:
        sys.stderr.write(f"rlsedit: error: {exc}\n")
        return 1
