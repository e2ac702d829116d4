"""The run recorder: everything an editor writes to or reads from its run directory.

An editor keeps its configuration, per-layer state and batch list in memory; the recorder owns where they
go on disk (:class:`rlsedit.store.RunStore`): the per-batch record blobs (e.g. RLSEdit's ``K`` and ``V``),
the immutable static blobs (``W0``, ``Sigma``), the commit of a generation (state tensors + manifest) and
the journal entry that follows it. The crash protocol (see :mod:`rlsedit.store`) is carried out here:
records are written before the commit, discarded if the batch is rolled back, and a journal entry lost to
a crash between a commit and its append is rebuilt from the manifest before the next commit.

Without a run directory the recorder writes to a scratch folder (deleted with the recorder), so an editor
that was never saved can still read back its records (retraction, replays).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlsedit.models.arch import get_module, weight_kv
from rlsedit.store import CorruptStateError, RunLockedError, RunStore

__all__ = ["EDITOR_KIND", "RunRecorder", "journal_entry", "reconcile_journal", "write_saved_weights"]

log = logging.getLogger(__name__)

#: The ``kind`` of an editor's manifest in its run store (the store's own layout: ``store.RUN_FORMAT``).
EDITOR_KIND = "rlsedit-editor/2"
#: Older editor formats, upgraded by ``scripts/migrate_runs.py``.
OLD_EDITOR_KINDS = ("rlsedit-editor/1",)


def journal_entry(generation: int, manifest: dict[str, Any]) -> dict[str, Any]:
    """The journal entry of a committed generation: a function of its manifest alone, so an entry lost to
    a crash between the commit and the append is rebuilt exactly."""
    batches = manifest.get("batches", [])
    last = batches[-1] if batches else None
    return {
        "generation": generation,
        "method": manifest.get("method"),
        "n_batches": len(batches),
        "last_batch": None if last is None else last["id"],
        "last_hash": None if last is None else last["hash"],
        "n_active": sum(sum(b["active"]) for b in batches),
    }


def reconcile_journal(store: RunStore) -> None:
    """Before a commit: append the entry of the last committed generation if a crash lost it.

    The journal holds one entry per committed generation, appended right after the commit; it may lag
    the manifest by one entry (killed in between), never more (see :mod:`rlsedit.store`).
    """
    prev = store.load_manifest()
    if prev is None:
        return
    n = len(store.journal)
    if n == prev["journal_length"]:
        log.info(
            "%s: adding the journal entry of generation %d (interrupted)", store.root, prev["generation"]
        )
        store.journal.append(journal_entry(prev["generation"], prev))
    elif n != prev["journal_length"] + 1:
        raise CorruptStateError(
            f"{store.journal.path}: {n} entries, but generation {prev['generation']} was committed with "
            f"{prev['journal_length']} (expected that many or one more)"
        )


def _check_journal_length(store: RunStore, manifest: dict[str, Any]) -> None:
    extra = len(store.journal) - manifest["journal_length"]  # CorruptStateError if garbled inside
    if extra not in (0, 1):
        raise CorruptStateError(
            f"{store.journal.path}: {extra + manifest['journal_length']} entries, but generation "
            f"{manifest['generation']} was committed with {manifest['journal_length']} (expected that "
            "many or one more)"
        )


class RunRecorder:
    """Writes an editor's records and commits to its run directory (or a scratch folder without one).

    Attributes:
        attached: the run directory every applied batch is committed to, or None.
        static: references of the static blobs (``W0``, ``sigma``) once written.
    """

    def __init__(self, attached: RunStore | None = None, static: dict[str, dict] | None = None) -> None:
        self.attached = attached
        self.static: dict[str, dict] = dict(static or {})
        self._scratch: tempfile.TemporaryDirectory | None = None
        self._scratch_store: RunStore | None = None

    # -- where records live -------------------------------------------------------------------------------

    @property
    def store(self) -> RunStore:
        """The store the records are in: the attached run directory, else a scratch folder."""
        if self.attached is not None:
            return self.attached
        if self._scratch_store is None:  # made once: a RunStore scans its folder when opened
            self._scratch = tempfile.TemporaryDirectory(prefix="rlsedit-")
            self._scratch_store = RunStore(self._scratch.name)
        return self._scratch_store

    def is_attached_to(self, target: RunStore) -> bool:
        return self.attached is not None and Path(self.attached.root).resolve() == Path(target.root).resolve()

    def load(self, ref: dict) -> dict[str, torch.Tensor]:
        """The tensors of a recorded blob."""
        return self.store.load_blob(ref)

    def write_records(self, batch_id: int, records: dict[int, dict[str, torch.Tensor]]) -> dict[str, dict]:
        """Write each layer's record of batch ``batch_id`` (layers with an empty record are skipped);
        returns ``{str(layer): blob reference}``. On failure the blobs already written are removed."""
        # batch_id is new (one past the last committed batch), so a blob already at its path is a leftover
        # of an attempt that was killed or rolled back before its commit: replace it.
        refs: dict[str, dict] = {}
        store = self.store
        try:
            for layer, record in records.items():
                if record:
                    refs[str(layer)] = store.put_blob(
                        f"batches/{batch_id:06d}-layer{layer}.safetensors", record, replace=True
                    )
        except BaseException:
            self.discard(refs)
            raise
        return refs

    def discard(self, refs: dict[str, dict]) -> None:
        """Delete the record blobs of a batch that was not committed (best effort)."""
        if not refs:
            return
        store = self.store
        for ref in refs.values():
            try:
                store.discard_blob(ref["path"])
            except (OSError, ValueError) as exc:  # it is replaced by the next attempt anyway
                log.warning("could not remove the uncommitted record %s: %s", ref["path"], exc)

    def ensure_static(
        self, target: RunStore, W0: dict[int, torch.Tensor], sigmas: dict[int, torch.Tensor]
    ) -> dict[str, dict]:
        """Write ``W0`` and ``Sigma`` once per run directory, as immutable blobs; returns their refs."""
        src = self.store
        if not self.static:
            fresh = src.load_manifest() is None  # nothing committed: blobs there are leftovers of a crash
            static = {
                "W0": src.put_blob(
                    "static/W0.safetensors", {str(k): v.contiguous() for k, v in W0.items()}, replace=fresh
                )
            }
            if sigmas:
                static["sigma"] = src.put_blob(
                    "static/sigma.safetensors", {str(k): v for k, v in sigmas.items()}, replace=fresh
                )
            self.static = static
        if target is not src:
            fresh = target.load_manifest() is None
            for ref in self.static.values():
                target.put_blob(ref["path"], src.load_blob(ref), replace=fresh)
        return self.static

    def copy_records(self, target: RunStore, batches: list[dict[str, Any]]) -> None:
        """Copy every record of ``batches`` and the static blobs into ``target`` (saving elsewhere)."""
        self._copy_blobs(self.store, target, batches)

    def _copy_blobs(self, source: RunStore, target: RunStore, batches: list[dict[str, Any]]) -> None:
        fresh = target.load_manifest() is None  # no committed run there: its blobs are leftovers
        refs = [ref for b in batches for ref in b.get("records", {}).values()]
        for ref in [*refs, *self.static.values()]:
            target.put_blob(ref["path"], source.load_blob(ref), replace=fresh)

    # -- commits ------------------------------------------------------------------------------------------

    def commit(
        self, target: RunStore, state: dict[str, dict[str, torch.Tensor]], manifest: dict[str, Any]
    ) -> int:
        """Commit one generation (``state``: groups of tensors; ``manifest``: JSON) to ``target``, then
        append its journal entry; returns the generation."""
        with target.lock():
            reconcile_journal(target)
            generation = target.commit(state, manifest)
            try:
                target.journal.append(journal_entry(generation, manifest))
            except OSError as exc:  # committed already; the next commit adds the missing entry
                log.warning(
                    "%s: journal entry of generation %d not written: %s", target.root, generation, exc
                )
        return generation

    # -- reading a saved run ------------------------------------------------------------------------------

    @staticmethod
    def open(store: RunStore) -> dict[str, Any]:
        """The committed editor manifest of ``store`` (FileNotFoundError if there is none)."""
        manifest = store.load_manifest()
        if manifest is not None and manifest.get("kind") in OLD_EDITOR_KINDS:
            raise ValueError(
                f"{store.root} was saved by an older rlsedit ({manifest['kind']}); upgrade it first: "
                f"python scripts/migrate_runs.py {store.root}"
            )
        if manifest is None or manifest.get("kind") != EDITOR_KIND:
            raise FileNotFoundError(f"{store.root} holds no saved editor (no committed manifest)")
        return manifest

    @classmethod
    def restored(cls, store: RunStore, manifest: dict[str, Any]) -> RunRecorder:
        """A recorder attached to ``store`` as committed with ``manifest`` (its journal checked)."""
        _check_journal_length(store, manifest)
        return cls(store, manifest["static"])

    def detach(self, batches: list[dict[str, Any]]) -> None:
        """Stop committing to the attached directory, copying the records of ``batches`` and the static
        blobs to a scratch folder first (they stay readable)."""
        source = self.attached
        if source is None:
            return
        self.attached = None
        self._copy_blobs(source, self.store, batches)

    def finish_interrupted(self) -> None:
        """Finish what a crash right after the attached directory's last commit left undone (its journal
        entry, temporary files), unless another process holds the directory."""
        store = self.attached
        if store is None:
            return
        try:
            with store.lock():
                reconcile_journal(store)
                store.tidy()
        except RunLockedError:
            log.debug("%s is locked by another process; its journal is left as it is", store.root)


def write_saved_weights(
    model: nn.Module, modules: dict[int, str], W0: dict[int, torch.Tensor], weights: dict[str, torch.Tensor]
) -> None:
    """Check that every edited module ``modules[layer]`` of ``model`` holds this run's base weight
    ``W0[layer]`` or its saved weight ``weights[str(layer)]`` (``(d_k, d_v)``), then
    write the saved weights."""
    for layer, name in modules.items():
        w = weight_kv(get_module(model, name))
        saved = weights[str(layer)]
        if tuple(saved.shape) != tuple(w.shape):
            raise ValueError(
                f"{name}: saved weight has shape {tuple(saved.shape)}, model has {tuple(w.shape)}"
            )
        base = W0[layer].to(w.dtype)
        if not (torch.equal(w.detach().cpu(), base) or torch.equal(w.detach().cpu(), saved.to(w.dtype))):
            raise ValueError(f"{name}: the model is neither the base model of this run nor its edited state")
    for layer, name in modules.items():
        w = weight_kv(get_module(model, name))
        with torch.no_grad():
            w.copy_(weights[str(layer)].to(device=w.device, dtype=w.dtype))
