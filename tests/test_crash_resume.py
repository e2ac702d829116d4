"""Durability of a run directory: SIGKILL at random moments, tampered files, no pickle anywhere.

The crash tests start the real command, ``python -m rlsedit edit``, on a tiny Llama saved to a temporary
folder (8 requests, one of them re-editing an earlier fact, in 4 batches of 2), kill it with SIGKILL once or
twice at random moments, re-run the same command until it completes, and compare with an uninterrupted
run of the same command (made in process):

* the final weights are equal (float tolerance; in practice bit-identical);
* every batch is applied exactly once: the manifest's batch ids are 0..3 in order with the reference's
  hashes, the journal has exactly one entry per committed generation (generation ``g`` holds ``g - 1``
  batches, the entries' last-batch hashes follow the reference's order), the store verifies;
* after every kill the run directory is readable (it verifies, or holds no commit yet) and holds at least
  the batches committed before; at the end no temp file, orphan blob or stale state file is left;
* re-running a finished command changes nothing.

Kill moments are drawn either uniformly over the first seconds of the process (start-up, model load,
statistics, edits), or right after the ``k``-th commit the process logs plus up to 60 ms (so that they land
inside batches: target optimisation, record writes, commits). The fast variant runs 3 trials, the slow one
20 (seed: ``$RLSEDIT_CRASH_SEED`` or the clock, logged), two at a time.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import tiny_models
from rlsedit import cli
from rlsedit.editors import load_editor, make_editor
from rlsedit.store import CorruptStateError, RunStore

log = logging.getLogger(__name__)

REQUESTS: list[dict[str, Any]] = [
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"},
    {"prompt": "The Eiffel Tower is located in", "subject": "Eiffel Tower", "target_new": "Rome"},
    {"prompt": "{} plays the sport of", "subject": "Michael Jordan", "target_new": "soccer"},
    {"prompt": "The capital of {} is", "subject": "Japan", "target_new": "Paris", "target_true": "Tokyo"},
    {"prompt": "The twin city of {} is", "subject": "Lyon", "target_new": "Seattle"},
    {"prompt": "{} was created by", "subject": "Apple A5", "target_new": "Microsoft"},
    {"prompt": "The official language of {} is", "subject": "Italy", "target_new": "Japanese"},
    # a re-edit of the first request's fact: resuming must not apply anything twice even so
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "Italian"},
]
BATCH_SIZE = 2
N_BATCHES = len(REQUESTS) // BATCH_SIZE
SETTINGS = {"layers": [1, 2], "steps": 4, "n_templates": 1, "stats_samples": 16, "stats_max_len": 32}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUTF8": "1"}
TIMEOUT = 180


# ------------------------------------------------------------------------------------------------ helpers


@dataclass
class Setup:
    """A saved tiny model, a requests file, and the reference (uninterrupted) run."""

    model: Path
    requests: Path
    reference: Path
    seconds: float  # wall time of the reference run
    hashes: list[str] = field(default_factory=list)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)


def command(setup_model: Path, requests: Path, run: Path) -> list[str]:
    """The ``rlsedit edit`` command line (the same for every attempt)."""
    sets = [f"--set={k}={json.dumps(v)}" for k, v in SETTINGS.items()]
    return [
        sys.executable,
        "-m",
        "rlsedit",
        "edit",
        "--model",
        str(setup_model),
        "--requests",
        str(requests),
        "--run",
        str(run),
        "--batch-size",
        str(BATCH_SIZE),
        "--stats",
        str(run.parent / "stats"),
        *sets,
    ]


class Attempt:
    """One run of the command; counts the commits it logs (stderr) as they happen."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV, start_new_session=True
        )
        self.start = time.monotonic()
        self.lines: list[str] = []
        self.commits = 0
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace")
            with self._cond:
                self.lines.append(line)
                if "committed generation" in line:
                    self.commits += 1
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_commits(self, n: int, timeout: float = TIMEOUT) -> bool:
        """Block until the process logged ``n`` commits (True) or ended (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.commits < n and self.proc.poll() is None:
                self._cond.wait(timeout=max(0.0, min(0.05, deadline - time.monotonic())))
                if time.monotonic() > deadline:
                    raise TimeoutError("the command did not commit in time")
            return self.commits >= n

    def kill(self) -> bool:
        """SIGKILL the process if still running; return whether it was killed."""
        if self.proc.poll() is not None:
            return False
        os.kill(self.proc.pid, signal.SIGKILL)
        self.finish()
        return self.proc.returncode == -signal.SIGKILL

    def finish(self) -> int:
        rc = self.proc.wait(timeout=TIMEOUT)
        self._reader.join(timeout=10)
        return rc

    @property
    def stderr(self) -> str:
        with self._cond:
            return "".join(self.lines)


def run_to_end(argv: list[str]) -> None:
    attempt = Attempt(argv)
    rc = attempt.finish()
    assert rc == 0, attempt.stderr[-3000:]
    assert "Traceback" not in attempt.stderr


def check_readable(run: Path) -> int | None:
    """The run directory as a killed process left it is readable: it verifies (or holds no commit yet).

    Returns the number of committed batches (None: nothing committed yet)."""
    if not (run / RunStore.MANIFEST).exists():
        return None
    store = RunStore(run, create=False)
    manifest = store.verify()
    assert manifest is not None
    for name in manifest["files"]:
        store.load_state(name)
    return len(manifest["batches"])


def check_complete(run: Path, setup: Setup) -> None:
    """Final weights equal the reference's; every batch applied exactly once; nothing left over."""
    store = RunStore(run, create=False)
    manifest = store.verify()
    assert manifest is not None
    batches = manifest["batches"]
    assert [b["id"] for b in batches] == list(range(N_BATCHES))
    assert [b["hash"] for b in batches] == setup.hashes
    assert len({b["hash"] for b in batches}) == N_BATCHES
    weights = store.load_state("weights")
    assert weights.keys() == setup.weights.keys()
    for k, w in weights.items():
        torch.testing.assert_close(w, setup.weights[k], rtol=1e-5, atol=1e-6)
    # one journal entry per committed generation; generation g holds g - 1 batches
    entries = store.journal.entries()
    generation = manifest["generation"]
    assert len(entries) == generation == N_BATCHES + 1
    assert [e["generation"] for e in entries] == list(range(1, generation + 1))
    assert [e["n_batches"] for e in entries] == list(range(generation))
    assert [e["last_hash"] for e in entries[1:]] == setup.hashes
    # nothing left over: state files of the last generation, the referenced blobs, no temp files
    referenced = {ref["path"] for ref in manifest["files"].values()}
    referenced |= {ref["path"] for ref in manifest["static"].values()}
    referenced |= {ref["path"] for b in batches for ref in b["records"].values()}
    on_disk = {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}
    assert on_disk - referenced == {RunStore.MANIFEST, RunStore.JOURNAL, RunStore.LOCK}


def run_in_process(argv: list[str]) -> None:
    """``rlsedit edit`` in this process (same code path, no interpreter start-up), one thread like the
    subprocesses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(argv[3:]) == 0  # without "python -m rlsedit"
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    """Save a tiny Llama; write the requests; make the reference run (uninterrupted, in process)."""
    root = tmp_path_factory.mktemp("crash")
    model_dir = root / "tiny-llama"
    model, tok = tiny_models.tiny_model("llama", seed=3)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    requests = root / "requests.jsonl"
    requests.write_text("".join(json.dumps(r) + "\n" for r in REQUESTS), encoding="utf-8")
    reference = root / "reference" / "run"
    reference.parent.mkdir()
    t0 = time.monotonic()
    run_in_process(command(model_dir, requests, reference))
    seconds = time.monotonic() - t0
    store = RunStore(reference, create=False)
    manifest = store.verify()
    assert manifest is not None and len(manifest["batches"]) == N_BATCHES
    result = Setup(model_dir, requests, reference, seconds)
    result.hashes = [b["hash"] for b in manifest["batches"]]
    result.weights = store.load_state("weights")
    check_complete(reference, result)
    # re-running the finished command applies nothing and commits nothing (the file holds a re-edit)
    before = {str(p): p.read_bytes() for p in reference.rglob("*") if p.is_file() and p.name != ".lock"}
    run_in_process(command(model_dir, requests, reference))
    after = {str(p): p.read_bytes() for p in reference.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before
    return result


#: Seconds over which uniform kill moments are drawn (interpreter start-up, model load and the edits).
UNIFORM_WINDOW = 8.0


def one_trial(setup: Setup, run: Path, rng: random.Random) -> dict[str, int]:
    """Kill the command 1 or 2 times at random moments, then run it to the end; check everything."""
    stats = {"trials": 0, "kills": 0, "attempts": 0, "finished_before_kill": 0}
    run.parent.mkdir(parents=True)
    argv = command(setup.model, setup.requests, run)
    applied: int | None = None  # committed batches (None: no commit yet)
    for _ in range(rng.randint(1, 2)):
        attempt = Attempt(argv)
        stats["attempts"] += 1
        remaining = N_BATCHES + 1 if applied is None else N_BATCHES - applied  # commits to come
        if rng.random() < 0.3 or remaining == 0:
            time.sleep(rng.uniform(0.0, UNIFORM_WINDOW))
        else:  # after the k-th commit of this attempt: inside the next batch (or at the very end)
            attempt.wait_commits(rng.randint(1, remaining))
            time.sleep(rng.uniform(0.0, 0.06))
        if attempt.kill():
            stats["kills"] += 1
        else:
            stats["finished_before_kill"] += 1
            assert attempt.proc.returncode == 0, attempt.stderr[-3000:]
        now = check_readable(run)
        if applied is not None:
            assert now is not None and now >= applied  # a committed batch is never lost
        applied = now
    run_to_end(argv)
    stats["attempts"] += 1
    check_complete(run, setup)
    stats["trials"] += 1
    shutil.rmtree(run.parent)
    return stats


def crash_trials(setup: Setup, root: Path, n_trials: int, seed: int) -> dict[str, int]:
    """Run ``n_trials`` kill-and-resume trials, two at a time; return the summed counts."""
    rngs = [random.Random(f"{seed}-{trial}") for trial in range(n_trials)]
    total = {"trials": 0, "kills": 0, "attempts": 0, "finished_before_kill": 0}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [
            pool.submit(one_trial, setup, root / f"trial{i}" / "run", rng) for i, rng in enumerate(rngs)
        ]
        for future in futures:
            for key, value in future.result().items():
                total[key] += value
    log.info("crash trials (seed %d): %s", seed, total)
    return total


# ------------------------------------------------------------------------------------------- crash tests


def test_kill_and_resume_fast(setup: Setup, tmp_path: Path) -> None:
    stats = crash_trials(setup, tmp_path, n_trials=3, seed=1234)
    assert stats["trials"] == 3 and stats["kills"] >= 1


@pytest.mark.slow
def test_kill_and_resume_many(setup: Setup, tmp_path: Path) -> None:
    seed = int(os.environ.get("RLSEDIT_CRASH_SEED", time.time_ns() % 1_000_000))
    stats = crash_trials(setup, tmp_path, n_trials=20, seed=seed)
    assert stats["trials"] == 20 and stats["kills"] >= 10, (seed, stats)


# -------------------------------------------------------------------------------------- tampered files


@pytest.fixture(scope="module")
def api_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory made through the API: two batches on a tiny Llama."""
    root = tmp_path_factory.mktemp("tamper")
    model, tok = tiny_models.tiny_model("llama", seed=4)
    editor = make_editor("rlsedit", model, tok, stats_dir=root / "stats", **{**SETTINGS, "steps": 2})
    editor.attach(root / "run")
    editor.edit(REQUESTS[:4], batch_size=2)
    return root / "run"


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        i = len(data) - 9 if path.suffix == ".safetensors" else len(data) // 3  # tensor data / JSON text
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :])
    elif how == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()


def _target(run: Path, which: str) -> Path:
    if which == "state":
        manifest = RunStore(run, create=False).load_manifest()
        assert manifest is not None
        return run / manifest["files"]["weights"]["path"]
    if which == "layer_state":
        manifest = RunStore(run, create=False).load_manifest()
        assert manifest is not None
        return run / manifest["files"]["layer1"]["path"]
    return run / which


@pytest.mark.parametrize("how", ["truncate", "flip", "empty", "delete"])
@pytest.mark.parametrize(
    "which", ["manifest.json", "state", "layer_state", "static/W0.safetensors", "static/sigma.safetensors"]
)
def test_tampered_state_is_a_clear_error(api_run: Path, tmp_path: Path, which: str, how: str) -> None:
    """A damaged file that resuming reads: CorruptStateError naming the file (or, for a deleted
    manifest, "no saved editor"), never a crash from deep inside; the model is left as it was."""
    run = tmp_path / "run"
    shutil.copytree(api_run, run)
    target = _target(run, which)
    _damage(target, how)
    model, tok = tiny_models.tiny_model("llama", seed=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected: type[Exception] = (
        FileNotFoundError if (which, how) == ("manifest.json", "delete") else CorruptStateError
    )
    with pytest.raises(expected) as info:
        load_editor(run, model, tok)
    if expected is CorruptStateError:
        assert target.name in str(info.value) or str(run) in str(info.value)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("how", ["truncate", "flip", "empty", "delete"])
def test_tampered_batch_record_is_a_clear_error(api_run: Path, tmp_path: Path, how: str) -> None:
    """Recorded K, V of a batch are read when it is retracted: a damaged record refuses the retraction
    with CorruptStateError and changes nothing."""
    run = tmp_path / "run"
    shutil.copytree(api_run, run)
    target = run / "batches" / "000000-layer1.safetensors"
    _damage(target, how)
    model, tok = tiny_models.tiny_model("llama", seed=4)
    editor = load_editor(run, model, tok)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    manifest = (run / "manifest.json").read_bytes()
    with pytest.raises(CorruptStateError, match="000000-layer1"):
        editor.load_record(editor.batches[0], 1)
    with pytest.raises(CorruptStateError, match="000000-layer1"):
        editor.retract(0)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert (run / "manifest.json").read_bytes() == manifest


def test_journal_damage(api_run: Path, tmp_path: Path) -> None:
    """A garbled journal line before the last: CorruptStateError. A torn last line (a crash mid-append) is
    tolerated and the lost entry is written again at the next commit."""
    run = tmp_path / "run"
    shutil.copytree(api_run, run)
    journal = run / RunStore.JOURNAL
    lines = journal.read_bytes().splitlines(keepends=True)
    assert len(lines) == 3  # generations 1 (created), 2 and 3 (the two batches)
    journal.write_bytes(lines[0] + lines[1].replace(b'"n_batches":1', b'"n_batches":7') + lines[2])
    model, tok = tiny_models.tiny_model("llama", seed=4)
    with pytest.raises(CorruptStateError, match="journal"):
        load_editor(run, model, tok)

    journal.write_bytes(b"".join(lines[:2]) + lines[2][:20])  # torn last line
    model, tok = tiny_models.tiny_model("llama", seed=4)
    editor = load_editor(run, model, tok)
    editor.edit(REQUESTS[4:6])
    store = RunStore(run, create=False)
    store.verify()
    assert [e["generation"] for e in store.journal.entries()] == [1, 2, 3, 4]


@pytest.mark.parametrize("which", ["manifest.json", "state"])
def test_cli_on_a_damaged_run_exits_1_without_traceback(
    api_run: Path, tmp_path: Path, which: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(api_run, run)
    model_dir = tmp_path / "model"
    model, tok = tiny_models.tiny_model("llama", seed=4)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    _damage(_target(run, which), "flip")
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps(REQUESTS[4]) + "\n", encoding="utf-8")
    status = cli.main(["edit", "--model", str(model_dir), "--requests", str(requests), "--run", str(run)])
    err = capsys.readouterr().err
    assert status == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("rlsedit: error: ") and ("corrupt" in last or "mismatch" in last), err
    assert "Traceback" not in err


def test_orphan_blobs_of_a_killed_attempt_do_not_block_the_run(api_run: Path, tmp_path: Path) -> None:
    """A killed attempt may leave the records of its uncommitted batch, and a first attempt the static
    blobs of a run never committed; the next attempt replaces them even when it computes other bits."""
    run = tmp_path / "run"
    shutil.copytree(api_run, run)
    garbage = {"K": torch.full((3, 3), 7.0), "V": torch.zeros(2)}
    RunStore(run).put_blob("batches/000002-layer1.safetensors", garbage)  # the next batch's id
    model, tok = tiny_models.tiny_model("llama", seed=4)
    editor = load_editor(run, model, tok)
    editor.edit(REQUESTS[4:6])
    assert RunStore(run).load_blob(editor.batches[2]["records"]["1"])["K"].shape != (3, 3)

    fresh = tmp_path / "fresh"
    RunStore(fresh).put_blob("static/W0.safetensors", garbage)  # a first attempt killed before its commit
    model, tok = tiny_models.tiny_model("llama", seed=4)
    editor = make_editor(
        "rlsedit", model, tok, stats_dir=api_run.parent / "stats", **{**SETTINGS, "steps": 2}
    )
    editor.attach(fresh)
    editor.edit(REQUESTS[:2])
    model2, tok2 = tiny_models.tiny_model("llama", seed=4)
    assert len(load_editor(fresh, model2, tok2).batches) == 1


def test_loading_finishes_a_commit_killed_before_its_clean_up(api_run: Path, tmp_path: Path) -> None:
    """Killed after the manifest was replaced but before the old state files were deleted and the journal
    entry appended: resuming deletes the stale files and writes the entry, even with nothing to apply."""
    run = tmp_path / "run"
    shutil.copytree(api_run, run)
    manifest = RunStore(run, create=False).load_manifest()
    assert manifest is not None
    current = run / manifest["files"]["weights"]["path"]
    stale = run / "state" / f"weights.g{manifest['generation'] - 1}.safetensors"
    shutil.copy(current, stale)
    journal = run / RunStore.JOURNAL
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:-1]))
    model, tok = tiny_models.tiny_model("llama", seed=4)
    load_editor(run, model, tok)
    assert not stale.exists() and current.exists()
    assert journal.read_bytes() == b"".join(lines)
    RunStore(run, create=False).verify()


# ------------------------------------------------------------------------------------------- no pickle

_UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _unsafe_uses(path: Path) -> list[str]:
    """Imports of pickle-like modules and calls that unpickle (``torch.load`` without
    ``weights_only=True``, ``numpy.load(allow_pickle=True)``, ``pandas.read_pickle``...) in one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[str] = []
    for node in ast.walk(tree):
        where = f"{path}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [
                f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in _UNSAFE_MODULES
            ]
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in _UNSAFE_MODULES:
                found.append(f"{where}: from {node.module} import ...")
            if node.module == "torch" and any(a.name == "load" for a in node.names):
                found.append(f"{where}: from torch import load")
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if name.endswith("torch.load") or name in ("torch.load", "torch.serialization.load"):
                if kwargs.get("weights_only") != "True":
                    found.append(f"{where}: {name}(...) without weights_only=True")
            elif name.split(".")[-1] in ("read_pickle", "loads") and name.split(".")[0] in (
                *_UNSAFE_MODULES,
                "pd",
                "pandas",
            ):
                found.append(f"{where}: {name}(...)")
            elif name.split(".")[-1] == "load" and kwargs.get("allow_pickle") == "True":
                found.append(f"{where}: {name}(..., allow_pickle=True)")
    return found


def test_no_pickle_or_unsafe_torch_load_in_src() -> None:
    src = Path(__file__).resolve().parents[1] / "src"
    files = sorted(src.rglob("*.py"))
    assert len(files) > 10
    found = [hit for f in files for hit in _unsafe_uses(f)]
    text_hits = [
        f"{f}: {m.group(0)}"
        for f in files
        for m in re.finditer(
            r"weights_only\s*=\s*False|allow_pickle\s*=\s*True|trust_remote_code\s*=\s*True", f.read_text()
        )
    ]
    assert found + text_hits == []


def test_the_pickle_detector_detects(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle\nimport torch\nfrom joblib import load\nx = torch.load('f')\n"
        "y = torch.load('f', weights_only=False)\nz = torch.load('f', weights_only=True)\n"
        "import numpy as np\nw = np.load('f', allow_pickle=True)\n"
    )
    hits = _unsafe_uses(bad)
    assert len(hits) == 5, hits  # import pickle, from joblib, two torch.load, np.load
