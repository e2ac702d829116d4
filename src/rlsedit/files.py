"""Safe files: atomic writes, and JSON and safetensors that are verified whenever they are read.

* Only safetensors and JSON are ever read or written (no pickle, no ``torch.load``), so a tampered file
  can at worst give an error, never run code.
* Every file is written atomically (temp file in the same directory, ``fsync``, ``os.replace``, ``fsync`` of
  the directory), so a reader sees the old file or the new one, never a mixture.
* A file is verified when read: ``sha256`` of the whole file when the caller knows it, and in any case a
  content digest that :func:`save_tensors` embeds in the safetensors metadata. A truncated, garbled or
  foreign file raises :class:`CorruptStateError` naming the file; it is never returned as data.

The run directory built on these is :mod:`rlsedit.store`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import secrets
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

__all__ = [
    "CorruptStateError",
    "TMP_SUFFIX",
    "atomic_write_bytes",
    "load_json",
    "load_tensors",
    "load_tensors_metadata",
    "save_json",
    "save_tensors",
    "sha256_bytes",
    "sha256_file",
]

logger = logging.getLogger("rlsedit.store")  # one logger for the persistence layer


#: Suffix of the temp files :func:`atomic_write_bytes` creates (names start with a dot too).
TMP_SUFFIX = ".rlsedit-tmp"
_DIGEST_KEY = "rlsedit.content_sha256"
_RESERVED_META_PREFIX = "rlsedit."
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_MAX_HEADER = 100_000_000  # same limit as the safetensors library


class CorruptStateError(RuntimeError):
    """A stored file is truncated, garbled, tampered with or not what its reference says it is."""


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
    file or the new one at ``path`` (plus possibly a temp file, which :class:`rlsedit.store.RunStore`
    cleans up). The parent directory must exist.
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
