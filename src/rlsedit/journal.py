"""The append-only journal of a run directory: one checksummed JSON record a line.

A journal append killed mid-write leaves a torn last line; :meth:`Journal.entries` ignores it with a
warning and :meth:`Journal.repair` (run automatically before the next append) truncates it. How the journal
relates to the manifest's commits: :mod:`rlsedit.store`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from rlsedit.files import (
    CorruptStateError,
    _canonical_json,
    _check_json_native,
    _fsync_dir,
    _no_duplicate_keys,
    _reject_constant,
    sha256_bytes,
)

__all__ = ["Journal"]

logger = logging.getLogger("rlsedit.store")  # one logger for the persistence layer


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
    :class:`CorruptStateError`. Not safe for concurrent writers: hold :meth:`rlsedit.store.RunStore.lock`.
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
