"""Side-by-side tables (Markdown) and curves (PNG) of experiment folders written by ``rlsedit run``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlsedit.runs import load_results, timing_sums
from rlsedit.store import atomic_write_bytes

__all__ = ["load_results", "results_table", "write_report"]

log = logging.getLogger(__name__)

_METRICS = ("efficacy", "generalization", "specificity")
#: Timing columns (seconds per edit): the total, then its parts (FT's fine-tuning loop is ``finetune``).
_TIMES = ("total", "targets", "keys", "update", "finetune")


def _cell(v: Any, digits: int = 1) -> str:
    return "-" if v is None else f"{float(v):.{digits}f}"


def _per_edit_computed(result: dict[str, Any]) -> dict[str, float]:
    """Seconds per edit over the batches whose targets were optimised in the run (not read from a
    ``--targets-cache``), or over every batch of a static-target run (reading them is its protocol); see
    :func:`rlsedit.experiment.timing_sums`."""
    dynamic = result.get("spec", {}).get("targets", "dynamic") == "dynamic"
    sums, n = timing_sums(result.get("batches", []), skip_cached_targets=dynamic)
    if not n:
        return result.get("timings", {}).get("per_edit", {})
    return {k: v / n for k, v in sums.items()}


def results_table(results: Sequence[dict[str, Any]], label_keys: Sequence[str] = ()) -> str:
    """A Markdown table: one row per run (after editing) plus each distinct pre-edit row; "targets" says
    whether a run optimised each batch's targets on the edited model ("dynamic") or read static ones.

    ``label_keys``: config keys shown as extra columns (e.g. ``mu``, ``layers``).
    """
    # portability (KnowEdit-style records) where a run has it
    extra = ["portability"] if any(r.get("post", {}).get("portability") is not None for r in results) else []
    head = [
        "run",
        "method",
        "edits",
        "targets",
        *label_keys,
        *_METRICS,
        *extra,
        "fluency",
        "s/edit",
        *_TIMES[1:],
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    seen_pre: set[str] = set()
    for r in results:
        spec = r["spec"]
        pre_key = f"{spec['model']}:{spec['split']}:{spec['offset']}:{r['edits']}"
        # the unedited model's case scores (a run in progress may have only its fluency: not a row here)
        if pre_key not in seen_pre and any(r.get("pre", {}).get(m) is not None for m in _METRICS):
            seen_pre.add(pre_key)
            pre = r["pre"]
            row = ["unedited", "-", str(r["edits"]), "-", *["" for _ in label_keys]]
            row += [_cell(pre.get(m)) for m in (*_METRICS, *extra, "fluency")] + ["-"] * len(_TIMES)
            lines.append("| " + " | ".join(row) + " |")
    for r in results:
        post = r["post"]
        per = _per_edit_computed(r)
        labels = []
        for k in label_keys:
            v = _setting(r, k)
            labels.append("-" if v is None else str(v).replace(" ", ""))
        edits = str(r["edits"])
        if r.get("partial"):
            edits += f" (in progress: {r['edits_applied']} of {r['spec']['edits']} applied)"
        protocol = r["spec"].get("targets", "dynamic")
        row = [Path(r["_dir"]).name, r["spec"]["method"], edits, protocol, *labels]
        row += [_cell(post.get(m)) for m in (*_METRICS, *extra, "fluency")]
        row += [_cell(per.get(k), 2) for k in _TIMES]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _triple(summary: dict[str, Any] | None) -> str:
    if not summary:
        return "-"
    return " / ".join(_cell(summary.get(m)) for m in _METRICS)


def checkpoint_table(results: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of every run's scores over its stream: one row per point where it was measured
    (0 = the unedited model's fluency and capability, each checkpoint, the end of a finished run), with
    the summary's efficacy / generalization / specificity, the retention slices (the earliest edits
    re-scored there), fluency, WikiText-2 perplexity and the zero-shot accuracies."""
    sizes = sorted({int(k) for r in results for _, slices in _retention_points(r) for k in slices})
    tasks = sorted(
        {
            k
            for r in results
            for _, c in _capability_points(r)
            for k, v in c.items()
            if isinstance(v, dict) and "accuracy" in v
        }
    )
    head = ["run", "method", "edits", *_METRICS, *(f"first {n:,} (eff / gen / spec)" for n in sizes)]
    head += ["fluency", "perplexity", *tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        scores = dict(_metric_points(r))
        retention = dict(_retention_points(r))
        capability = dict(_capability_points(r))
        for e in sorted({*scores, *capability}):
            s, cap = scores.get(e, {}), capability.get(e, {})
            row = [Path(r["_dir"]).name, r["spec"]["method"], f"{e:,}" if e else "0 (unedited)"]
            row += [_cell(s.get(m)) for m in _METRICS]
            row += [_triple(retention.get(e, {}).get(str(n))) for n in sizes]
            ppl = cap.get("perplexity", {}).get("perplexity")
            row += [_cell(s.get("fluency")), _cell(ppl, 2)]
            row += [_cell(cap[t]["accuracy"]) if t in cap else "-" for t in tasks]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - optional dependency
        log.warning("matplotlib is not installed (pip install 'rlsedit[plots]'); no figures written")
        return None
    return plt


def _label(r: dict[str, Any]) -> str:
    return f"{Path(r['_dir']).name} ({r['spec']['method']})"


def _color(i: int) -> str:
    """Run ``i``'s colour in every panel of a figure (so one legend serves them all, even where a run
    has no points in some panel)."""
    return f"C{i % 10}"


def _legend(axes: Sequence[Any], fontsize: int) -> None:
    """One legend for a row of panels (the curves of the first panel that has labelled ones), to the
    right of the last panel, outside the plotted areas (inside, with several runs, it hides their curves);
    :func:`_save` widens the image to take it in."""
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        if labels:
            axes[-1].legend(
                handles,
                labels,
                fontsize=fontsize,
                loc="upper left",
                bbox_to_anchor=(1.02, 1.0),
                borderaxespad=0.0,
            )
            return


def _save(plt: Any, fig: Any, path: Path, drawn: bool, written: list[Path]) -> None:
    if drawn:
        fig.tight_layout()
        fig.savefig(path, dpi=120, bbox_inches="tight")
        written.append(path)
    plt.close(fig)


def _metric_points(r: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    pts = [(c["edits"], c["summary"]) for c in r.get("checkpoints", [])]
    if not r.get("partial"):
        pts.append((r["edits"], r["post"]))
    if r.get("pre"):
        pts.append((0, r["pre"]))
    return sorted({e: v for e, v in pts}.items())


def _retention_points(r: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """``(edits, {slice size: summary})`` of the earliest edits re-scored over a run: at each checkpoint,
    and at the end of a finished run (from its final per-case scores)."""
    pts = [(c["edits"], c.get("retention", {})) for c in r.get("checkpoints", [])]
    if not r.get("partial") and r.get("retention"):
        pts.append((r["edits"], r["retention"]))
    return pts


def frontier_points(r: dict[str, Any]) -> list[tuple[int, dict[str, Any], float]]:
    """``(edits, metric summary, WikiText-2 perplexity)`` wherever a run has both (0 = unedited)."""
    ppl = {e: c["perplexity"]["perplexity"] for e, c in _capability_points(r) if "perplexity" in c}
    return [(e, v, ppl[e]) for e, v in _metric_points(r) if e in ppl and v.get("efficacy") is not None]


def _setting(r: dict[str, Any], key: str) -> Any:
    """A run's setting ``key``: from its full config (finished runs), else from the overrides it was
    asked for (runs in progress), else None."""
    cfg = r.get("config") or {}
    if key in cfg:
        return cfg[key]
    if key in cfg.get("targets", {}):
        return cfg["targets"][key]
    return r.get("spec", {}).get("overrides", {}).get(key)


def _settings(r: dict[str, Any], keys: Sequence[str]) -> str:
    parts = []
    for k in keys:
        v = _setting(r, k)
        if v is not None:
            parts.append(f"{k}={str(v).replace(' ', '')}")
    return " ".join(parts)


def frontier_table(results: Sequence[dict[str, Any]], label_keys: Sequence[str] = ()) -> str:
    """A Markdown table of each run's last point with both scores and perplexity (the frontier's
    points), best efficacy first within each perplexity bracket; empty when no run has such a point."""
    rows = []
    for r in results:
        pts = [p for p in frontier_points(r) if p[0] > 0]
        if not pts:
            continue
        e, v, ppl = pts[-1]
        traj = ", ".join(f"{pe}: {pv['efficacy']:.0f}/{pp:.0f}" for pe, pv, pp in pts)
        rows.append((ppl, r, e, v, traj))
    if not rows:
        return ""
    head = ["run", "method", "targets", "settings", "edits", *_METRICS, "perplexity", "trajectory (eff./ppl)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ppl, r, e, v, traj in sorted(rows, key=lambda t: (t[1]["spec"]["method"], t[0])):
        row = [
            Path(r["_dir"]).name,
            r["spec"]["method"],
            r["spec"].get("targets", "dynamic"),
            _settings(r, label_keys) or "-",
            str(e),
            *[_cell(v.get(m)) for m in _METRICS],
            f"{ppl:.1f}",
            traj,
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _plot_frontier(plt: Any, results: Sequence[dict[str, Any]], out: Path, written: list[Path]) -> None:
    """frontier.png: efficacy and generalization against perplexity (log) at each run's last point, one
    curve per method through its runs' points (sorted by perplexity), each run's trajectory over its
    checkpoints as a thin line, and the unedited model as a star."""
    panels = ("efficacy", "generalization")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.0), squeeze=False)
    drawn = False
    methods = sorted({r["spec"]["method"] for r in results})
    finals: dict[str, list[tuple[float, dict[str, Any]]]] = {m: [] for m in methods}
    unedited = None
    for r in results:
        pts = frontier_points(r)
        if pts and pts[0][0] == 0:
            unedited = pts[0]
        pts = [p for p in pts if p[0] > 0]
        if not pts:
            continue
        drawn = True
        c = _color(methods.index(r["spec"]["method"]))
        for ax, m in zip(axes[0], panels, strict=True):
            ax.plot([p[2] for p in pts], [p[1][m] for p in pts], color=c, lw=0.6, alpha=0.5)
        finals[r["spec"]["method"]].append((pts[-1][2], pts[-1][1]))
    for ax, m in zip(axes[0], panels, strict=True):
        for k, method in enumerate(methods):
            pts = sorted(finals[method], key=lambda t: t[0])
            if pts:
                ax.plot(
                    [p[0] for p in pts],
                    [p[1][m] for p in pts],
                    marker="o",
                    lw=2,
                    color=_color(k),
                    label=method,
                )
        if unedited is not None:
            ax.plot([unedited[2]], [unedited[1][m]], marker="*", ms=12, color="k", ls="", label="unedited")
        # a log axis where the perplexities span a decade or more (a collapsed model's thousands)
        xs = [x for line in ax.lines for x in line.get_xdata()]
        log_x = bool(xs) and max(xs) > 10 * min(xs)
        if log_x:
            ax.set_xscale("log")
        xlabel = "WikiText-2 perplexity" + (" (log scale)" if log_x else "")
        ax.set(title=f"{m} against perplexity", xlabel=xlabel, ylabel=f"{m} %")
        ax.grid(alpha=0.3)
    _legend(axes[0], 8)
    _save(plt, fig, out / "frontier.png", drawn, written)


def _plot(results: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """metrics.png (+ retention.png, capability.png, frontier.png, objective.png, stream.png where the
    runs have the data); returns the files written."""
    plt = _pyplot()
    if plt is None:
        return []
    written: list[Path] = []
    _plot_metrics(plt, results, out, written)
    _plot_retention(plt, results, out, written)
    _plot_capability(plt, results, out, written)
    # the adherence-preservation frontier (runs with both scores and perplexity at their checkpoints)
    if any(p[0] > 0 for r in results for p in frontier_points(r)):
        _plot_frontier(plt, results, out, written)
    _plot_objective(plt, results, out, written)
    _plot_stream(plt, results, out, written)
    return written


def _plot_metrics(plt: Any, results: Sequence[dict[str, Any]], out: Path, written: list[Path]) -> None:
    """metrics.png: efficacy / generalization / specificity over the stream (0 = the unedited model)."""
    fig, axes = plt.subplots(1, len(_METRICS), figsize=(4 * len(_METRICS), 3.2), squeeze=False)
    drawn = False
    for i, r in enumerate(results):
        pts = _metric_points(r)
        for ax, m in zip(axes[0], _METRICS, strict=True):
            xy = [(e, v[m]) for e, v in pts if v.get(m) is not None]
            if xy:
                drawn = True
                ax.plot(*zip(*xy, strict=True), marker="o", label=_label(r), color=_color(i))
    for ax, m in zip(axes[0], _METRICS, strict=True):
        ax.set(title=m, xlabel="edits", ylim=(0, 100))
        ax.grid(alpha=0.3)
    _legend(axes[0], 7)
    _save(plt, fig, out / "metrics.png", drawn, written)


def _plot_retention(plt: Any, results: Sequence[dict[str, Any]], out: Path, written: list[Path]) -> None:
    """retention.png: the earliest edits re-scored at each checkpoint."""
    fig, axes = plt.subplots(1, len(_METRICS), figsize=(4 * len(_METRICS), 3.2), squeeze=False)
    drawn = False
    for r in results:
        points = _retention_points(r)
        sizes = sorted({int(k) for _, slices in points for k in slices})
        for size in sizes:
            for ax, m in zip(axes[0], _METRICS, strict=True):
                xy = [
                    (e, slices[str(size)][m])
                    for e, slices in points
                    if str(size) in slices and slices[str(size)].get(m) is not None
                ]
                if xy:
                    drawn = True
                    ax.plot(*zip(*xy, strict=True), marker="o", label=f"{_label(r)}: first {size}")
    for ax, m in zip(axes[0], _METRICS, strict=True):
        ax.set(title=f"{m} of the earliest edits", xlabel="edits applied", ylim=(0, 100))
        ax.grid(alpha=0.3)
    _legend(axes[0], 6)
    _save(plt, fig, out / "retention.png", drawn, written)


def _plot_capability(plt: Any, results: Sequence[dict[str, Any]], out: Path, written: list[Path]) -> None:
    """capability.png: perplexity, fluency and task accuracies over the stream."""
    tasks = sorted(
        {
            k
            for r in results
            for c in _capability_points(r)
            for k, v in c[1].items()
            if isinstance(v, dict) and "accuracy" in v
        }
    )
    # fluency (generated text, from the metric summaries) beside perplexity where the runs measured it
    fluency = any(v.get("fluency") is not None for r in results for _, v in _metric_points(r))
    panels = ["perplexity", *(["fluency"] if fluency else []), *tasks]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.0), squeeze=False)
    drawn = False
    for i, r in enumerate(results):
        pts = _capability_points(r)
        for ax, name in zip(axes[0], panels, strict=True):
            if name == "fluency":
                xy = [(e, v["fluency"]) for e, v in _metric_points(r) if v.get("fluency") is not None]
            elif name == "perplexity":
                xy = [(e, c["perplexity"]["perplexity"]) for e, c in pts if "perplexity" in c]
            else:
                xy = [(e, c[name]["accuracy"]) for e, c in pts if name in c]
            if xy:
                drawn = True
                ax.plot(*zip(*xy, strict=True), marker="o", label=_label(r), color=_color(i))
                chance = next((c[name].get("chance") for _, c in pts if name in c), None)
                if name != "perplexity" and chance is not None:
                    ax.axhline(chance, color="grey", lw=0.8, ls=":")
    for ax, name in zip(axes[0], panels, strict=True):
        title = name + ("" if name in ("perplexity", "fluency") else " accuracy %")
        if name == "perplexity" and ax.lines:
            ax.set_yscale("log")  # a collapsed model's perplexity (thousands) would flatten the others
            title += " (log scale)"
        ax.set(title=title, xlabel="edits")
        ax.grid(alpha=0.3)
    _legend(axes[0], 6)
    _save(plt, fig, out / "capability.png", drawn, written)


def _plot_objective(plt: Any, results: Sequence[dict[str, Any]], out: Path, written: list[Path]) -> None:
    """objective.png: the objective's terms per layer over the stream (RLSEdit runs)."""
    terms = ("fit_batch", "fit_total", "dist_w0", "anchor")
    fig, axes = plt.subplots(1, len(terms), figsize=(4 * len(terms), 3.2), squeeze=False)
    drawn = False
    for r in results:
        rows = [(b["edits_after"], b["objective"]) for b in r.get("batches", []) if b.get("objective")]
        layers = sorted({int(k) for _, o in rows for k in o}, key=int)
        for layer in layers:
            for ax, t in zip(axes[0], terms, strict=True):
                xy = [
                    (e, o[str(layer)][t])
                    for e, o in rows
                    if str(layer) in o and o[str(layer)].get(t) is not None
                ]
                if xy:
                    drawn = True
                    ax.plot(*zip(*xy, strict=True), label=f"{_label(r)}: layer {layer}")
    for ax, t in zip(axes[0], terms, strict=True):
        ax.set(title=t, xlabel="edits", yscale="log")
        ax.grid(alpha=0.3)
    _legend(axes[0], 6)
    _save(plt, fig, out / "objective.png", drawn, written)


def _plot_stream(plt: Any, results: Sequence[dict[str, Any]], out: Path, written: list[Path]) -> None:
    """stream.png: seconds per edit and memory per batch over the stream."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2), squeeze=False)  # room for the two long titles
    drawn = False
    per_edit: list[float] = []
    for i, r in enumerate(results):
        bs = [b for b in r.get("batches", []) if b.get("n_requests")]
        xy = [
            (b["edits_after"], b["timings"]["total"] / b["n_requests"])
            for b in bs
            if "total" in b.get("timings", {})
        ]
        per_edit += [y for _, y in xy]
        if xy:
            drawn = True
            axes[0][0].plot(*zip(*xy, strict=True), marker=".", label=_label(r), color=_color(i))
        xy = [(b["edits_after"], b["memory"]["rss_bytes"] / 2**30) for b in bs if b.get("memory")]
        if xy:
            drawn = True
            axes[0][1].plot(*zip(*xy, strict=True), marker=".", label=_label(r), color=_color(i))
    # a batch whose wall time includes a pause (a stopped process) would flatten every other point
    log_time = _has_outlier(per_edit)
    axes[0][0].set(
        title="seconds per edit (each batch" + (", log scale)" if log_time else ")"), xlabel="edits"
    )
    axes[0][1].set(title="resident memory after each batch (GiB)", xlabel="edits")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    if log_time:
        axes[0][0].set_yscale("log")
    else:
        axes[0][0].set_ylim(bottom=0)
    axes[0][1].set_ylim(bottom=0)
    _legend(axes[0], 6)
    _save(plt, fig, out / "stream.png", drawn, written)


def _has_outlier(values: Sequence[float], factor: float = 5.0) -> bool:
    """Whether some value exceeds ``factor`` times the median of the positive ``values``."""
    pos = sorted(v for v in values if v > 0)
    return bool(pos) and pos[-1] > factor * pos[len(pos) // 2]


def _capability_points(r: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    cap = r.get("capability") or {}
    pts = []
    if cap.get("pre"):
        pts.append((0, cap["pre"]))
    pts += [(c["edits"], c) for c in cap.get("checkpoints", [])]
    if cap.get("post"):
        pts.append((cap["post"]["edits"], cap["post"]))
    return sorted({e: c for e, c in pts}.items())


def write_report(
    runs: Sequence[str | Path],
    out: str | Path,
    label_keys: Sequence[str] = (),
    plots: bool = True,
    partial: bool = False,
) -> Path:
    """Write ``out/REPORT.md`` (table + commands) and the figures (see :func:`_plot`); return the Markdown
    path. ``partial``: include runs still in progress (up to their last checkpoint)."""
    results = [load_results(r, partial=partial) for r in runs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = _plot(results, out) if plots else []
    text = ["# rlsedit report", "", results_table(results, label_keys)]
    frontier = frontier_table(results, label_keys)
    if frontier:
        text += [
            "The frontier: each run's last point with both scores and WikiText-2 perplexity, and its "
            "trajectory (edits: efficacy / perplexity):",
            "",
            frontier,
        ]
    text += ["Over the stream (checkpoints; 0 = before editing):", "", checkpoint_table(results)]
    text += [
        "Seconds per edit are totals of the batches' timings divided by the edits applied, over the batches "
        "whose targets were optimised in the run (batches whose targets came from a shared "
        "`--targets-cache` are left out of the timing; a static-target run counts every batch).",
        "",
    ]
    text += ["Commands:", ""]
    text += [f"- `{r.get('command') or '(not recorded)'}`" for r in results]
    for f in figures:
        text += ["", f"![{f.stem}]({f.name})"]
    path = out / "REPORT.md"
    atomic_write_bytes(path, ("\n".join(text) + "\n").encode())
    return path
