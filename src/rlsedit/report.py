"""Side-by-side tables (Markdown) and curves (PNG) of experiment folders written by ``rlsedit run``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlsedit.store import atomic_write_bytes, load_json

__all__ = ["load_results", "results_table", "write_report"]

log = logging.getLogger(__name__)

_METRICS = ("efficacy", "generalization", "specificity")


def load_results(run: str | Path) -> dict[str, Any]:
    """``results.json`` of an experiment folder (clear error when the run has not finished)."""
    path = Path(run) / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{run}: no results.json (has `rlsedit run` finished there?)")
    res = load_json(path)
    res["_dir"] = str(run)
    return res


def _cell(v: Any, digits: int = 1) -> str:
    return "-" if v is None else f"{float(v):.{digits}f}"


def _per_edit_computed(result: dict[str, Any]) -> dict[str, float]:
    """Seconds per edit over the batches whose targets were optimised in the run (not read from a
    ``--targets-cache``); see :func:`rlsedit.experiment.timing_sums`."""
    from rlsedit.experiment import timing_sums

    sums, n = timing_sums(result.get("batches", []), skip_cached_targets=True)
    if not n:
        return result.get("timings", {}).get("per_edit", {})
    return {k: v / n for k, v in sums.items()}


def results_table(results: Sequence[dict[str, Any]], label_keys: Sequence[str] = ()) -> str:
    """A Markdown table: one row per run (after editing) plus each distinct pre-edit row.

    ``label_keys``: config keys shown as extra columns (e.g. ``mu``, ``layers``).
    """
    head = ["run", "method", "edits", *label_keys, *_METRICS, "s/edit", "targets", "keys", "update"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    seen_pre: set[str] = set()
    for r in results:
        spec = r["spec"]
        pre_key = f"{spec['model']}:{spec['split']}:{spec['offset']}:{r['edits']}"
        if pre_key not in seen_pre:
            seen_pre.add(pre_key)
            pre = r["pre"]
            row = ["unedited", "-", str(r["edits"]), *["" for _ in label_keys]]
            row += [_cell(pre.get(m)) for m in _METRICS] + ["-", "-", "-", "-"]
            lines.append("| " + " | ".join(row) + " |")
    for r in results:
        post = r["post"]
        per = _per_edit_computed(r)
        cfg = r.get("config", {})
        labels = []
        for k in label_keys:
            v = cfg.get(k, cfg.get("targets", {}).get(k))
            labels.append("-" if v is None else str(v).replace(" ", ""))
        row = [Path(r["_dir"]).name, r["spec"]["method"], str(r["edits"]), *labels]
        row += [_cell(post.get(m)) for m in _METRICS]
        row += [_cell(per.get(k), 2) for k in ("total", "targets", "keys", "update")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _plot(results: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - optional dependency
        log.warning("matplotlib is not installed (pip install 'rlsedit[plots]'); no figures written")
        return []
    written = []
    fig, axes = plt.subplots(1, len(_METRICS), figsize=(4 * len(_METRICS), 3.2), squeeze=False)
    any_curve = False
    for r in results:
        pts = [(c["edits"], c["summary"]) for c in r.get("checkpoints", [])]
        pts.append((r["edits"], r["post"]))
        pts.sort(key=lambda p: p[0])
        label = f"{Path(r['_dir']).name} ({r['spec']['method']})"
        for ax, m in zip(axes[0], _METRICS, strict=True):
            xs = [p[0] for p in pts if p[1].get(m) is not None]
            ys = [p[1][m] for p in pts if p[1].get(m) is not None]
            if xs:
                any_curve = True
                ax.plot(xs, ys, marker="o", label=label)
    for ax, m in zip(axes[0], _METRICS, strict=True):
        ax.set_title(m)
        ax.set_xlabel("edits")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    if any_curve:
        axes[0][-1].legend(fontsize=7)
        path = out / "metrics.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        written.append(path)
    plt.close(fig)
    return written


def write_report(
    runs: Sequence[str | Path], out: str | Path, label_keys: Sequence[str] = (), plots: bool = True
) -> Path:
    """Write ``out/REPORT.md`` (table + commands) and ``out/metrics.png``; return the Markdown path."""
    results = [load_results(r) for r in runs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = _plot(results, out) if plots else []
    text = ["# rlsedit report", "", results_table(results, label_keys)]
    text += [
        "Seconds per edit are totals of the batches' timings divided by the edits applied, over the batches "
        "whose targets were optimised in the run (batches whose targets came from a shared "
        "`--targets-cache` are left out of the timing).",
        "",
    ]
    text += ["Commands:", ""]
    text += [f"- `{r.get('command') or '(not recorded)'}`" for r in results]
    for f in figures:
        text += ["", f"![{f.stem}]({f.name})"]
    path = out / "REPORT.md"
    atomic_write_bytes(path, ("\n".join(text) + "\n").encode())
    return path
