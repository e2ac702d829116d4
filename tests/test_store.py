"""Tests of rlsedit.store: atomic files, verification of everything read, the journal, the run directory,
the run lock, and a SIGKILL crash test."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlsedit.store import (
    RUN_FORMAT,
    TMP_SUFFIX,
    CorruptStateError,
    Journal,
    RunLockedError,
    RunStore,
    atomic_write_bytes,
    load_json,
    load_tensors,
    load_tensors_metadata,
    save_json,
    save_tensors,
    sha256_bytes,
    sha256_file,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")
LOGGER = "rlsedit.store"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX)]


def _sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g, dtype=torch.float64)
    return {
        "f64": base,
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, 4, generator=g).bfloat16(),
        "i64": torch.arange(-5, 5),
        "i32": torch.arange(12, dtype=torch.int32).reshape(3, 4),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "transposed": base.t(),  # non-contiguous view sharing memory with "f64"
        "slice": base[1:3, 2:],  # non-contiguous view
    }


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------------------
# tensors and JSON
# ---------------------------------------------------------------------------------------------------------


def test_tensor_round_trip_all_dtypes(tmp_path: Path) -> None:
    tensors = _sample_tensors()
    tensors["grad"] = torch.ones(3, requires_grad=True) * 2
    path = tmp_path / "t.safetensors"
    sha = save_tensors(path, tensors, {"step": "7", "note": "héllo"})
    assert sha == sha256_file(path)
    loaded = load_tensors(path, expected_sha256=sha)
    _assert_same(loaded, {k: v.detach() for k, v in tensors.items()})
    assert all(v.is_contiguous() and v.device.type == "cpu" for v in loaded.values())
    assert load_tensors_metadata(path) == {"step": "7", "note": "héllo"}
    assert load_tensors_metadata(path, verify=False) == {"step": "7", "note": "héllo"}
    assert _temp_files(tmp_path) == []
    # upper-case checksums are accepted too
    _assert_same(load_tensors(path, sha.upper()), loaded)


def test_save_tensors_validates_input(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="reserved"):
        save_tensors(p, {"a": torch.ones(1)}, {"rlsedit.content_sha256": "x"})
    with pytest.raises(TypeError):
        save_tensors(p, {"a": torch.ones(1)}, {"a": 1})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        save_tensors(p, {"a": [1.0]})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        save_tensors(p, {"__metadata__": torch.ones(1)})
    with pytest.raises(TypeError):
        save_tensors(p, {"s": torch.eye(3).to_sparse()})
    assert not p.exists() and _temp_files(tmp_path) == []


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_tensors(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError):
        load_json(tmp_path / "nope.json")


def test_checksum_mismatch_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_tensors(path, {"a": torch.ones(3)})
    with pytest.raises(CorruptStateError, match=r"t\.safetensors.*sha256 mismatch"):
        load_tensors(path, expected_sha256="0" * 64)
    with pytest.raises(ValueError):
        load_tensors(path, expected_sha256="not-a-sha")


def test_every_truncation_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_tensors(path, {"a": torch.arange(10.0), "b": torch.ones(2, 2, dtype=torch.bfloat16)}, {"k": "v"})
    data = path.read_bytes()
    for n in range(len(data)):
        path.write_bytes(data[:n])
        with pytest.raises(CorruptStateError, match="t.safetensors"):
            load_tensors(path)
        with pytest.raises(CorruptStateError):
            load_tensors_metadata(path)


class _Evil:
    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (os.system, (f"touch {SENTINEL_NAME}",))


SENTINEL_NAME = "PWNED_BY_PICKLE"


def test_pickle_and_garbage_are_rejected_without_running_code(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "t.safetensors"
    buf = io.BytesIO()
    torch.save({"a": torch.ones(3)}, buf)  # a zip/pickle checkpoint: must never be unpickled
    payloads = [
        pickle.dumps(_Evil()),
        pickle.dumps({"a": [1.0, 2.0]}, protocol=2),
        buf.getvalue(),
        b"",
        b"\x00" * 64,
        os.urandom(4096),
        struct.pack("<Q", 2) + b"{}",  # a valid but empty safetensors file without our digest
        b"PK\x03\x04" + os.urandom(100),
    ]
    for payload in payloads:
        path.write_bytes(payload)
        with pytest.raises(CorruptStateError):
            load_tensors(path)
        with pytest.raises(CorruptStateError):
            load_tensors(path, expected_sha256=sha256_bytes(payload))
    assert not (tmp_path / SENTINEL_NAME).exists()


def test_foreign_safetensors_needs_verify_false(tmp_path: Path) -> None:
    path = tmp_path / "foreign.safetensors"
    path.write_bytes(safetensors.torch.save({"w": torch.ones(2)}, metadata={"a": "b"}))
    with pytest.raises(CorruptStateError, match="no content digest"):
        load_tensors(path)
    _assert_same(load_tensors(path, verify=False), {"w": torch.ones(2)})
    assert load_tensors_metadata(path, verify=False) == {"a": "b"}


def test_data_tamper_detected_without_external_checksum(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_tensors(path, {"a": torch.zeros(16)})
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40  # inside the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptStateError, match="content digest mismatch"):
        load_tensors(path)


_FLIP_ORIG: dict[str, object] = {}


def _flip_original() -> tuple[bytes, dict[str, torch.Tensor], dict[str, str]]:
    if not _FLIP_ORIG:
        tensors = {
            "w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
            "b": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
            "d": torch.tensor([0.25], dtype=torch.float64),
            "i": torch.tensor([7, 8], dtype=torch.int32),
        }
        meta = {"step": "3"}
        from rlsedit.store import _serialize_tensors

        data, _ = _serialize_tensors(tensors, meta)
        _FLIP_ORIG.update(data=data, tensors=tensors, meta=meta)
    return _FLIP_ORIG["data"], _FLIP_ORIG["tensors"], _FLIP_ORIG["meta"]  # type: ignore[return-value]


def _mutate(data: bytes, flips: list[tuple[int, int]], cut: int | None, tail: bytes) -> bytes:
    out = bytearray(data)
    for pos, mask in flips:
        out[pos % len(out)] ^= mask
    if cut is not None:
        del out[cut % (len(out) + 1) :]
    return bytes(out) + tail


_mutations = dict(
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=3),
    cut=st.none() | st.integers(0, 10**6),
    tail=st.just(b"") | st.binary(min_size=1, max_size=8),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(**_mutations)
def test_mutated_tensor_file_loads_identically_or_raises(tmp_path: Path, flips, cut, tail) -> None:
    data, tensors, meta = _flip_original()
    mutated = _mutate(data, flips, cut, tail)
    path = tmp_path / "m.safetensors"
    path.write_bytes(mutated)
    sha = sha256_bytes(data)
    if mutated == data:
        _assert_same(load_tensors(path, sha), tensors)
        return
    with pytest.raises(CorruptStateError):
        load_tensors(path, expected_sha256=sha)
    try:
        loaded = load_tensors(path)
    except CorruptStateError:
        pass
    else:  # e.g. whitespace in the header changed: same data, same metadata
        _assert_same(loaded, tensors)
        assert load_tensors_metadata(path) == meta
    try:
        got_meta = load_tensors_metadata(path)
    except CorruptStateError:
        pass
    else:
        assert got_meta == meta


def test_json_round_trip_and_strictness(tmp_path: Path) -> None:
    obj = {"b": [1, 2.5, None, True, "ü"], "a": {"nested": {"x": -3}}, "big": 2**70}
    path = tmp_path / "o.json"
    sha = save_json(path, obj)
    assert sha == sha256_file(path)
    assert load_json(path, sha) == obj
    text = path.read_text()
    assert text.index('"a"') < text.index('"b"') and "\n  " in text  # sorted and indented
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError):
            save_json(path, {"x": [bad]})
    for bad in ((1, 2), {1, 2}, torch.ones(1), b"x", object()):
        with pytest.raises(TypeError):
            save_json(path, {"x": bad})
    with pytest.raises(TypeError):
        save_json(path, {1: "int key"})
    assert load_json(path, sha) == obj  # failed saves left the file alone
    with pytest.raises(CorruptStateError, match=r"o\.json.*sha256 mismatch"):
        load_json(path, "f" * 64)
    for garbage in (b"{", b"\xff\xfe", b'{"a": NaN}', b'{"a": 1, "a": 2}', b"[" * 100000, pickle.dumps(obj)):
        path.write_bytes(garbage)
        with pytest.raises(CorruptStateError, match="o.json"):
            load_json(path)
    assert _temp_files(tmp_path) == []


def test_atomic_write_cleans_up_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert _temp_files(tmp_path) == []
    with pytest.raises(FileNotFoundError):
        atomic_write_bytes(tmp_path / "missing-dir" / "f", b"x")


# ---------------------------------------------------------------------------------------------------------
# journal
# ---------------------------------------------------------------------------------------------------------


def _journal_with(path: Path, n: int) -> Journal:
    j = Journal(path)
    for i in range(n):
        assert j.append({"i": i, "payload": [i, 0.5, "x"]}) == i
    return j


def test_journal_round_trip(tmp_path: Path) -> None:
    j = _journal_with(tmp_path / "j.jsonl", 5)
    assert j.entries() == [{"i": i, "payload": [i, 0.5, "x"]} for i in range(5)]
    assert len(j) == 5
    j2 = Journal(tmp_path / "j.jsonl")  # a second reader/writer sees the same and continues the sequence
    assert len(j2) == 5
    assert j2.append({"i": 5}) == 5
    assert len(j) == 6 and j.append({"i": 6}) == 6
    assert [e["i"] for e in Journal(tmp_path / "j.jsonl").entries()] == list(range(7))
    assert Journal(tmp_path / "none.jsonl").entries() == []
    with pytest.raises(TypeError):
        j.append([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        j.append({"x": float("nan")})
    for line in (tmp_path / "j.jsonl").read_bytes().splitlines():
        assert set(json.loads(line)) == {"entry", "seq", "sha256"}


@pytest.mark.parametrize("tear", ["partial_no_newline", "bad_checksum_last", "half_written_json", "nul_fill"])
def test_journal_torn_last_line_is_ignored_and_repaired(tmp_path: Path, caplog, tear: str) -> None:
    path = tmp_path / "j.jsonl"
    j = _journal_with(path, 3)
    good = path.read_bytes()
    lines = good.splitlines(keepends=True)
    if tear == "partial_no_newline":
        bad = good + lines[0][:17]
    elif tear == "bad_checksum_last":
        bad = good[: -len(lines[-1])] + lines[-1].replace(b'"i":2', b'"i":9')
    elif tear == "half_written_json":
        bad = good[: -len(lines[-1])] + lines[-1][:-10] + b"\n"
    else:
        bad = good + b"\x00" * 40
    path.write_bytes(bad)
    expected = [{"i": i, "payload": [i, 0.5, "x"]} for i in range(3)]
    if tear in ("bad_checksum_last", "half_written_json"):
        expected = expected[:2]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert Journal(path).entries() == expected
    assert "torn" in caplog.text
    removed = Journal(path).repair()
    assert removed == len(bad) - sum(len(x) for x in lines[: len(expected)])
    assert Journal(path).entries() == expected
    assert Journal(path).repair() == 0
    # appending after a torn tail repairs first, so the new entry follows the last good one
    path.write_bytes(bad)
    j = Journal(path)
    assert j.append({"i": "new"}) == len(expected)
    assert Journal(path).entries() == [*expected, {"i": "new"}]


def test_journal_interior_corruption_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    _journal_with(path, 4)
    good = path.read_bytes()
    lines = good.splitlines(keepends=True)
    cases = {  # name: (content, number of the first bad line)
        "checksum": (lines[0] + lines[1].replace(b'"i":1', b'"i":5') + b"".join(lines[2:]), 2),
        "garbage": (lines[0] + b"garbage\n" + b"".join(lines[2:]), 2),
        "blank": (lines[0] + b"\n" + b"".join(lines[1:]), 2),
        "duplicate": (lines[0] + lines[1] + lines[1] + b"".join(lines[2:]), 3),
        "dropped": (lines[0] + b"".join(lines[2:]), 2),
        "swapped": (lines[0] + lines[2] + lines[1] + lines[3], 2),
        "torn_then_more": (lines[0] + lines[1][:20] + b"".join(lines[2:]), 2),
    }
    for name, (data, lineno) in cases.items():
        path.write_bytes(data)
        with pytest.raises(CorruptStateError, match=rf"j\.jsonl: line {lineno} "):
            Journal(path).entries()
        with pytest.raises(CorruptStateError):
            Journal(path).append({"x": 1})
        assert path.read_bytes() == data, name  # never "repaired" away


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(**_mutations)
def test_mutated_journal_gives_prefix_or_raises(tmp_path: Path, flips, cut, tail) -> None:
    path = tmp_path / "j.jsonl"
    if not path.exists():
        _journal_with(path, 4)
        (tmp_path / "orig").write_bytes(path.read_bytes())
    orig = (tmp_path / "orig").read_bytes()
    expected = [{"i": i, "payload": [i, 0.5, "x"]} for i in range(4)]
    path.write_bytes(_mutate(orig, flips, cut, tail))
    try:
        got = Journal(path).entries()
    except CorruptStateError:
        return
    assert got == expected[: len(got)]
    if cut is None and not tail:
        assert len(got) >= 2  # one flip can at worst merge/tear the last two lines


# ---------------------------------------------------------------------------------------------------------
# run store
# ---------------------------------------------------------------------------------------------------------


def _state(g: int) -> dict[str, dict[str, torch.Tensor]]:
    return {
        "layers": {"w": torch.full((4, 4), float(g)), "p": torch.full((3,), float(g), dtype=torch.float64)},
        "meta": {"step": torch.tensor([g])},
    }


def test_commit_generations_and_gc(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run")
    assert store.load_manifest() is None and store.verify() is None
    with pytest.raises(LookupError):
        store.load_state("layers")
    for g in range(1, 4):
        assert store.commit(_state(g), {"batch": g, "notes": {"lr": 0.1}}) == g
        store.journal.append({"generation": g})
    m = store.load_manifest()
    assert m is not None
    assert m["generation"] == 3 and m["batch"] == 3 and m["notes"] == {"lr": 0.1}
    assert m["format"] == RUN_FORMAT and m["journal_length"] == 2
    assert set(m["files"]) == {"layers", "meta"}
    assert m["files"]["layers"]["path"] == "state/layers.g3.safetensors"
    for name, group in _state(3).items():
        _assert_same(store.load_state(name), group)
    assert sorted(p.name for p in (tmp_path / "run/state").iterdir()) == [
        "layers.g3.safetensors",
        "meta.g3.safetensors",
    ]
    # dropping a group, and orphans/temp files from a crashed commit are collected by the next commit
    (tmp_path / "run/state/layers.g4.safetensors").write_bytes(b"orphan of a crashed commit")
    (tmp_path / "run/state/.layers.g4.safetensors.1.ab.rlsedit-tmp").write_bytes(b"tmp")
    (tmp_path / "run/state/README").write_text("not ours")
    assert store.commit({"meta": _state(4)["meta"]}, {"batch": 4}) == 4
    assert sorted(p.name for p in (tmp_path / "run/state").iterdir()) == ["README", "meta.g4.safetensors"]
    with pytest.raises(LookupError):
        store.load_state("layers")
    assert store.verify()["generation"] == 4  # type: ignore[index]
    # a fresh store on the same directory sees the same thing
    again = RunStore(tmp_path / "run", create=False)
    assert again.load_manifest() == store.load_manifest()
    with pytest.raises(FileNotFoundError):
        RunStore(tmp_path / "absent", create=False)


def test_commit_validates_arguments(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    for key in ("generation", "files", "format", "journal_length", "checksum"):
        with pytest.raises(ValueError, match="reserved"):
            store.commit(_state(1), {key: 1})
    with pytest.raises(ValueError):
        store.commit({"../evil": {"a": torch.ones(1)}}, {})
    with pytest.raises(ValueError):
        store.commit({".hidden": {"a": torch.ones(1)}}, {})
    with pytest.raises(TypeError):
        store.commit(_state(1), {"t": (1, 2)})
    with pytest.raises(ValueError):
        store.commit(_state(1), {"x": float("nan")})
    assert store.load_manifest() is None
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").iterdir())


def test_state_tampering_is_detected(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.commit(_state(1), {})
    path = tmp_path / "state/layers.g1.safetensors"
    good = path.read_bytes()
    # replaced by a *valid* file with other content: caught by the manifest's sha256
    save_tensors(path, _state(2)["layers"])
    with pytest.raises(CorruptStateError, match="layers.g1.safetensors"):
        store.load_state("layers")
    path.write_bytes(good[:-4])
    with pytest.raises(CorruptStateError):
        store.load_state("layers")
    path.unlink()
    with pytest.raises(CorruptStateError, match="missing"):
        store.load_state("layers")
    with pytest.raises(CorruptStateError):
        store.verify()
    path.write_bytes(good)
    _assert_same(store.load_state("layers"), _state(1)["layers"])


def test_manifest_tampering_is_detected(tmp_path: Path) -> None:
    from rlsedit.store import _manifest_checksum

    store = RunStore(tmp_path)
    store.commit(_state(1), {"batch": 1})
    mpath = tmp_path / "manifest.json"
    raw = json.loads(mpath.read_text())
    edited = dict(raw, batch=2)
    mpath.write_text(json.dumps(edited))
    with pytest.raises(CorruptStateError, match="checksum"):
        store.load_manifest()
    with pytest.raises(CorruptStateError):
        store.commit(_state(2), {})  # refuses to build on a corrupt manifest
    # a self-consistent manifest pointing outside the run directory is still refused
    evil = dict(raw, files={"layers": {"path": "../../etc/passwd", "sha256": "0" * 64}})
    evil["checksum"] = _manifest_checksum(evil)
    mpath.write_text(json.dumps(evil))
    with pytest.raises(CorruptStateError, match="relative path"):
        store.load_manifest()
    wrong_format = dict(raw, format="rlsedit-run/99")
    wrong_format["checksum"] = _manifest_checksum(wrong_format)
    mpath.write_text(json.dumps(wrong_format))
    with pytest.raises(CorruptStateError, match="format"):
        store.load_manifest()
    mpath.write_bytes(pickle.dumps(raw))
    with pytest.raises(CorruptStateError):
        store.load_manifest()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(**_mutations)
def test_mutated_manifest_loads_identically_or_raises(tmp_path: Path, flips, cut, tail) -> None:
    root = tmp_path / "mrun"
    store = RunStore(root)
    if store.load_manifest() is None or not (root / "orig.json").exists():
        store.commit(_state(2), {"batch": 2, "f": 0.5, "s": "text"})
        (root / "orig.json").write_bytes((root / "manifest.json").read_bytes())
    orig = (root / "orig.json").read_bytes()
    expected = json.loads(orig)
    expected.pop("checksum")
    (root / "manifest.json").write_bytes(_mutate(orig, flips, cut, tail))
    try:
        got = store.load_manifest()
    except CorruptStateError:
        return
    finally:
        (root / "manifest.json").write_bytes(orig)
    assert got == expected


def test_journal_loss_is_detected_by_the_store(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    for g in range(1, 4):
        store.commit(_state(g), {})
        store.journal.append({"generation": g})
    lines = (tmp_path / "journal.jsonl").read_bytes().splitlines(keepends=True)
    (tmp_path / "journal.jsonl").write_bytes(b"".join(lines[:1]))  # lost two entries
    with pytest.raises(CorruptStateError, match="entries"):
        store.verify()
    with pytest.raises(CorruptStateError, match="lost"):
        store.commit(_state(4), {})
    assert store.load_manifest()["generation"] == 3  # type: ignore[index]


def test_put_blob_is_idempotent_and_immutable(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    t = {"k": torch.randn(3, 4), "v": torch.randn(3, 2, dtype=torch.bfloat16)}
    ref = store.put_blob("batches/000005.safetensors", t, {"b": "5", "a": "x"})
    assert ref["path"] == "batches/000005.safetensors"
    assert ref["sha256"] == sha256_file(tmp_path / ref["path"])
    mtime = (tmp_path / ref["path"]).stat().st_mtime_ns
    # same content (metadata given in another order, tensors as other objects): same reference, no write
    again = RunStore(tmp_path).put_blob(
        "batches/000005.safetensors", {k: v.clone() for k, v in t.items()}, {"a": "x", "b": "5"}
    )
    assert again == ref
    assert (tmp_path / ref["path"]).stat().st_mtime_ns == mtime
    _assert_same(store.load_blob(ref), t)
    with pytest.raises(FileExistsError):
        store.put_blob("batches/000005.safetensors", {"k": torch.zeros(3, 4), "v": t["v"]})
    with pytest.raises(FileExistsError):
        store.put_blob("batches/000005.safetensors", t, {"b": "6", "a": "x"})
    for bad in (
        "../x.safetensors",
        "/abs.safetensors",
        "state/a.safetensors",
        "batches/x.pt",
        ".hidden.safetensors",
        "a/./b.safetensors",
        "manifest.json",
        "",
    ):
        with pytest.raises(ValueError):
            store.put_blob(bad, t)
    # tampering: load_blob and put_blob both refuse
    blob = tmp_path / ref["path"]
    data = bytearray(blob.read_bytes())
    data[-3] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(CorruptStateError):
        store.load_blob(ref)
    with pytest.raises(CorruptStateError):
        store.put_blob("batches/000005.safetensors", t, {"b": "5", "a": "x"})
    with pytest.raises(CorruptStateError):
        store.load_blob({"path": "../outside.safetensors", "sha256": "0" * 64})


def test_open_cleans_temp_files_but_not_committed_files(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.commit(_state(1), {})
    ref = store.put_blob("batches/000001.safetensors", {"x": torch.ones(2)})
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"}
    temps = [
        tmp_path / f".manifest.json.99.abc{TMP_SUFFIX}",
        tmp_path / f"state/.layers.g2.safetensors.99.abc{TMP_SUFFIX}",
        tmp_path / f"batches/.000002.safetensors.99.abc{TMP_SUFFIX}",
    ]
    for t in temps:
        t.write_bytes(b"partial")
    RunStore(tmp_path)
    assert not any(t.exists() for t in temps)
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before
    _assert_same(store.load_blob(ref), {"x": torch.ones(2)})


def test_lock_in_process(tmp_path: Path) -> None:
    a, b = RunStore(tmp_path), RunStore(tmp_path)
    with a.lock():
        assert a.locked
        with a.lock():  # re-entrant for the same store object
            a.commit(_state(1), {})
        assert a.locked
        with pytest.raises(RunLockedError, match=str(os.getpid())):
            with b.lock():
                pass
        with pytest.raises(RunLockedError):
            b.commit(_state(2), {})
        with pytest.raises(RunLockedError):
            b.put_blob("x.safetensors", {"a": torch.ones(1)})
        _assert_same(b.load_state("meta"), _state(1)["meta"])  # reading needs no lock
    assert not a.locked
    with b.lock():
        assert b.commit(_state(2), {}) == 2


_LOCK_HOLDER = """
import sys
from rlsedit.store import RunStore
store = RunStore(sys.argv[1])
with store.lock():
    print("locked", flush=True)
    sys.stdin.read()
print("released", flush=True)
"""


def test_lock_excludes_another_process(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _LOCK_HOLDER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=_env(),
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "locked"
        temp = tmp_path / f".x.1.a{TMP_SUFFIX}"
        temp.write_bytes(b"a live writer's temp file")
        store = RunStore(tmp_path)  # must not delete another writer's temp files
        assert temp.exists()
        with pytest.raises(RunLockedError, match=rf"locked by another process \(pid {proc.pid}\)"):
            with store.lock():
                pass
        with pytest.raises(RunLockedError):
            store.commit(_state(1), {})
        assert store.load_manifest() is None
        proc.stdin.close()
        assert proc.stdout.readline().strip() == "released"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with store.lock():
        assert not temp.exists()  # cleaned once we hold the lock
        assert store.commit(_state(1), {}) == 1


# ---------------------------------------------------------------------------------------------------------
# crash test: SIGKILL at random moments
# ---------------------------------------------------------------------------------------------------------

# Shared by the test and the writer process: what generation g must hold.
_CRASH_COMMON = """
import torch

def expected_state(g):
    return {
        "layer": {
            "w": torch.full((256, 256), float(g)),
            "p": torch.full((64, 64), float(g), dtype=torch.float64),
        },
        "meta": {"step": torch.tensor([g]), "bf": torch.full((16,), float(g % 200), dtype=torch.bfloat16)},
    }

def expected_blob(g):
    return {"x": torch.full((8,), float(g))}
"""

# A fork server: imports torch once, then forks one writer per "go" so that each trial costs milliseconds.
# Each writer reconciles the journal with the manifest, then commits generation after generation until it
# is killed. It reports "C g" after commit(g) returned and "J g" after the journal append for g returned.
_CRASH_SERVER = (
    _CRASH_COMMON
    + """
import os, sys, traceback
torch.set_num_threads(1)
from rlsedit.store import RunStore
root = sys.argv[1]

def say(msg):
    os.write(1, (msg + "\\n").encode())

def writer():
    store = RunStore(root)
    with store.lock():
        m = store.load_manifest()
        g = 0 if m is None else m["generation"]
        if m is not None:
            n = len(store.journal)
            assert n in (m["journal_length"], m["journal_length"] + 1), (n, m)
            if n == m["journal_length"]:  # died between commit and journal append: finish that step
                store.journal.append({"generation": g, "blob": m["blob"]["path"]})
                say(f"J {g}")
        while True:
            g += 1
            ref = store.put_blob(f"batches/{g:06d}.safetensors", expected_blob(g), {"g": str(g)})
            assert store.commit(expected_state(g), {"batch": g, "blob": ref}) == g
            say(f"C {g}")
            store.journal.append({"generation": g, "blob": ref["path"]})
            say(f"J {g}")

for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "go":
        pid = os.fork()
        if pid == 0:
            try:
                writer()
            except BaseException:
                say("E " + traceback.format_exc().replace("\\n", " | "))
            os._exit(3)
        say(f"pid {pid}")
    elif cmd[0] == "wait":
        _, status = os.waitpid(int(cmd[1]), 0)
        say(f"exit {status}")
"""
)


def _run_crash_trials(root: Path, trials: int, seed: int) -> dict[str, int]:
    common: dict[str, object] = {}
    exec(_CRASH_COMMON, common)  # noqa: S102 - test-local helper code shared with the writer process
    expected_state, expected_blob = common["expected_state"], common["expected_blob"]
    rng = random.Random(seed)
    stats = dict(
        trials=0,
        generations=0,
        journal_lagging=0,
        orphans_uncommitted_next=0,
        orphans_previous_gc_interrupted=0,
        temp_files_left=0,
        no_commit_in_trial=0,
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASH_SERVER, str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=_env(),
        text=True,
        bufsize=1,
    )
    assert proc.stdin is not None and proc.stdout is not None
    committed = appended = prev_gen = 0

    def read_until(prefix: str) -> str:
        nonlocal committed, appended
        while True:
            line = proc.stdout.readline()
            assert line, "crash server died"
            kind, _, rest = line.strip().partition(" ")
            if kind == "C":
                committed = max(committed, int(rest))
            elif kind == "J":
                appended = max(appended, int(rest))
            elif kind == "E":
                raise AssertionError(f"writer failed: {rest}")
            elif kind == prefix:
                return rest

    try:
        for _ in range(trials):
            proc.stdin.write("go\n")
            proc.stdin.flush()
            pid = int(read_until("pid"))
            time.sleep(rng.uniform(0.0, 0.15))  # a commit takes ~5-50 ms, dominated by fsync
            os.kill(pid, signal.SIGKILL)
            proc.stdin.write(f"wait {pid}\n")
            proc.stdin.flush()
            status = int(read_until("exit"))
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
            stats["trials"] += 1
            stats["temp_files_left"] += len(_temp_files(root))

            # --- a fresh process-level view of the run directory after the crash ---
            store = RunStore(root, create=False)
            assert _temp_files(root) == []
            m = store.load_manifest()
            if m is None:
                assert committed == 0
                stats["no_commit_in_trial"] += 1
                continue
            g = m["generation"]
            assert committed <= g <= committed + 1, (committed, g)  # nothing reported committed is lost
            assert g >= prev_gen
            if g == prev_gen:
                stats["no_commit_in_trial"] += 1
            prev_gen = committed = g  # a commit observed here must never be lost later either
            for name, group in expected_state(g).items():
                _assert_same(store.load_state(name), group)
            assert m["batch"] == g and m["blob"]["path"] == f"batches/{g:06d}.safetensors"
            _assert_same(store.load_blob(m["blob"]), expected_blob(g))
            entries = store.journal.entries()
            assert len(entries) in (g - 1, g) and m["journal_length"] == g - 1
            assert [e["generation"] for e in entries] == list(range(1, len(entries) + 1))
            assert appended <= len(entries)  # every reported (or previously observed) append is durable
            appended = len(entries)
            stats["journal_lagging"] += len(entries) == g - 1
            assert store.verify() == m
            referenced = {ref["path"] for ref in m["files"].values()}
            for p in (root / "state").iterdir():
                rel = f"state/{p.name}"
                if rel in referenced:
                    continue
                # Left over: files of generation g+1 (killed before its commit point) or older ones (killed
                # after a commit point, during garbage collection); the next commit removes them.
                file_gen = int(p.name.rsplit(".g", 1)[1].split(".")[0])
                if file_gen == g + 1:
                    stats["orphans_uncommitted_next"] += 1
                else:
                    assert file_gen < g, p.name
                    stats["orphans_previous_gc_interrupted"] += 1
            with store.lock():  # the kernel released the dead writer's lock
                pass
        stats["generations"] = prev_gen
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    logging.getLogger(__name__).info("crash trials: %s", stats)
    return stats


def test_sigkill_at_random_moments_loses_nothing(tmp_path: Path) -> None:
    stats = _run_crash_trials(tmp_path / "run", trials=40, seed=1234)
    assert stats["trials"] == 40 and stats["generations"] > 0


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing_many(tmp_path: Path) -> None:
    stats = _run_crash_trials(tmp_path / "run", trials=400, seed=98765)
    assert stats["trials"] == 400 and stats["generations"] > 0
