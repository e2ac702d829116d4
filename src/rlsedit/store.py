"""Crash-safe persistence for a lifelong editing run: tensors, JSON, an append-only journal, a run directory.

An editor changes a model batch after batch for weeks; everything it needs to resume lives in a *run
directory* managed by :class:`RunStore`. The rules:

* Only safetensors and JSON are ever read or written (no pickle, no ``torch.load``), so a tampered file
  can at worst give an error, never run code.
* Every file is written atomically (temp file in the same directory, ``fsync``, ``os.replace``, ``fsync`` of
  the directory), so a reader sees the old file or the new one, never a mixture.
* Every file is verified when read: ``sha256`` of the whole file when the caller knows it (manifest
  references do), and in any case a content digest that :func:`save_tensors` embeds in the safetensors
  metadata and a self-checksum inside ``manifest.json``. A truncated, garbled or foreign file raises
  :class:`CorruptStateError` naming the file; it is never returned as data.

Layout of a run directory::

    manifest.json                 the single commit point (generation, state file references, caller data)
    state/<name>.g<gen>.safetensors
                                  tensor groups of one generation (rewritten at every commit)
    batches/000005.safetensors    immutable blobs written with RunStore.put_blob (any relative path)
    journal.jsonl                 append-only log, one checksummed JSON record a line
    .lock                         flock target of RunStore.lock()

Crash protocol (a process killed with SIGKILL at any moment, then restarted):

1. :meth:`RunStore.commit` writes the new generation's state files, then atomically replaces
   ``manifest.json`` (the commit point), then deletes state files the new manifest no longer references.
   Killed before the replace: the previous generation is intact and the new files are orphans, removed by
   the next commit. Killed after it: the new generation is committed.
2. The caller appends its journal entry for generation ``g`` *after* ``commit`` returns, so the journal
   lags the manifest by at most one entry. Each manifest records ``journal_length``, the number of entries
   at commit time; on restart ``len(journal) - manifest["journal_length"]`` is 1 (all done) or 0 (append
   the missing entry for ``manifest["generation"]``), anything else is corruption.
3. Temp files left by a killed writer are removed when a store is opened (if no other process holds the
   lock) and when the lock is taken. Committed files are never touched.
4. A journal append killed mid-write leaves a torn last line; :meth:`Journal.entries` ignores it with a
   warning and :meth:`Journal.repair` (run automatically before the next append) truncates it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from rlsedit.files import (
    _SHA_RE,
    TMP_SUFFIX,
    CorruptStateError,
    _canonical_json,
    _check_json_native,
    _decode_tensors,
    _fsync_dir,
    _is_temp_name,
    _serialize_tensors,
    atomic_write_bytes,
    load_json,
    load_tensors,
    load_tensors_metadata,
    save_json,
    save_tensors,
    sha256_bytes,
    sha256_file,
)
from rlsedit.journal import Journal

__all__ = [
    "CorruptStateError",
    "RunLockedError",
    "atomic_write_bytes",
    "sha256_bytes",
    "sha256_file",
    "save_tensors",
    "load_tensors",
    "load_tensors_metadata",
    "save_json",
    "load_json",
    "Journal",
    "RunStore",
    "RESERVED_MANIFEST_KEYS",
    "RUN_FORMAT",
    "TMP_SUFFIX",
]

logger = logging.getLogger(__name__)

#: Value of ``manifest["format"]`` written by this version.
RUN_FORMAT = "rlsedit-run/1"

#: Manifest keys the store writes itself (a caller's manifest may not use them; strip them to recommit).
RESERVED_MANIFEST_KEYS = frozenset({"generation", "files", "format", "journal_length", "checksum"})
_GROUP_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
_STATE_FILE_RE = re.compile(r"^(?P<name>.+)\.g(?P<gen>[0-9]+)\.safetensors$")


class RunLockedError(RuntimeError):
    """Another process holds the lock of a run directory."""


# --------------------------------------------------------------------------------------------------------
# Low-level helpers
# --------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------
# Tensors (safetensors)
# --------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------
# Journal
# --------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------
# Run directory
# --------------------------------------------------------------------------------------------------------


def _manifest_checksum(manifest: Mapping[str, Any]) -> str:
    return sha256_bytes(_canonical_json({k: v for k, v in manifest.items() if k != "checksum"}).encode())


class RunStore:
    """A run directory holding generations of tensor state, immutable blobs and a journal.

    ``manifest.json`` is the single commit point: :meth:`commit` writes the state files of generation
    ``g`` first and the manifest last, so after a crash the directory always holds the last committed
    generation intact. Writers should hold :meth:`lock` (``commit`` and ``put_blob`` take it themselves if
    this store does not hold it already). Not thread-safe; one store object per thread.

    Args:
        root: the run directory.
        create: create ``root`` if missing; with ``False`` a missing directory raises FileNotFoundError.
    """

    MANIFEST = "manifest.json"
    JOURNAL = "journal.jsonl"
    LOCK = ".lock"
    STATE_DIR = "state"

    def __init__(self, root: Path | str, create: bool = True) -> None:
        self.root = Path(root)
        if not self.root.exists():
            if not create:
                raise FileNotFoundError(f"run directory {self.root} does not exist")
            self.root.mkdir(parents=True)
            _fsync_dir(self.root.parent)
        if not self.root.is_dir():
            raise NotADirectoryError(f"run directory {self.root} is not a directory")
        self._lock_fd: int | None = None
        self._lock_depth = 0
        self._journal = Journal(self.root / self.JOURNAL)
        self._clean_temps_if_unlocked()

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r})"

    # ---- locking ----------------------------------------------------------------------------------------

    @contextmanager
    def lock(self) -> Iterator[RunStore]:
        """Hold an exclusive, non-blocking ``flock`` on ``root/.lock`` for the ``with`` block.

        Re-entrant within this store object. Raises :class:`RunLockedError` if another process (or another
        store object on the same directory) holds it. The kernel releases the lock when the process dies.
        """
        if self._lock_fd is not None:
            self._lock_depth += 1
            try:
                yield self
            finally:
                self._lock_depth -= 1
            return
        lock_path = self.root / self.LOCK
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = ""
            try:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            except OSError:
                pass
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise RunLockedError(
                    f"run directory {self.root} is locked by another process"
                    + (f" (pid {holder})" if holder else "")
                    + "; only one editor may write to a run at a time"
                ) from e
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._lock_fd = fd
            self._lock_depth = 1
            self._clean_temps()
            yield self
        finally:
            self._lock_fd = None
            self._lock_depth = 0
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    @property
    def locked(self) -> bool:
        """Whether this store object currently holds the run lock."""
        return self._lock_fd is not None

    def _clean_temps(self, directories: list[Path] | None = None) -> int:
        """Remove temp files of interrupted atomic writes (caller holds the lock).

        Looks in ``directories`` only (not recursively), or everywhere under root when None.
        """
        if directories is None:
            walk: Iterator[tuple[str, list[str], list[str]]] = os.walk(self.root)
        else:
            walk = ((str(d), [], os.listdir(d)) for d in directories if d.is_dir())
        removed = 0
        for dirpath, _dirnames, filenames in walk:
            here = 0
            for name in filenames:
                if _is_temp_name(name):
                    try:
                        os.unlink(os.path.join(dirpath, name))
                        here += 1
                    except FileNotFoundError:
                        pass
            if here:
                _fsync_dir(Path(dirpath))
                removed += here
        if removed:
            logger.warning("%s: removed %d temp file(s) left by an interrupted write", self.root, removed)
        return removed

    def _clean_temps_if_unlocked(self) -> None:
        """On open: clean temp files unless another writer holds the lock (its temps are live)."""
        try:
            fd = os.open(self.root / self.LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as e:
            logger.debug("%s: cannot open lock file (%s); not cleaning temp files", self.root, e)
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                logger.debug("%s: locked by another writer; not cleaning temp files", self.root)
                return
            self._clean_temps()
        finally:
            os.close(fd)  # releases the flock

    # ---- paths ------------------------------------------------------------------------------------------

    def _resolve(self, relpath: object, source: str) -> Path:
        """root/relpath for a safe relative POSIX path (CorruptStateError if it escapes root)."""
        if not isinstance(relpath, str) or not relpath:
            raise CorruptStateError(f"{source}: invalid path {relpath!r}")
        parts = relpath.split("/")
        if any(part in ("", ".", "..") for part in parts) or "\\" in relpath or "\0" in relpath:
            raise CorruptStateError(f"{source}: path {relpath!r} is not a plain relative path inside the run")
        return self.root.joinpath(*parts)

    def _check_ref(self, ref: object, source: str) -> tuple[Path, str]:
        if not isinstance(ref, dict) or not {"path", "sha256"} <= set(ref):
            raise CorruptStateError(f"{source}: not a file reference {{'path', 'sha256'}}: {ref!r}")
        path = self._resolve(ref["path"], source)
        sha = ref["sha256"]
        if not isinstance(sha, str) or not _SHA_RE.match(sha):
            raise CorruptStateError(f"{source}: invalid sha256 {sha!r} for {ref['path']!r}")
        return path, sha

    def _makedirs(self, directory: Path) -> None:
        """Create ``directory`` (inside root) and its parents durably."""
        missing = []
        d = directory
        while not d.exists():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            d.mkdir(exist_ok=True)
            _fsync_dir(d.parent)

    # ---- blobs ------------------------------------------------------------------------------------------

    def _blob_path(self, relpath: object, what: str) -> Path:
        """root/relpath for a valid blob path (ValueError otherwise)."""
        if not isinstance(relpath, str) or not relpath.endswith(".safetensors"):
            raise ValueError(f"blob path must be a relative path ending in .safetensors, got {relpath!r}")
        try:
            path = self._resolve(relpath, what)
        except CorruptStateError as e:
            raise ValueError(str(e)) from None
        parts = relpath.split("/")
        if parts[0] in (self.STATE_DIR, self.MANIFEST, self.JOURNAL, self.LOCK) or any(
            part.startswith(".") for part in parts
        ):
            raise ValueError(f"blob path {relpath!r} is reserved (state/, hidden names, run files)")
        return path

    def put_blob(
        self,
        relpath: str,
        tensors: Mapping[str, torch.Tensor],
        metadata: dict[str, str] | None = None,
        *,
        replace: bool = False,
    ) -> dict[str, str]:
        """Write an immutable safetensors blob at ``root/relpath``; return ``{"path", "sha256"}``.

        ``relpath`` is a relative POSIX path ending in ``.safetensors`` outside ``state/`` (e.g.
        ``"batches/000005.safetensors"``). If the blob exists with the same content (tensors and metadata)
        its reference is returned and nothing is written, so re-running a step after a crash is harmless;
        different content raises FileExistsError; an existing corrupt blob raises CorruptStateError.
        With ``replace=True`` an existing blob (identical, different or corrupt) is atomically replaced:
        only for blobs the caller knows no committed manifest references yet (e.g. one left by an attempt
        that was killed or rolled back before its commit, whose recomputation may differ in the last bit).
        """
        path = self._blob_path(relpath, "put_blob")
        data, digest = _serialize_tensors(tensors, metadata)
        with self.lock():
            if path.exists() and replace:
                logger.debug("%s: replacing uncommitted blob %s", self.root, relpath)
            elif path.exists():
                # Verified read (CorruptStateError if the existing blob is damaged), then compare contents.
                _, _, existing = _decode_tensors(path, None, verify=True, want_tensors=False)
                if existing != digest:
                    raise FileExistsError(
                        f"blob {relpath!r} already exists in {self.root} with different content; "
                        "blobs are immutable"
                    )
                logger.debug("%s: blob %s already present with identical content", self.root, relpath)
                return {"path": relpath, "sha256": sha256_file(path)}
            self._makedirs(path.parent)
            atomic_write_bytes(path, data)
        return {"path": relpath, "sha256": sha256_bytes(data)}

    def discard_blob(self, relpath: str) -> bool:
        """Delete the blob at ``root/relpath`` if it exists; return whether it did.

        Only for blobs no committed manifest references (e.g. those of a batch that was rolled back).
        """
        path = self._blob_path(relpath, "discard_blob")
        with self.lock():
            try:
                os.unlink(path)
            except FileNotFoundError:
                return False
            _fsync_dir(path.parent)
        logger.debug("%s: discarded uncommitted blob %s", self.root, relpath)
        return True

    def load_blob(
        self, ref: Mapping[str, str], device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Load a blob by the reference :meth:`put_blob` returned, verifying its sha256.

        A blob that is missing, truncated or altered raises :class:`CorruptStateError`.
        """
        path, sha = self._check_ref(dict(ref) if isinstance(ref, Mapping) else ref, "blob reference")
        try:
            return load_tensors(path, expected_sha256=sha, device=device)
        except FileNotFoundError:
            raise CorruptStateError(f"{path}: referenced by the run but missing") from None

    # ---- manifest and state -----------------------------------------------------------------------------

    @property
    def manifest_path(self) -> Path:
        return self.root / self.MANIFEST

    @property
    def journal(self) -> Journal:
        """The run's :class:`Journal` at ``root/journal.jsonl``."""
        return self._journal

    def load_manifest(self) -> dict[str, Any] | None:
        """The committed manifest (without its ``checksum`` key), or None when nothing was committed yet.

        Verifies the manifest's self-checksum, format and file references (CorruptStateError otherwise).
        """
        try:
            obj = load_json(self.manifest_path)
        except FileNotFoundError:
            return None
        src = str(self.manifest_path)
        if not isinstance(obj, dict):
            raise CorruptStateError(f"{src}: manifest is not a JSON object")
        if obj.get("checksum") != _manifest_checksum(obj):
            raise CorruptStateError(f"{src}: manifest checksum mismatch; the file is corrupt or was edited")
        if obj.get("format") != RUN_FORMAT:
            raise CorruptStateError(
                f"{src}: unsupported run format {obj.get('format')!r} (expected {RUN_FORMAT!r})"
            )
        gen, jl, files = obj.get("generation"), obj.get("journal_length"), obj.get("files")
        if type(gen) is not int or gen < 1 or type(jl) is not int or jl < 0 or not isinstance(files, dict):
            raise CorruptStateError(f"{src}: malformed manifest (generation/journal_length/files)")
        for name, ref in files.items():
            self._check_ref(ref, f"{src} files[{name!r}]")
        obj.pop("checksum")
        return obj

    def load_state(self, name: str, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The tensor group ``name`` of the committed generation, verified against the manifest's sha256.

        Raises LookupError when nothing is committed or the group is absent, CorruptStateError when the file
        is missing or does not match.
        """
        for _attempt in range(3):
            manifest = self.load_manifest()
            if manifest is None:
                raise LookupError(f"{self.root}: nothing committed yet")
            if name not in manifest["files"]:
                raise LookupError(
                    f"{self.root}: no state group {name!r} in generation {manifest['generation']}"
                )
            path, sha = self._check_ref(manifest["files"][name], str(self.manifest_path))
            try:
                return load_tensors(path, expected_sha256=sha, device=device)
            except FileNotFoundError:
                # A concurrent commit may have collected it; retry if the manifest moved on.
                now = self.load_manifest()
                if now is not None and now["generation"] != manifest["generation"]:
                    continue
                raise CorruptStateError(
                    f"{self.root}: state file {path} of generation {manifest['generation']} is missing"
                ) from None
        raise CorruptStateError(f"{self.root}: state kept changing while loading {name!r}")

    def commit(self, state: Mapping[str, Mapping[str, torch.Tensor]], manifest: Mapping[str, Any]) -> int:
        """Commit a new generation: tensor groups ``state`` plus the caller's JSON ``manifest``; return it.

        Writes ``state/<name>.g<gen>.safetensors`` for every group, then atomically ``manifest.json`` =
        ``manifest`` + ``generation``, ``files`` (``{name: {"path", "sha256"}}``), ``format``,
        ``journal_length`` (entries in the journal now) and ``checksum`` — the commit point — then deletes
        state files the new manifest does not reference, and temp files. Groups absent from ``state`` are
        not carried over. Raises CorruptStateError (before writing anything) if the current manifest is
        corrupt or the journal has fewer entries than the last manifest recorded.
        """
        if not isinstance(manifest, Mapping):
            raise TypeError(f"manifest must be a dict, got {type(manifest).__name__}")
        clash = RESERVED_MANIFEST_KEYS & set(manifest)
        if clash:
            raise ValueError(f"manifest keys {sorted(clash)} are reserved by RunStore")
        manifest = dict(manifest)
        _check_json_native(manifest)
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict of group name -> tensors, got {type(state).__name__}")
        for name in state:
            if not isinstance(name, str) or not _GROUP_NAME_RE.match(name):
                raise ValueError(f"invalid state group name {name!r} (letters, digits, _ . -; max 128)")
        with self.lock():
            prev = self.load_manifest()
            gen = 1 if prev is None else prev["generation"] + 1
            journal_length = len(self._journal)
            if prev is not None and journal_length < prev["journal_length"]:
                raise CorruptStateError(
                    f"{self._journal.path}: has {journal_length} entries but generation {prev['generation']} "
                    f"was committed when it had {prev['journal_length']}; journal entries were lost"
                )
            state_dir = self.root / self.STATE_DIR
            self._makedirs(state_dir)
            files: dict[str, dict[str, str]] = {}
            for name in sorted(state):
                rel = f"{self.STATE_DIR}/{name}.g{gen}.safetensors"
                sha = save_tensors(self.root / rel, state[name])
                files[name] = {"path": rel, "sha256": sha}
            full: dict[str, Any] = {
                **manifest,
                "generation": gen,
                "files": files,
                "format": RUN_FORMAT,
                "journal_length": journal_length,
            }
            full["checksum"] = _manifest_checksum(full)
            save_json(self.manifest_path, full)  # <- the commit point
            logger.info("%s: committed generation %d (%d state group(s))", self.root, gen, len(files))
            try:
                self._collect_garbage({ref["path"] for ref in files.values()})
            except OSError as e:  # committed already: a failure to tidy up must not look like a failed commit
                logger.warning(
                    "%s: could not remove old state files (%s); the next commit retries", self.root, e
                )
        return gen

    def tidy(self) -> None:
        """Remove what a process killed after its commit point left: state files of older generations
        (normally deleted right after each commit) and temp files. Takes the lock."""
        with self.lock():
            manifest = self.load_manifest()
            if manifest is not None and (self.root / self.STATE_DIR).is_dir():
                self._collect_garbage({ref["path"] for ref in manifest["files"].values()})

    def _collect_garbage(self, referenced: set[str]) -> None:
        """Delete state files not in ``referenced`` and temp files (caller holds the lock)."""
        state_dir = self.root / self.STATE_DIR
        removed = 0
        for entry in os.scandir(state_dir):
            if not entry.is_file(follow_symlinks=False):
                continue
            rel = f"{self.STATE_DIR}/{entry.name}"
            if _STATE_FILE_RE.match(entry.name) and rel not in referenced:
                os.unlink(entry.path)
                removed += 1
        if removed:
            _fsync_dir(state_dir)
            logger.debug("%s: removed %d unreferenced state file(s)", self.root, removed)
        self._clean_temps([self.root, state_dir])

    def verify(self) -> dict[str, Any] | None:
        """Check the whole committed state: manifest, every state file's sha256 and content, the journal.

        Returns the manifest (None when nothing is committed). Raises CorruptStateError on any problem,
        including a journal with fewer entries than the manifest recorded or more than one entry beyond.
        """
        manifest = self.load_manifest()
        entries = self._journal.entries()
        if manifest is None:
            return None
        for name, ref in manifest["files"].items():
            path, sha = self._check_ref(ref, str(self.manifest_path))
            if not path.exists():
                raise CorruptStateError(f"{self.root}: state file {path} ({name!r}) is missing")
            load_tensors(path, expected_sha256=sha)
        extra = len(entries) - manifest["journal_length"]
        if extra not in (0, 1):
            raise CorruptStateError(
                f"{self._journal.path}: {len(entries)} entries, but the manifest of generation "
                f"{manifest['generation']} recorded {manifest['journal_length']} at commit time "
                "(expected that many or one more)"
            )
        return manifest
