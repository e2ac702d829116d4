"""Upgrade run folders written by older versions of rlsedit to the current formats, in place.

    python scripts/migrate_runs.py FOLDER [FOLDER ...] [--targets-cache DIR] [--dry-run]

A FOLDER is an experiment folder of ``rlsedit run`` (``spec.json``; its ``editor/`` is upgraded too), an
editor's run directory (``manifest.json``: ``rlsedit edit``, ``editor.save``) or a folder holding either
below it (every one found is upgraded). Each step is idempotent: a folder in the current format is left
as it is. What changes:

* ``spec.json`` (``rlsedit-experiment/1`` -> ``/2``): the fields added after the first format are written
  with the value an older spec stood for (``fluency`` 100, ``capability`` and ``consistency_dir`` None,
  ``checkpoint_cases`` 0, ``targets`` "dynamic"; in ``capability``: no ``lm_eval`` tasks, and
  ``backend`` "rlsedit", the only scorer then, or "auto" where no task was scored).
* ``batches.json``: a report without ``targets_cached`` gets it (cached when it shows under 0.5 s of
  target optimisation: an optimisation takes minutes); with ``--targets-cache DIR``, a report without
  ``targets_keys`` gets the key of the one file in DIR holding its request count and exactly its mean
  initial and final NLL (none where no single file matches: a replay then optimises those targets anew).
* the editor's run directory (``rlsedit-editor/1`` -> ``/2``): an RLSEdit state without the running sums
  ``B = sum K V`` and ``vv = sum ||V||^2`` gets them from the recorded batches (their active requests, in
  float64 from the float32 records), and a new generation is committed (journal entry included).

Nothing else is rewritten; the weights and every other state tensor are carried over bit for bit.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from rlsedit.experiment import SPEC_FORMAT
from rlsedit.recorder import EDITOR_KIND, RunRecorder
from rlsedit.store import RESERVED_MANIFEST_KEYS, RunLockedError, RunStore, load_json, load_tensors, save_json

log = logging.getLogger("migrate_runs")

OLD_SPEC_FORMAT = "rlsedit-experiment/1"
OLD_EDITOR_KIND = "rlsedit-editor/1"
#: Spec fields added after the first spec format, with the value an older spec.json stands for.
LATER_FIELDS: dict[str, Any] = {
    "fluency": 100,
    "capability": None,
    "consistency_dir": None,
    "checkpoint_cases": 0,
    "targets": "dynamic",
}


def migrate_spec(path: Path, dry_run: bool = False) -> bool:
    """Upgrade ``spec.json`` at ``path``; returns whether it changed."""
    spec = load_json(path)
    if spec.get("format") not in (OLD_SPEC_FORMAT, SPEC_FORMAT):
        raise ValueError(f"{path}: unknown spec format {spec.get('format')!r}")
    new = {**LATER_FIELDS, **spec, "format": SPEC_FORMAT}
    if isinstance(new["capability"], dict):
        new["capability"] = {**later_capability_fields(new["capability"]), **new["capability"]}
    if new == spec:
        return False
    if not dry_run:
        save_json(path, new)
    return True


def later_capability_fields(capability: dict[str, Any]) -> dict[str, Any]:
    """The capability settings added after a spec was written, with the value it stood for: no
    lm-evaluation-harness tasks, and the GLUE / MMLU tasks scored by rlsedit's own code (the only scorer
    then; where no task was asked for the scorer is moot, and the default "auto" is written)."""
    return {
        "backend": "rlsedit" if capability.get("tasks") else "auto",
        "lm_eval": [],
        "lm_eval_limit": None,
    }


def cached_target_figures(cache: Path) -> dict[str, tuple[int, float, float]]:
    """``{key: (requests, mean initial NLL, mean final NLL)}`` of every ``targets-<key>.safetensors`` in
    ``cache`` (an unreadable file is skipped with a warning)."""
    index: dict[str, tuple[int, float, float]] = {}
    for path in sorted(cache.glob("targets-*.safetensors")):
        try:
            t = load_tensors(path)
            index[path.name[len("targets-") : -len(".safetensors")]] = (
                int(t["z"].shape[0]),
                float(t["nll_init"].mean()),
                float(t["nll_final"].mean()),
            )
        except Exception as exc:  # an unreadable file matches nothing
            log.warning("ignoring the cached target file %s: %s", path, exc)
    return index


def matching_keys(report: dict[str, Any], index: dict[str, tuple[int, float, float]]) -> list[str]:
    """The key of the one cached file with ``report``'s request count and exactly its mean NLLs ([] where
    none or several match)."""
    want = (int(report["n_requests"]), report.get("target_nll_init"), report.get("target_nll_final"))
    keys = [k for k, figures in index.items() if figures == want]
    return keys if len(keys) == 1 else []


def migrate_batches(path: Path, cache: Path | None, dry_run: bool = False) -> bool:
    """Add ``targets_cached`` (and, with ``cache``, ``targets_keys``) to the reports in ``batches.json``
    at ``path`` that lack them; returns whether it changed."""
    reports = load_json(path)
    index = cached_target_figures(cache) if cache is not None and cache.is_dir() else None
    changed = False
    for r in reports:
        if "targets_cached" not in r:
            r["targets_cached"] = float(r.get("timings", {}).get("targets", 0.0)) < 0.5
            changed = True
        if "targets_keys" not in r and index is not None:
            keys = matching_keys(r, index)
            if keys:
                r["targets_keys"] = keys
                changed = True
    if changed and not dry_run:
        save_json(path, reports)
    return changed


def running_sums(store: RunStore, manifest: dict[str, Any], layer: int) -> dict[str, torch.Tensor]:
    """``B (d_k, d_v)`` and ``vv (1,)`` (float64) of ``layer`` over the active requests of every recorded
    batch of the run in ``store``."""
    B: torch.Tensor | None = None
    vv = torch.zeros(1, dtype=torch.float64)
    for b in manifest["batches"]:
        cols = [j for j, a in enumerate(b["active"]) if a]
        if not cols or str(layer) not in b.get("records", {}):
            continue
        rec = store.load_blob(b["records"][str(layer)])
        K, V = rec["K"][:, cols].double(), rec["V"][cols].double()
        B = K @ V if B is None else B + K @ V
        vv += (V * V).sum()
    if B is None:  # nothing active: the sums of no request
        w0 = store.load_blob(manifest["static"]["W0"])[str(layer)]
        B = torch.zeros(w0.shape, dtype=torch.float64)
    return {"B": B, "vv": vv}


def migrate_editor(directory: Path, dry_run: bool = False) -> bool:
    """Upgrade the editor's run directory ``directory``; returns whether it changed."""
    store = RunStore(directory, create=False)
    current = store.load_manifest()
    if current is None or current.get("kind") == EDITOR_KIND:
        return False  # nothing to do: no need to take the lock (a running stream may hold it)
    with store.lock():
        manifest = store.load_manifest()
        if manifest is None or manifest.get("kind") == EDITOR_KIND:
            return False
        if manifest.get("kind") != OLD_EDITOR_KIND:
            raise ValueError(f"{directory}: unknown editor format {manifest.get('kind')!r}")
        state = {name: store.load_state(name) for name in manifest["files"]}
        if manifest["method"] == "rlsedit":
            for name, group in state.items():
                if name.startswith("layer") and "B" not in group:
                    sums = running_sums(store, manifest, int(name[len("layer") :]))
                    group.update({k: v.to(group["A"].device) for k, v in sums.items()})
        new = {k: v for k, v in manifest.items() if k not in RESERVED_MANIFEST_KEYS}
        new["kind"] = EDITOR_KIND
        if not dry_run:
            RunRecorder(store).commit(store, state, new)
    return True


def find_folders(root: Path) -> list[Path]:
    """Experiment folders (``spec.json``) and editor run directories (``manifest.json`` not inside an
    experiment folder's ``editor/``) at or below ``root``."""
    found = [p.parent for p in sorted(root.rglob("spec.json"))]
    for m in sorted(root.rglob("manifest.json")):
        if not (m.parent.name == "editor" and (m.parent.parent / "spec.json").is_file()):
            found.append(m.parent)
    if (root / "spec.json").is_file() or (root / "manifest.json").is_file():
        found = [root, *[f for f in found if f != root]]
    return found


def migrate(folder: Path, cache: Path | None = None, dry_run: bool = False) -> list[str]:
    """Upgrade one folder (experiment or editor run directory); returns what changed."""
    changed = []
    if (folder / "spec.json").is_file():
        if migrate_spec(folder / "spec.json", dry_run):
            changed.append("spec.json")
        if (folder / "batches.json").is_file() and migrate_batches(folder / "batches.json", cache, dry_run):
            changed.append("batches.json")
        if (folder / "editor" / "manifest.json").is_file() and migrate_editor(folder / "editor", dry_run):
            changed.append("editor/")
    elif (folder / "manifest.json").is_file() and migrate_editor(folder, dry_run):
        changed.append("run directory")
    return changed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path)
    p.add_argument("--targets-cache", type=Path, default=None, help="the cache the runs' targets came from")
    p.add_argument("--dry-run", action="store_true", help="say what would change, change nothing")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for root in args.folders:
        folders = find_folders(root)
        if not folders:
            log.error("%s: no experiment folder or run directory found", root)
            return 1
        for folder in folders:
            try:
                changed = migrate(folder, args.targets_cache, args.dry_run)
            except RunLockedError as exc:
                log.error("%s: skipped (%s)", folder, exc)
                continue
            verb = "would upgrade" if args.dry_run else "upgraded"
            log.info("%s: %s", folder, f"{verb} {', '.join(changed)}" if changed else "current already")
    return 0


if __name__ == "__main__":
    sys.exit(main())
