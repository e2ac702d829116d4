"""A batch whose update is non-finite or unbounded, or that fails in any other way, is rolled back whole.

The solve of the *second* edited layer is corrupted, so the first layer's change is already in the model
when the batch fails: the rollback must restore it. After the failure the weights are byte-identical,
the editor's state (batches, per-layer state) is unchanged, the run directory is byte-identical (no record
blob of the failed batch is left behind) and the editor goes on editing normally.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import tiny_models
from rlsedit.editors import EditError, load_editor, make_editor
from rlsedit.editors.base import LayerUpdate
from rlsedit.store import RunStore

REQUESTS: list[dict[str, Any]] = [
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"},
    {"prompt": "The Eiffel Tower is located in", "subject": "Eiffel Tower", "target_new": "Rome"},
    {"prompt": "{} plays the sport of", "subject": "Michael Jordan", "target_new": "soccer"},
    {"prompt": "The capital of {} is", "subject": "Japan", "target_new": "Paris"},
]
SETTINGS = {"layers": [1, 2], "steps": 2, "n_templates": 0, "stats_samples": 8, "stats_max_len": 16}


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> content)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def snapshot(editor: Any, run: Path) -> tuple[Any, ...]:
    """Weights (raw bytes), batches, layer state (raw bytes) and the run directory, byte for byte."""
    weights = {
        k: v.detach().contiguous().view(torch.uint8).numpy().tobytes()
        for k, v in editor.model.state_dict().items()
    }
    state = {
        f"{layer}.{k}": t.detach().contiguous().view(torch.uint8).numpy().tobytes()
        for layer, st in editor.layer_state.items()
        for k, t in st.items()
    }
    return weights, copy.deepcopy(editor.batches), state, tree_bytes(run)


@pytest.fixture
def editor(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """An RLSEdit editor on a tiny Llama, attached to ``tmp_path/run``, with one batch applied."""
    model, tok = tiny_models.tiny_model("llama", seed=5)
    stats = tmp_path_factory.getbasetemp() / "rollback-stats"
    ed = make_editor("rlsedit", model, tok, stats_dir=stats, **SETTINGS)
    ed.attach(tmp_path / "run")
    ed.edit(REQUESTS[:1])
    return ed


def corrupt_second_layer(editor: Any, corrupt: Callable[[LayerUpdate], LayerUpdate]) -> None:
    """Make ``editor.solve`` return ``corrupt(result)`` at the second edited layer."""
    original = editor.solve
    second = editor.config.layers[1]

    def solve(layer: int, K: torch.Tensor, E: torch.Tensor, W: torch.Tensor, **kw: Any) -> LayerUpdate:
        p = original(layer, K, E, W, **kw)
        return corrupt(p) if layer == second else p

    editor.solve = solve


def _scaled(p: LayerUpdate, value: float) -> LayerUpdate:
    return LayerUpdate(delta=torch.full_like(p.delta, value), state=p.state, record=p.record)


def _nan_state(p: LayerUpdate) -> LayerUpdate:
    state = {k: v.clone() for k, v in p.state.items()}
    state["C"][0, 0] = float("nan")
    return LayerUpdate(delta=p.delta, state=state, record=p.record)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda p: _scaled(p, float("nan")), "the update is not finite"),
        (lambda p: _scaled(p, float("inf")), "the update is not finite"),
        (lambda p: _scaled(p, -float("inf")), "the update is not finite"),
        (lambda p: _scaled(p, 1e30), "max_delta_ratio"),
        (lambda p: LayerUpdate(p.delta * 1e6, p.state, p.record), "max_delta_ratio"),
        (_nan_state, "state 'C' would not be finite"),
    ],
    ids=["nan", "inf", "-inf", "huge", "scaled", "nan-state"],
)
def test_non_finite_or_unbounded_update_is_rolled_back(
    editor: Any, tmp_path: Path, corrupt: Callable[[LayerUpdate], LayerUpdate], message: str
) -> None:
    before = snapshot(editor, tmp_path / "run")
    corrupt_second_layer(editor, corrupt)
    with pytest.raises(EditError, match=message) as info:
        editor.edit(REQUESTS[1:3])
    assert "rolled back" in str(info.value)
    assert f"layer {editor.config.layers[1]}" in str(info.value)
    assert snapshot(editor, tmp_path / "run") == before
    # the editor goes on: the next batch gets the next id and the run reloads
    del editor.solve
    report = editor.edit(REQUESTS[1:3])
    assert [b.batch_id for b in report.batches] == [1]
    model, tok = tiny_models.tiny_model("llama", seed=5)
    assert [b["id"] for b in load_editor(tmp_path / "run", model, tok).batches] == [0, 1]


def test_tiny_max_delta_ratio_refuses_every_batch(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    model, tok = tiny_models.tiny_model("llama", seed=5)
    stats = tmp_path_factory.getbasetemp() / "rollback-stats"
    ed = make_editor("rlsedit", model, tok, stats_dir=stats, **{**SETTINGS, "max_delta_ratio": 1e-9})
    ed.attach(tmp_path / "run")
    before = snapshot(ed, tmp_path / "run")
    with pytest.raises(EditError, match=r"max_delta_ratio=1e-09\); the batch was rolled back"):
        ed.edit(REQUESTS[:2])
    assert snapshot(ed, tmp_path / "run") == before
    assert ed.batches == []


@pytest.mark.parametrize("where", ["after_batch", "commit", "interrupt"])
def test_failure_after_records_were_written_leaves_no_trace(editor: Any, tmp_path: Path, where: str) -> None:
    """A failure late in the batch (after its K, V records were written; in the commit; a Ctrl-C) rolls
    everything back, removes the records, and the next batch (same id) is applied normally."""
    run = tmp_path / "run"
    before = snapshot(editor, run)
    if where == "after_batch":

        def boom() -> None:
            raise RuntimeError("drift check failed")

        editor.after_batch = boom
        expected: type[BaseException] = RuntimeError
    elif where == "commit":
        store = editor.recorder.attached
        original_commit = store.commit

        def commit(*args: Any, **kwargs: Any) -> int:
            raise OSError(28, "No space left on device")

        store.commit = commit
        expected = OSError
    else:

        def interrupt() -> None:
            raise KeyboardInterrupt

        editor.after_batch = interrupt
        expected = KeyboardInterrupt
    with pytest.raises(expected):
        editor.edit(REQUESTS[1:3])
    if where == "commit":
        store.commit = original_commit
        # a failed commit keeps the records (it cannot know whether it passed its commit point); the
        # next attempt replaces them
        leftover = tree_bytes(run).keys() - before[3].keys()
        assert all(name.startswith("batches/000001-") for name in leftover)
    else:
        assert snapshot(editor, run) == before
    assert snapshot(editor, run)[:3] == before[:3]
    editor.__dict__.pop("after_batch", None)
    editor.edit(REQUESTS[2:4])  # different requests, same batch id 1
    model, tok = tiny_models.tiny_model("llama", seed=5)
    loaded = load_editor(run, model, tok)
    assert [b["id"] for b in loaded.batches] == [0, 1]
    assert loaded.batches[1]["requests"][0]["subject"] == "Michael Jordan"
    RunStore(run, create=False).verify()


def test_cli_reports_a_rolled_back_batch(tmp_path: Path) -> None:
    """``rlsedit edit`` with an update over the bound: exit status 1, the reason on one line, no traceback;
    the run holds no batch and verifies."""
    model, tok = tiny_models.tiny_model("llama", seed=5)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps(r) + "\n" for r in REQUESTS[:2]), encoding="utf-8")
    run = tmp_path / "run"
    sets = [f"--set={k}={json.dumps(v)}" for k, v in {**SETTINGS, "max_delta_ratio": 1e-9}.items()]
    argv = ["edit", "--model", str(tmp_path / "model"), "--requests", str(requests), "--run", str(run)]
    argv += ["--stats", str(tmp_path / "stats"), *sets]
    result = subprocess.run(
        [sys.executable, "-m", "rlsedit", *argv],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("rlsedit: error: layer ") and "rolled back" in last
    manifest = RunStore(run, create=False).verify()
    assert manifest is not None and manifest["batches"] == []
    assert not (run / "batches").exists() or not any((run / "batches").iterdir())
