"""Readers of an experiment folder (`rlsedit run`'s output): its results, checkpoints and batch timings.

Both the experiment (which writes the folder) and the report (which reads many) import these; neither
imports the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlsedit.store import load_json

__all__ = ["batch_targets_cached", "load_checkpoints", "load_results", "timing_sums"]


def load_results(run: str | Path, partial: bool = False) -> dict[str, Any]:
    """``results.json`` of an experiment folder.

    A run that has not finished has none: that is an error, unless ``partial``, in which case what the
    folder holds so far is assembled (spec, batch reports, checkpoints, capability checkpoints, pre-edit
    scores if computed) with ``"partial": True``, ``"edits"`` = the last checkpoint's edits (its summary
    is ``"post"``) and ``"edits_applied"`` = the edits applied so far.
    """
    run = Path(run)
    path = run / "results.json"
    if path.exists():
        res = load_json(path)
        res["_dir"] = str(run)
        return res
    if not (run / "spec.json").exists():
        raise FileNotFoundError(f"{run}: no results.json and no spec.json: not a folder of `rlsedit run`")
    if not partial:
        raise FileNotFoundError(
            f"{run}: no results.json: the run has not finished (report it as far as it got with --partial)"
        )
    spec = load_json(run / "spec.json")
    batches = load_json(run / "batches.json") if (run / "batches.json").exists() else []
    cks = load_checkpoints(run)
    cap_dir = run / "capability"
    capability = None
    if (cap_dir / "pre.json").exists():
        capability = {
            "pre": load_json(cap_dir / "pre.json"),
            "checkpoints": [load_json(p) for p in sorted(cap_dir.glob("[0-9]*.json"))],
        }
    pre = load_json(run / "pre.json")["summary"] if (run / "pre.json").exists() else {}
    gen_pre = run / "generation" / "pre.json"
    if gen_pre.exists():  # the unedited model's fluency, even before its case scores exist
        pre = {**pre, **load_json(gen_pre)["summary"]}
    invocations = load_json(run / "invocations.json") if (run / "invocations.json").exists() else []
    return {
        "spec": spec,
        "command": invocations[0] if invocations else None,
        "config": {},
        "edits": cks[-1]["edits"] if cks else 0,
        "edits_applied": batches[-1]["edits_after"] if batches else 0,
        "pre": pre,
        "post": cks[-1]["summary"] if cks else {},
        "checkpoints": cks,
        "capability": capability,
        "batches": batches,
        "partial": True,
        "_dir": str(run),
    }


def load_checkpoints(out: str | Path) -> list[dict[str, Any]]:
    """The checkpoints of experiment folder ``out`` (``checkpoints/N.json``) in order of edits. Where the
    stream was also generated from at that point (``generation/N.json``), its summary (fluency,
    consistency, ``generation_n``) is merged into the checkpoint's ``summary`` and kept whole under
    ``"generation"``."""
    out = Path(out)
    cks = []
    for p in sorted((out / "checkpoints").glob("[0-9]*.json")):
        ck = load_json(p)
        gen = out / "generation" / p.name
        if gen.exists():
            g = load_json(gen)["summary"]
            ck = {**ck, "summary": {**ck["summary"], **g}, "generation": g}
        cks.append(ck)
    return cks


def batch_targets_cached(batch: dict[str, Any]) -> bool:
    """Whether a batch report's targets came from a ``--targets-cache`` (a report written before batches
    carried ``targets_cached`` is upgraded by ``scripts/migrate_runs.py``)."""
    return bool(batch.get("targets_cached", False))


def timing_sums(
    batches: list[dict[str, Any]], skip_cached_targets: bool = False
) -> tuple[dict[str, float], int]:
    """Summed ``timings`` of batch reports and the number of requests they cover (optionally leaving out
    batches whose targets were read from a cache)."""
    sums: dict[str, float] = {}
    n = 0
    for b in batches:
        if skip_cached_targets and batch_targets_cached(b):
            continue
        n += int(b["n_requests"])
        for key, v in b.get("timings", {}).items():
            sums[key] = sums.get(key, 0.0) + float(v)
    return sums, n
