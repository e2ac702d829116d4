"""`rlsedit run` and `rlsedit report` on a tiny model saved to a folder: results, resume, refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlsedit import cli
from rlsedit.experiment import ExperimentSpec, run_experiment
from rlsedit.report import load_results, results_table, write_report
from tiny_models import tiny_model

SETTINGS = {"layers": [2, 3], "n_templates": 1, "steps": 2, "stats_samples": 16, "stats_max_len": 32}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model, tok = tiny_model("llama", seed=3)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def finished(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exp") / "run"
    stats = out.parent / "stats"
    argv = ["run", "--model", str(model_dir), "--split", "tune", "--edits", "6", "--batch-size", "3"]
    argv += ["--eval-every", "3", "--out", str(out), "--stats", str(stats)]
    for k, v in SETTINGS.items():
        argv += ["--set", f"{k}={json.dumps(v)}"]
    assert cli.main(argv) == 0
    return out


def test_run_writes_results(finished: Path) -> None:
    res = json.loads((finished / "results.json").read_text())
    assert res["edits"] == 6 and res["spec"]["batch_size"] == 3
    assert res["config"]["layers"] == [2, 3]
    for part in ("pre", "post"):
        for m in ("efficacy", "generalization", "specificity"):
            assert 0.0 <= res[part][m] <= 100.0
    assert [b["batch_id"] for b in res["batches"]] == [0, 1]
    assert res["timings"]["edits_timed"] == 6
    assert set(res["timings"]["per_edit"]) >= {"targets", "keys", "update", "total"}
    assert [c["edits"] for c in res["checkpoints"]] == [3]
    lines = (finished / "cases.jsonl").read_text().splitlines()
    assert len(lines) == 6 and "post" in json.loads(lines[0])


def test_rerun_resumes_without_reapplying(finished: Path, model_dir: Path) -> None:
    spec = ExperimentSpec(
        model=str(model_dir), split="tune", edits=6, batch_size=3, eval_every=3, overrides=dict(SETTINGS)
    )
    before = json.loads((finished / "results.json").read_text())
    res = run_experiment(spec, finished, stats_dir=finished.parent / "stats")
    assert len(res["batches"]) == 2  # nothing applied twice
    assert res["post"] == before["post"]


def test_different_spec_is_refused(finished: Path, model_dir: Path) -> None:
    spec = ExperimentSpec(model=str(model_dir), split="tune", edits=4, batch_size=2, overrides=dict(SETTINGS))
    with pytest.raises(ValueError, match="different experiment"):
        run_experiment(spec, finished)


def test_report_table_and_figure(finished: Path, tmp_path: Path) -> None:
    path = write_report([finished], tmp_path / "rep", label_keys=["layers"])
    text = path.read_text()
    assert "unedited" in text and "| run |" in text and "rlsedit run" in text
    assert (tmp_path / "rep" / "metrics.png").stat().st_size > 0
    table = results_table([load_results(finished)])
    assert table.count("\n") == 4  # header, rule, unedited row, one run


def test_report_of_unfinished_run_is_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="results.json"):
        load_results(tmp_path)


def test_bad_spec_values() -> None:
    with pytest.raises(ValueError):
        ExperimentSpec(edits=0)
    with pytest.raises(ValueError, match="not supported"):
        ExperimentSpec(dataset="imagenet")


def test_targets_cache_is_reused_and_exact(model_dir: Path, tmp_path: Path) -> None:
    spec = ExperimentSpec(model=str(model_dir), split="tune", edits=4, batch_size=2, overrides=dict(SETTINGS))
    cache, stats = tmp_path / "targets", tmp_path / "stats"
    a = run_experiment(spec, tmp_path / "a", stats_dir=stats, targets_cache=cache)
    assert len(list(cache.glob("targets-*.safetensors"))) == 2  # one per batch (model state differs)
    b = run_experiment(spec, tmp_path / "b", stats_dir=stats, targets_cache=cache)
    assert b["post"] == a["post"]
    assert all(
        r["timings"]["targets"] < 0.5 * max(x["timings"]["targets"] for x in a["batches"])
        for r in b["batches"]
    )
    # another method on the same stream shares the first batch only (the model differs afterwards)
    memit = ExperimentSpec(**{**spec.__dict__, "method": "memit", "overrides": dict(SETTINGS)})
    run_experiment(memit, tmp_path / "c", stats_dir=stats, targets_cache=cache)
    assert len(list(cache.glob("targets-*.safetensors"))) == 3
