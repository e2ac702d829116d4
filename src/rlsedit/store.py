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
import hashlib
import json
import logging
import math
import os
import re
import secrets
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

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
    "RUN_FORMAT",
    "TMP_SUFFIX",
]

logger = logging.getLogger(__name__)

#: Value of ``manifest["format"]`` written by this version.
RUN_FORMAT = "rlsedit-run/1"
#: Suffix of the temp files :func:`atomic_write_bytes` creates (names start with a dot too).
TMP_SUFFIX = ".rlsedit-tmp"

_DIGEST_KEY = "rlsedit.content_sha256"
_RESERVED_META_PREFIX = "rlsedit."
_RESERVED_MANIFEST_KEYS = frozenset({"generation", "files", "format", "journal_length", "checksum"})
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_GROUP_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
_STATE_FILE_RE = re.compile(r"^(?P<name>.+)\.g(?P<gen>[0-9]+)\.safetensors$")
_MAX_HEADER = 100_000_000  # same limit as the safetensors library


class CorruptStateError(RuntimeError):
    """A stored file is truncated, garbled, tampered with or not what its reference says it is."""


class RunLockedError(RuntimeError):
    """Another process holds the lock of a run directory."""


# --------------------------------------------------------------------------------------------------------
# Low-level helpers
# --------------------------------------------------------------------------------------------------------


def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of the file at ``path``, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    """fsync a directory so that renames/creations/removals in it are durable (best effort on odd FSs)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:  # pragma: no cover - platform dependent
        logger.debug("cannot open directory %s for fsync: %s", directory, e)
        return
    try:
        os.fsync(fd)
    except OSError as e:  # pragma: no cover - some filesystems refuse fsync on directories
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _is_temp_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | bytearray | memoryview) -> None:
    """Replace the file at ``path`` with ``data`` atomically and durably.

    Writes a temp file in the same directory (``.<name>.<pid>.<random>.rlsedit-tmp``), flushes and fsyncs it,
    ``os.replace``-s it over ``path`` and fsyncs the directory. A crash at any point leaves either the old
    file or the new one at ``path`` (plus possibly a temp file, which :class:`RunStore` cleans up).
    The parent directory must exist.
    """
    path = Path(path)
    directory = path.parent
    tmp = directory / f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}{TMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def _read_bytes(path: Path, expected_sha256: str | None) -> bytes:
    """Read a whole file; verify its sha256 when given (CorruptStateError on mismatch)."""
    data = path.read_bytes()
    if expected_sha256 is not None:
        expected = _normalise_sha(expected_sha256, f"expected sha256 for {path}")
        actual = sha256_bytes(data)
        if actual != expected:
            raise CorruptStateError(
                f"{path}: sha256 mismatch (expected {expected}, file has {actual}); "
                "the file is corrupt, truncated or was replaced"
            )
    return data


def _normalise_sha(value: object, what: str) -> str:
    if not isinstance(value, str) or not _SHA_RE.match(value.lower()):
        raise ValueError(f"{what} must be a 64-digit hex sha256, got {value!r}")
    return value.lower()


# --------------------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------------------


def _check_json_native(obj: object, where: str = "$") -> None:
    """Raise TypeError/ValueError unless ``obj`` is made only of dict(str keys)/list/str/int/float/bool/None.

    Tuples, sets, tensors, numpy scalars of integer type, NaN and infinities are refused, so what is
    saved is exactly what is loaded back.
    """
    if obj is None or isinstance(obj, (bool, str, int)):
        return
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"{where}: non-finite float {obj!r} is not allowed in JSON state")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: dict key {k!r} is not a str")
            _check_json_native(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_json_native(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where}: {type(obj).__name__} is not a JSON-native type")


def _canonical_json(obj: object) -> str:
    """Compact, key-sorted, ASCII JSON: the form checksums are computed over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite constant {name} in JSON")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r} in JSON object")
        out[k] = v
    return out


def _parse_json(data: bytes, source: str) -> Any:
    """Strict JSON parse (UTF-8, no NaN/Infinity, no duplicate keys); CorruptStateError on any failure."""
    try:
        text = data.decode("utf-8")
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CorruptStateError(f"{source}: corrupt: not valid JSON ({e})") from e


def save_json(path: str | os.PathLike[str], obj: Any) -> str:
    """Atomically write ``obj`` as JSON (sorted keys, indented, UTF-8) and return the file's sha256.

    Only JSON-native types are accepted (see :func:`_check_json_native`); NaN/inf raise ValueError.
    """
    _check_json_native(obj)
    data = (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def load_json(path: str | os.PathLike[str], expected_sha256: str | None = None) -> Any:
    """Read JSON written by :func:`save_json`.

    Verifies the file's sha256 when ``expected_sha256`` is given. Invalid UTF-8/JSON, NaN/Infinity
    constants and duplicate keys raise :class:`CorruptStateError`; a missing file raises FileNotFoundError.
    """
    path = Path(path)
    return _parse_json(_read_bytes(path, expected_sha256), str(path))


# --------------------------------------------------------------------------------------------------------
# Tensors (safetensors)
# --------------------------------------------------------------------------------------------------------


def _tensor_bytes(t: torch.Tensor) -> Any:
    """A zero-copy buffer of a contiguous CPU tensor's raw bytes (for hashing)."""
    return t.reshape(-1).view(torch.uint8).numpy()


def _content_digest(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """Digest of names, dtypes, shapes, raw bytes and user metadata (independent of the file layout)."""
    desc = {
        "metadata": dict(metadata),
        "tensors": [[name, str(tensors[name].dtype), list(tensors[name].shape)] for name in sorted(tensors)],
    }
    h = hashlib.sha256(_canonical_json(desc).encode())
    h.update(b"\0")
    for name in sorted(tensors):
        h.update(_tensor_bytes(tensors[name]))
    return h.hexdigest()


def _prepare_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, dense, contiguous CPU tensors; views and entries sharing storage are cloned.

    (safetensors refuses to save tensors that share memory.)
    """
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of str to Tensor, got {type(tensors).__name__}")
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.layout != torch.strided:
            raise TypeError(f"tensor {name!r} has layout {t.layout}; only dense tensors can be stored")
        c = t.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
        ptr = c.untyped_storage().data_ptr()
        if ptr in seen or c.data_ptr() != ptr or c.untyped_storage().nbytes() != c.numel() * c.element_size():
            c = c.clone()
            ptr = c.untyped_storage().data_ptr()
        if c.numel() > 0:
            seen.add(ptr)
        out[name] = c
    return out


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict of str to str, got {type(metadata).__name__}")
    out: dict[str, str] = {}
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata entries must be str -> str, got {k!r}: {type(v).__name__}")
        if k.startswith(_RESERVED_META_PREFIX):
            raise ValueError(f"metadata key {k!r} uses the reserved prefix {_RESERVED_META_PREFIX!r}")
        out[k] = v
    return out


def _serialize_tensors(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
) -> tuple[bytes, str]:
    """safetensors bytes with an embedded content digest, and that digest."""
    prepared = _prepare_tensors(tensors)
    meta = _check_metadata(metadata)
    digest = _content_digest(prepared, meta)
    data = _st_save(prepared, metadata={**meta, _DIGEST_KEY: digest})
    return data, digest


def save_tensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> str:
    """Atomically write ``tensors`` (moved to CPU, made contiguous) as a safetensors file; return its sha256.

    ``metadata`` (str -> str, keys not starting with ``"rlsedit."``) is stored in the header. A digest of
    the content (names, dtypes, shapes, bytes, metadata) is stored too, so :func:`load_tensors` detects
    corruption even without an external checksum.
    """
    data, _ = _serialize_tensors(tensors, metadata)
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def _parse_header(data: bytes, source: str) -> dict[str, Any]:
    """The JSON header of safetensors bytes; CorruptStateError when it is not there or not sane."""
    if len(data) < 8:
        raise CorruptStateError(f"{source}: not a safetensors file (only {len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n < 2 or n > _MAX_HEADER or 8 + n > len(data):
        raise CorruptStateError(
            f"{source}: not a safetensors file or truncated (header length {n}, file size {len(data)})"
        )
    header = _parse_json(data[8 : 8 + n], f"{source} (safetensors header)")
    if not isinstance(header, dict):
        raise CorruptStateError(f"{source}: safetensors header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CorruptStateError(f"{source}: safetensors metadata is not a str -> str object")
    return header


def _decode_tensors(
    path: Path, expected_sha256: str | None, verify: bool, want_tensors: bool
) -> tuple[dict[str, torch.Tensor], dict[str, str], str | None]:
    """Read, check and decode a safetensors file written by :func:`save_tensors`.

    Returns (tensors, user metadata, embedded content digest); tensors is empty unless decoded.
    """
    data = _read_bytes(path, expected_sha256)
    header = _parse_header(data, str(path))
    meta = dict(header.get("__metadata__", {}))
    digest = meta.pop(_DIGEST_KEY, None)
    user_meta = {k: v for k, v in meta.items() if not k.startswith(_RESERVED_META_PREFIX)}
    if not (verify or want_tensors):
        return {}, user_meta, digest
    try:
        tensors = _st_load(data)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # SafetensorError, and pyo3 panics, which derive from BaseException
        raise CorruptStateError(f"{path}: invalid safetensors data ({type(e).__name__}: {e})") from e
    if verify:
        if digest is None:
            raise CorruptStateError(
                f"{path}: no content digest ({_DIGEST_KEY}) in the metadata; not written by "
                "rlsedit.store.save_tensors, or the header was altered"
            )
        actual = _content_digest(tensors, meta)
        if actual != digest:
            raise CorruptStateError(
                f"{path}: content digest mismatch (header says {digest}, data gives {actual}); "
                "the file is corrupt or was modified"
            )
    return tensors, user_meta, digest


def load_tensors(
    path: str | os.PathLike[str],
    expected_sha256: str | None = None,
    device: torch.device | str = "cpu",
    *,
    verify: bool = True,
) -> dict[str, torch.Tensor]:
    """Load a safetensors file written by :func:`save_tensors` onto ``device``.

    Checks, in order: the file's sha256 against ``expected_sha256`` (when given), the header, the tensor
    data (through the safetensors library, never pickle), and the embedded content digest (unless
    ``verify=False``, for files written by other tools). Any failure raises :class:`CorruptStateError`
    naming the file; a missing file raises FileNotFoundError.
    """
    path = Path(path)
    tensors, _, _ = _decode_tensors(path, expected_sha256, verify, want_tensors=True)
    if torch.device(device).type != "cpu":
        return {k: v.to(device) for k, v in tensors.items()}
    # Fresh allocations (64-byte aligned, like every tensor torch creates), not views into the file's
    # bytes at whatever offset the header left: BLAS results depend in their last bits on the operands'
    # alignment, and a state loaded from a file must compute exactly what it computed before saving.
    return {k: v.clone() for k, v in tensors.items()}


def load_tensors_metadata(
    path: str | os.PathLike[str], expected_sha256: str | None = None, *, verify: bool = True
) -> dict[str, str]:
    """The user metadata stored by :func:`save_tensors` (reserved ``rlsedit.*`` keys removed).

    With ``verify=True`` (default) the whole file is checked as in :func:`load_tensors`; with
    ``verify=False`` only the header is parsed (cheap, but a garbled metadata value is not detected
    unless ``expected_sha256`` is given).
    """
    _, meta, _ = _decode_tensors(Path(path), expected_sha256, verify, want_tensors=False)
    return meta


# --------------------------------------------------------------------------------------------------------
# Journal
# --------------------------------------------------------------------------------------------------------


def _journal_record_hash(seq: int, entry: dict[str, Any]) -> str:
    return sha256_bytes(_canonical_json({"entry": entry, "seq": seq}).encode())


def _parse_journal_line(line: bytes, expected_seq: int) -> tuple[dict[str, Any] | None, str]:
    """(entry, "") for a valid record line (without its newline), else (None, reason)."""
    try:
        rec = json.loads(
            line.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        return None, f"not valid JSON: {e}"
    if not isinstance(rec, dict) or set(rec) != {"entry", "seq", "sha256"}:
        return None, "not a journal record"
    entry, seq, digest = rec["entry"], rec["seq"], rec["sha256"]
    if not isinstance(entry, dict) or not isinstance(digest, str) or type(seq) is not int:
        return None, "malformed journal record"
    if _journal_record_hash(seq, entry) != digest:
        return None, "checksum mismatch"
    if seq != expected_seq:
        return None, f"sequence number {seq} where {expected_seq} was expected (duplicated or missing line)"
    return entry, ""


class Journal:
    """Append-only JSON-lines log; each line is ``{"entry": {...}, "seq": n, "sha256": ...}``.

    ``sha256`` covers the canonical JSON of ``{"entry", "seq"}``; ``seq`` is the 0-based line number, so
    duplicated, dropped or reordered lines are detected. Appends use ``O_APPEND`` and ``fsync``.
    A torn last line (a crash mid-append) is ignored with a warning by :meth:`entries` and cut off by
    :meth:`repair`, which :meth:`append` runs before writing when needed. A bad line before the last raises
    :class:`CorruptStateError`. Not safe for concurrent writers: hold :meth:`RunStore.lock`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        # (file size, number of entries) of a clean journal this object has verified or written.
        self._known: tuple[int, int] | None = None

    def __repr__(self) -> str:
        return f"Journal({str(self.path)!r})"

    def _scan(self) -> tuple[list[dict[str, Any]], int, str]:
        """(valid entries, byte offset where they end, reason the tail is torn or "")."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return [], 0, ""
        entries: list[dict[str, Any]] = []
        pos = 0
        lineno = 0
        while pos < len(data):
            lineno += 1
            nl = data.find(b"\n", pos)
            if nl == -1:
                return entries, pos, f"line {lineno} has no newline (partial write)"
            entry, reason = _parse_journal_line(data[pos:nl], len(entries))
            if entry is None:
                if nl + 1 == len(data):
                    return entries, pos, f"last line {lineno}: {reason}"
                raise CorruptStateError(f"{self.path}: line {lineno} is corrupt ({reason})")
            entries.append(entry)
            pos = nl + 1
        return entries, pos, ""

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def entries(self) -> list[dict[str, Any]]:
        """All committed entries, oldest first (a torn last line is ignored with a warning)."""
        entries, end, torn = self._scan()
        if torn:
            logger.warning("%s: ignoring torn tail (%s); Journal.repair() will remove it", self.path, torn)
        else:
            self._known = (end, len(entries))
        return entries

    def __len__(self) -> int:
        size = self._size()
        if self._known is not None and self._known[0] == size:
            return self._known[1]
        return len(self.entries())

    def repair(self) -> int:
        """Truncate a torn last line; return the number of bytes removed (0 when the journal is clean)."""
        entries, end, torn = self._scan()
        removed = 0
        if torn:
            size = self._size()
            removed = size - end
            fd = os.open(self.path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                os.ftruncate(fd, end)
                os.fsync(fd)
            finally:
                os.close(fd)
            logger.warning("%s: removed torn tail of %d bytes (%s)", self.path, removed, torn)
        self._known = (end, len(entries))
        return removed

    def append(self, entry: dict[str, Any]) -> int:
        """Durably append one entry (a JSON-native dict); return its 0-based sequence number."""
        if not isinstance(entry, dict):
            raise TypeError(f"a journal entry must be a dict, got {type(entry).__name__}")
        _check_json_native(entry)
        if self._known is None or self._known[0] != self._size():
            self.repair()  # someone else wrote, or a torn tail: re-verify and clean up first
        assert self._known is not None
        size, seq = self._known
        digest = _journal_record_hash(seq, entry)
        line = (_canonical_json({"entry": entry, "seq": seq, "sha256": digest}) + "\n").encode()
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_dir(self.path.parent)
        self._known = (size + len(line), seq + 1)
        return seq


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
        clash = _RESERVED_MANIFEST_KEYS & set(manifest)
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
