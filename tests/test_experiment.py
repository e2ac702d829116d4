"""`rlsedit run` and `rlsedit report` on a tiny model saved to a folder: results, resume, refusal."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from rlsedit import cli
from rlsedit.experiment import ExperimentSpec, run_experiment, summarize_cases
from rlsedit.report import _triple, checkpoint_table, load_results, results_table, write_report
from tiny_models import tiny_model

SETTINGS = {"layers": [2, 3], "n_templates": 1, "steps": 2, "stats_samples": 16, "stats_max_len": 32}
#: SETTINGS as `--set` options of the CLI.
SET_ARGS = [a for k, v in SETTINGS.items() for a in ("--set", f"{k}={json.dumps(v)}")]


def _stream_argv(model_dir: Path, out: Path, stats: Path) -> list[str]:
    """`rlsedit run` of the `finished` fixture's stream (6 tune edits, batches of 3) into ``out``."""
    argv = ["run", "--model", str(model_dir), "--split", "tune", "--edits", "6", "--batch-size", "3"]
    return [*argv, "--eval-every", "3", "--out", str(out), "--stats", str(stats), *SET_ARGS]


def _stream_spec(model_dir: Path) -> ExperimentSpec:
    """The `finished` fixture's stream as an ExperimentSpec (what `_stream_argv` runs)."""
    return ExperimentSpec(
        model=str(model_dir), split="tune", edits=6, batch_size=3, eval_every=3, overrides=dict(SETTINGS)
    )


def _script(name: str, monkeypatch: pytest.MonkeyPatch, folder: str = "experiments") -> Any:
    """<folder>/<name>.py loaded as a module (registered in sys.modules, where dataclasses look)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / folder / f"{name}.py"
    mod_spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(mod_spec)
    monkeypatch.setitem(sys.modules, name, mod)
    mod_spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def finished(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exp") / "run"
    stats = out.parent / "stats"
    assert cli.main(_stream_argv(model_dir, out, stats)) == 0
    return out


def test_run_writes_results(finished: Path) -> None:
    res = json.loads((finished / "results.json").read_text())
    assert res["edits"] == 6 and res["spec"]["batch_size"] == 3
    assert res["config"]["layers"] == [2, 3]
    for part in ("pre", "post"):
        for m in ("efficacy", "generalization", "specificity"):
            assert 0.0 <= res[part][m] <= 100.0
    assert [b["batch_id"] for b in res["batches"]] == [0, 1]
    for b in res["batches"]:  # memory over the stream, per batch
        assert b["memory"]["rss_bytes"] > 0 and b["memory"]["max_rss_bytes"] > 0
    assert res["timings"]["edits_timed"] == 6
    assert set(res["timings"]["per_edit"]) >= {"targets", "keys", "update", "total"}
    assert [c["edits"] for c in res["checkpoints"]] == [3]
    lines = (finished / "cases.jsonl").read_text().splitlines()
    assert len(lines) == 6 and "post" in json.loads(lines[0])
    assert not (finished / "post.partial.jsonl").exists()  # the pieces are gone once post.json is written


def test_rerun_resumes_without_reapplying(finished: Path, model_dir: Path) -> None:
    spec = _stream_spec(model_dir)
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
    with pytest.raises(FileNotFoundError, match="results.json"):
        load_results(tmp_path, partial=True)  # not a run folder at all
    (tmp_path / "spec.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="with --partial"):
        load_results(tmp_path)  # a run folder whose stream has not finished


def test_report_of_a_run_in_progress(finished: Path, tmp_path: Path) -> None:
    """--partial reports a run without results.json up to its last checkpoint, with every figure."""
    import shutil

    run = tmp_path / "in-progress"
    shutil.copytree(finished, run, ignore=shutil.ignore_patterns("editor"))
    (run / "results.json").unlink()
    with pytest.raises(FileNotFoundError):
        load_results(run)
    res = load_results(run, partial=True)
    assert res["partial"] and res["edits"] == 3 and res["edits_applied"] == 6
    assert res["command"].startswith("rlsedit run")  # from invocations.json
    ck = json.loads((finished / "checkpoints" / "000003.json").read_text())["summary"]
    gen = json.loads((finished / "generation" / "000003.json").read_text())["summary"]
    assert res["post"] == {**ck, **gen}  # the checkpoint's scores and the fluency measured there
    assert (
        res["pre"]["fluency"]
        == json.loads((finished / "generation" / "pre.json").read_text())["summary"]["fluency"]
    )
    assert cli.main(["report", str(finished), str(run), "--out", str(tmp_path / "rep"), "--partial"]) == 0
    text = (tmp_path / "rep" / "REPORT.md").read_text()
    assert "3 (in progress: 6 of 6 applied)" in text
    # the table over the stream: the unedited fluency (0) and the checkpoint at 3 edits, with its fluency
    rows = [line for line in text.splitlines() if line.startswith("| in-progress |")]
    assert [line.split(" | ")[2] for line in rows] == ["3 (in progress: 6 of 6 applied)", "0 (unedited)", "3"]
    assert f"{gen['fluency']:.1f}" in rows[2] and f"{ck['efficacy']:.1f}" in rows[2]
    for fig in ("metrics", "objective", "stream"):
        assert (tmp_path / "rep" / f"{fig}.png").stat().st_size > 0, fig
    assert not (tmp_path / "rep" / "retention.png").exists()  # no retention slice below 3 edits here


def test_bad_spec_values() -> None:
    with pytest.raises(ValueError):
        ExperimentSpec(edits=0)
    with pytest.raises(ValueError, match="not supported"):
        ExperimentSpec(dataset="imagenet")
    with pytest.raises(ValueError, match="did you mean memit"):
        ExperimentSpec(method="memitt")
    with pytest.raises(ValueError, match="did you mean steps"):
        ExperimentSpec(method="memit", overrides={"stepz": 3})
    with pytest.raises(ValueError, match="target option"):
        ExperimentSpec(overrides={"targets": {"stepz": 3}})
    ExperimentSpec(overrides={"mu": 10.0, "steps": 3, "targets": {"lr": 0.1}})  # known names pass


def test_bad_run_input_writes_nothing_and_loads_no_model(
    finished: Path, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rlsedit.models.load

    def no_model(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded for input refused anyway")

    monkeypatch.setattr(rlsedit.models.load, "load_model", no_model)
    out = tmp_path / "out"
    assert cli.main(["run", "--model", str(model_dir), "--method", "nope", "--out", str(out)]) == 1
    assert cli.main(["run", "--model", str(model_dir), "--set", "lrr=0.1", "--out", str(out)]) == 1
    assert cli.main(["run", "--model", str(model_dir), "--edits", "1000000", "--out", str(out)]) == 1
    with pytest.raises(ValueError, match="stop_after"):
        run_experiment(_stream_spec(model_dir), out, stop_after=-1)
    assert not out.exists()
    monkeypatch.undo()  # a layer the model lacks: refused once the model is loaded, before it is scored
    import rlsedit.measure

    def no_scoring(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the unedited model was scored for settings refused anyway")

    monkeypatch.setattr(rlsedit.measure, "generation", no_scoring)
    monkeypatch.setattr(rlsedit.measure, "capability", no_scoring)
    argv = ["run", "--model", str(model_dir), "--split", "tune", "--edits", "2", "--capability"]
    assert cli.main([*argv, "--set", "layers=[2,99]", "--out", str(out)]) == 1
    assert cli.main([*argv, "--set", "mu=-1", "--out", str(out)]) == 1
    assert not out.exists()
    with pytest.raises(SystemExit, match="holds no saved editor"):
        cli.main(["eval", "--model", str(model_dir), "--run", str(tmp_path / "none")])
    with pytest.raises(SystemExit, match="holds no saved editor"):
        cli.main(["eval", "--model", str(model_dir), "--run", str(finished / "checkpoints")])


def test_eval_command_takes_an_experiment_folder(finished: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    argv = ["eval", "--run", str(finished), "--dataset", "counterfact", "--out", str(out)]
    assert cli.main(argv) == 0
    res = json.loads(out.read_text())
    assert res["run"] == str(finished / "editor") and res["requests_active"] == 6
    recorded = json.loads((finished / "results.json").read_text())["post"]
    for m in ("efficacy", "generalization", "specificity"):  # the run's own final scores of that state
        assert res["summary"][m] == pytest.approx(recorded[m]), m


def test_targets_cache_is_reused_and_exact(model_dir: Path, tmp_path: Path) -> None:
    spec = ExperimentSpec(model=str(model_dir), split="tune", edits=4, batch_size=2, overrides=dict(SETTINGS))
    cache, stats = tmp_path / "targets", tmp_path / "stats"
    a = run_experiment(spec, tmp_path / "a", stats_dir=stats, targets_cache=cache)
    assert len(list(cache.glob("targets-*.safetensors"))) == 2  # one per batch (model state differs)
    b = run_experiment(spec, tmp_path / "b", stats_dir=stats, targets_cache=cache)
    assert b["post"] == a["post"]
    assert not any(r["targets_cached"] for r in a["batches"])
    assert all(r["targets_cached"] for r in b["batches"])  # read back (h0 recomputed), not optimised
    assert [r["target_nll_final"] for r in b["batches"]] == [r["target_nll_final"] for r in a["batches"]]
    # another method on the same stream shares the first batch only (the model differs afterwards)
    memit = ExperimentSpec(**{**spec.__dict__, "method": "memit", "overrides": dict(SETTINGS)})
    run_experiment(memit, tmp_path / "c", stats_dir=stats, targets_cache=cache)
    assert len(list(cache.glob("targets-*.safetensors"))) == 3


# ---------------------------------------------------------------------------------------------------------
# evaluation parts: fluency, objective terms, zsRE, general capability, resumability, `rlsedit eval`

SMALL_CAPABILITY = {
    "tasks": ["sst2", "mmlu"],
    "n_items": 4,
    "ppl_tokens": 64,
    "ppl_window": 32,
    "ppl_stride": 16,
}


def test_run_reports_fluency_and_objective(finished: Path) -> None:
    res = json.loads((finished / "results.json").read_text())
    for part in ("pre", "post"):
        assert res[part]["fluency"] > 0 and res[part]["generation_n"] == 6
        assert res[part]["consistency"] is None and "consistency_note" in res[part]
    gen = json.loads((finished / "generation" / "post.json").read_text())
    assert len(gen["records"]) == 6 and gen["state"]["batches"] == 2
    # fluency at the checkpoint too: the same cases, on the model after 3 edits
    mid = json.loads((finished / "generation" / "000003.json").read_text())
    assert mid["edits"] == 3 and mid["state"]["batches"] == 1
    assert [r["case_id"] for r in mid["records"]] == [r["case_id"] for r in gen["records"]]
    (ck,) = res["checkpoints"]
    assert ck["summary"]["fluency"] == mid["summary"]["fluency"] == ck["generation"]["fluency"]
    assert (
        ck["summary"]["efficacy"]
        == json.loads((finished / "checkpoints" / "000003.json").read_text())["summary"]["efficacy"]
    )
    for b in json.loads((finished / "batches.json").read_text()):
        terms = b["objective"]
        assert set(terms) == {"2", "3"}
        for t in terms.values():
            tol = 1e-9 * (1.0 + t["objective"])  # fit_total comes from running sums (cancellation)
            assert t["fit_total"] >= t["fit_batch"] - tol and t["fit_batch"] >= 0
            assert t["source"] == "running sums" and t["objective"] >= t["fit_total"]
    assert res["capability"] is None


@pytest.fixture(scope="module")
def zsre_run(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[ExperimentSpec, Path]:
    out = tmp_path_factory.mktemp("zsre") / "run"
    spec = ExperimentSpec(
        model=str(model_dir),
        dataset="zsre",
        edits=4,
        batch_size=2,
        eval_every=2,
        overrides=dict(SETTINGS),
        capability=dict(SMALL_CAPABILITY),
    )
    run_experiment(spec, out, stats_dir=out.parent / "stats")
    return spec, out


def test_zsre_run_with_capability(zsre_run: tuple[ExperimentSpec, Path]) -> None:
    spec, out = zsre_run
    res = json.loads((out / "results.json").read_text())
    assert res["spec"]["dataset"] == "zsre" and res["spec"]["fluency"] == 0
    for part in ("pre", "post"):
        for m in ("efficacy", "generalization", "specificity"):
            assert 0.0 <= res[part][m] <= 100.0
        assert "fluency" not in res[part]
    recs = [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and "efficacy_tokens" in recs[0]["post"]
    cap = res["capability"]
    assert cap["pre"]["config"]["n_items"] == 4 and set(cap["pre"]) >= {"perplexity", "sst2", "mmlu"}
    assert cap["post"]["edits"] == 4 and [c["edits"] for c in cap["checkpoints"]] == [2]
    assert cap["pre"]["mmlu"]["chance"] == 25.0 and len(cap["pre"]["sst2"]["ci95"]) == 2
    assert (out / "capability" / "000002.json").exists() and (out / "capability" / "000004.json").exists()
    assert [c["edits"] for c in res["checkpoints"]] == [2]


def test_rerun_computes_nothing_again(zsre_run: tuple[ExperimentSpec, Path]) -> None:
    spec, out = zsre_run
    files = ["pre.json", "post.json", "batches.json", "capability/pre.json", "capability/000004.json"]
    files += ["checkpoints/000002.json", "capability/000002.json"]
    stamps = {f: (out / f).stat().st_mtime_ns for f in files}
    before = json.loads((out / "results.json").read_text())
    res = run_experiment(spec, out, stats_dir=out.parent / "stats")
    assert {f: (out / f).stat().st_mtime_ns for f in files} == stamps
    assert res["post"] == before["post"] and res["capability"] == before["capability"]


def test_a_spec_of_the_older_format_is_refused_until_migrated(
    finished: Path, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spec.json written before the evaluation fields existed (format 1) is refused, naming the migration
    script; migrated, it stands for the old behaviour of the fields it lacked, and a second pass changes
    nothing."""
    migrate = _script("migrate_runs", monkeypatch, folder="scripts")
    saved = json.loads((finished / "spec.json").read_text())
    old = {k: v for k, v in saved.items() if k not in ("fluency", "capability", "consistency_dir", "targets")}
    old["format"] = "rlsedit-experiment/1"
    spec = _stream_spec(model_dir)
    assert spec.matches(saved)
    with pytest.raises(ValueError, match="migrate_runs"):
        spec.matches(old)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(old))
    assert migrate.migrate_spec(path) and not migrate.migrate_spec(path)
    upgraded = json.loads(path.read_text())
    assert spec.matches(upgraded) and upgraded == saved
    assert not ExperimentSpec(**{**spec.__dict__, "fluency": 5}).matches(upgraded)
    # a capability setting written before the scorer could be chosen: scored by rlsedit's own code
    with_cap = ExperimentSpec(**{**spec.__dict__, "capability": {"tasks": ["sst2"]}}).to_dict()
    old_cap = {
        k: v for k, v in with_cap["capability"].items() if k not in ("backend", "lm_eval", "lm_eval_limit")
    }
    path.write_text(json.dumps({**with_cap, "capability": old_cap}))
    assert migrate.migrate_spec(path) and not migrate.migrate_spec(path)
    upgraded = json.loads(path.read_text())
    assert upgraded["capability"] == {**with_cap["capability"], "backend": "rlsedit"}


def test_spec_checks_for_the_new_fields() -> None:
    with pytest.raises(ValueError, match="tune"):
        ExperimentSpec(dataset="zsre", split="tune")
    with pytest.raises(ValueError, match="fluency"):
        ExperimentSpec(fluency=-1)
    with pytest.raises(ValueError, match="capability task"):
        ExperimentSpec(capability={"tasks": ["nope"]})
    assert ExperimentSpec(capability={}).capability["n_items"] == 100


def test_eval_command_scores_an_edit_run(model_dir: Path, tmp_path: Path) -> None:
    from rlsedit.datasets import load_counterfact
    from rlsedit.editors import load_editor
    from rlsedit.eval.counterfact import score_counterfact, summarize_counterfact
    from rlsedit.models.load import load_model

    cases = load_counterfact(split="tune", limit=4)
    reqs = tmp_path / "edits.jsonl"
    reqs.write_text("".join(json.dumps(c.request.to_dict()) + "\n" for c in cases))
    run = tmp_path / "run"
    argv = [
        "edit",
        "--model",
        str(model_dir),
        "--requests",
        str(reqs),
        "--run",
        str(run),
        "--batch-size",
        "2",
    ]
    argv += ["--stats", str(tmp_path / "stats")]
    argv += SET_ARGS
    assert cli.main(argv) == 0
    out = tmp_path / "eval.json"
    argv = ["eval", "--run", str(run), "--dataset", "counterfact", "--fluency", "2", "--objective"]
    argv += ["--capability", "--capability-items", "2", "--capability-tasks", "rte", "--ppl-tokens", "40"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["method"] == "rlsedit" and res["requests_active"] == 4
    assert [r["case_id"] for r in res["records"]] == [c.case_id for c in cases]
    assert res["summary"]["generation_n"] == 2 and res["summary"]["fluency"] > 0
    assert set(res["objective"]) == {"2", "3"} and res["capability"]["rte"]["n"] == 2
    # the same numbers as scoring the loaded editor's model directly
    model, tok = load_model(str(model_dir))
    load_editor(run, model, tok, attach=False)
    want = summarize_counterfact(score_counterfact(model, tok, cases))
    assert res["summary"]["efficacy"] == pytest.approx(want["efficacy"])
    assert res["summary"]["specificity"] == pytest.approx(want["specificity"])
    # --unedited scores the base model; --limit picks cases from the dataset instead of the run
    base = tmp_path / "base.json"
    argv = ["eval", "--run", str(run), "--dataset", "counterfact", "--unedited", "--split", "tune"]
    assert cli.main([*argv, "--limit", "4", "--out", str(base)]) == 0
    model0, tok0 = load_model(str(model_dir))
    want0 = summarize_counterfact(score_counterfact(model0, tok0, cases))
    assert json.loads(base.read_text())["summary"]["efficacy"] == pytest.approx(want0["efficacy"])


def test_batch_report_is_json_native_even_when_figures_are_missing() -> None:
    from rlsedit.editors.base import BatchReport
    from rlsedit.store import save_json

    rep = BatchReport(
        batch_id=0, n_requests=1, layers={5: {"residual_norm": float("nan"), "delta_norm": 1.0}}
    )
    d = rep.to_dict()
    assert d["layers"]["5"]["residual_norm"] is None and d["residual_before"] is None
    assert d["layers"]["5"]["delta_norm"] == 1.0
    save_json(Path(__import__("tempfile").mkdtemp()) / "r.json", d)  # no NaN reaches JSON


def test_sampled_checkpoints_and_shared_pre_cache(
    finished: Path, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """checkpoint_cases scores a spread sample (plus the retention slices in full); the unedited model's
    scores are computed after the stream, kept in pre_cache and reused by the next run on the same model."""
    spec = ExperimentSpec(
        model=str(model_dir),
        split="tune",
        edits=6,
        batch_size=2,
        eval_every=2,
        overrides=dict(SETTINGS),
        retention=[1, 3],
        checkpoint_cases=2,
    )
    cache, stats = tmp_path / "pre", finished.parent / "stats"
    a = run_experiment(spec, tmp_path / "a", stats_dir=stats, pre_cache=cache)
    ck = {c["edits"]: c for c in a["checkpoints"]}
    assert sorted(ck) == [2, 4]
    assert ck[2]["summary_cases"] == 2 and ck[2]["cases_scored"] == 2 and set(ck[2]["retention"]) == {"1"}
    # at 4 edits: sample {0, 3} and the first 3 cases for retention: 4 cases scored
    assert (
        ck[4]["summary_cases"] == 2 and ck[4]["cases_scored"] == 4 and set(ck[4]["retention"]) == {"1", "3"}
    )
    assert ck[4]["summary"]["n"] == 2 and ck[4]["retention"]["3"]["n"] == 3
    files = list(cache.glob("pre-*-counterfact-v*.jsonl"))
    assert len(files) == 1 and len(files[0].read_text().splitlines()) == 6
    # the pre-edit figures equal those of a run that scored the unedited model without the cache
    base = json.loads((finished / "results.json").read_text())
    for m in ("efficacy", "generalization", "specificity"):
        assert a["pre"][m] == base["pre"][m]
    # a second run (another method) takes every pre-edit score from the cache
    stamp = files[0].stat().st_mtime_ns
    memit = ExperimentSpec(**{**spec.__dict__, "method": "memit", "overrides": dict(SETTINGS)})
    b = run_experiment(memit, tmp_path / "b", stats_dir=stats, pre_cache=cache)
    assert files[0].stat().st_mtime_ns == stamp
    assert b["pre"] == a["pre"]
    # experiments/prescore.py reads the same cache (nothing re-scored) and summarises slices of it
    prescore = _script("prescore", monkeypatch)
    argv = ["--model", str(model_dir), "--split", "tune", "--edits", "6", "--slices", "3,6"]
    assert prescore.main([*argv, "--pre-cache", str(cache), "--out", str(tmp_path / "pre.json")]) == 0
    assert files[0].stat().st_mtime_ns == stamp
    sliced = json.loads((tmp_path / "pre.json").read_text())["slices"]
    assert sliced["3"]["n"] == 3
    for m in ("efficacy", "generalization", "specificity"):
        assert sliced["6"][m] == a["pre"][m]
    # the earliest edits at the end of the stream: the final per-case scores' first slices
    assert set(a["retention"]) == set(a["pre_retention"]) == {"1", "3"}
    post = [json.loads(line)["post"] for line in (tmp_path / "a" / "cases.jsonl").read_text().splitlines()]
    assert a["retention"]["3"] == summarize_cases("counterfact", post[:3], a["superseded_cases"])
    assert a["pre_retention"]["3"] == sliced["3"]
    write_report([tmp_path / "a", tmp_path / "b"], tmp_path / "rep")
    assert (tmp_path / "rep" / "retention.png").stat().st_size > 0
    final = [row for row in checkpoint_table([load_results(tmp_path / "a")]).splitlines() if "| 6 |" in row]
    assert len(final) == 1 and _triple(a["retention"]["3"]) in final[0]
    with pytest.raises(ValueError, match="checkpoint_cases"):
        ExperimentSpec(checkpoint_cases=-1)


def test_stop_after_leaves_a_resumable_run(finished: Path, model_dir: Path, tmp_path: Path) -> None:
    """--stop-after applies the edits up to N (and the checkpoint there, the stream's end included), then
    stops; the same command without it resumes and ends where an uninterrupted run ends."""
    out = tmp_path / "stopped"
    argv = _stream_argv(model_dir, out, finished.parent / "stats")
    assert cli.main([*argv, "--stop-after", "3"]) == 0
    assert not (out / "results.json").exists()
    assert [b["batch_id"] for b in json.loads((out / "batches.json").read_text())] == [0]
    assert (out / "checkpoints" / "000003.json").exists()
    gen = out / "generation" / "000003.json"
    stamp = gen.stat().st_mtime_ns
    assert cli.main([*argv, "--stop-after", "3"]) == 0  # already there: applies nothing more
    assert len(json.loads((out / "batches.json").read_text())) == 1
    assert gen.stat().st_mtime_ns == stamp  # nor generates again
    with pytest.raises(SystemExit):
        cli.main([*argv, "--stop-after", "0"])
    # a stop at the stream's end applies the rest and scores its checkpoint, not the final scoring
    assert cli.main([*argv, "--stop-after", "6"]) == 0
    assert not (out / "results.json").exists() and (out / "checkpoints" / "000006.json").exists()
    assert load_results(out, partial=True)["edits_applied"] == 6
    assert cli.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert [b["batch_id"] for b in res["batches"]] == [0, 1]
    assert res["post"] == json.loads((finished / "results.json").read_text())["post"]


def test_stop_between_checkpoints_measures_fluency_there(
    finished: Path, model_dir: Path, tmp_path: Path
) -> None:
    """A stream stopped where no checkpoint falls is still generated from at that point (the same cases as
    before editing), so a long run cut by a session has a post-edit fluency; --partial reports it."""
    out = tmp_path / "cut"
    argv = ["run", "--model", str(model_dir), "--split", "tune", "--edits", "6", "--batch-size", "3"]
    argv += [
        "--eval-every",
        "0",
        "--fluency",
        "2",
        "--out",
        str(out),
        "--stats",
        str(finished.parent / "stats"),
    ]
    argv += SET_ARGS
    assert cli.main([*argv, "--stop-after", "3"]) == 0
    assert not list((out / "checkpoints").glob("*.json"))
    pre = json.loads((out / "generation" / "pre.json").read_text())
    cut = json.loads((out / "generation" / "000003.json").read_text())
    assert cut["edits"] == 3 and cut["state"]["batches"] == 1 and cut["summary"]["generation_n"] == 2
    assert [r["case_id"] for r in cut["records"]] == [r["case_id"] for r in pre["records"]]
    res = load_results(out, partial=True)
    assert res["pre"]["fluency"] == pre["summary"]["fluency"]  # before the stream's end scores the cases
    saved = {k: v for k, v in json.loads((out / "spec.json").read_text()).items() if k != "format"}
    spec = ExperimentSpec(**saved)
    again = run_experiment(spec, out, stats_dir=finished.parent / "stats", stop_after=3)  # applies nothing
    assert again["stopped_after"] == 3 and again["partial"] and again["edits_applied"] == 3
    assert again["pre"] == res["pre"] and again["checkpoints"] == []


def test_by_position_slices_a_finished_run(
    finished: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """experiments/by_position.py: one slice of every case is the run's post-edit summary; slices of 3
    cover the stream in order; a folder without cases.jsonl is refused."""
    mod = _script("by_position", monkeypatch)
    res = json.loads((finished / "results.json").read_text())
    (whole,) = mod.by_position(finished, 6)
    for m in ("efficacy", "generalization", "specificity", "n"):
        assert whole[m] == pytest.approx(res["post"][m])
    parts = mod.by_position(finished, 4)
    assert [(p["first"], p["last"]) for p in parts] == [(1, 4), (5, 6)]
    assert sum(p["n"] for p in parts) == res["post"]["n"]
    assert mod.main([str(finished), "--every", "3"]) == 0
    assert "| 1-3 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        mod.main([str(finished.parent / "stats")])
    # several runs of one stream: a column per run beside the unedited model's score of the same slice
    table = mod.side_by_side([finished, finished], 3, "efficacy")
    pre = mod.by_position(finished, 3, "pre")
    post = mod.by_position(finished, 3)
    assert f"| 1-3 | {post[0]['n']} | {pre[0]['efficacy']:.1f} | {post[0]['efficacy']:.1f} |" in table
    (whole_pre,) = mod.by_position(finished, 6, "pre")  # the unedited model's side: the run's pre-edit row
    for m in ("efficacy", "generalization", "specificity"):
        assert whole_pre[m] == pytest.approx(res["pre"][m])
    assert mod.main([str(finished), str(finished), "--metric", "specificity"]) == 0
    assert "specificity by position" in capsys.readouterr().out
    other = finished.parent / "other"  # the same records of another stream (cases in another order)
    other.mkdir(exist_ok=True)
    (other / "spec.json").write_text((finished / "spec.json").read_text())
    lines = (finished / "cases.jsonl").read_text().splitlines()
    (other / "cases.jsonl").write_text("\n".join(reversed(lines)) + "\n")
    with pytest.raises(ValueError, match="not of the same stream"):
        mod.side_by_side([finished, other], 3, "efficacy")
    import gzip  # the records committed compressed (a long stream's cases.jsonl.gz) read the same

    packed = finished.parent / "packed"
    packed.mkdir(exist_ok=True)
    (packed / "spec.json").write_text((finished / "spec.json").read_text())
    (packed / "cases.jsonl.gz").write_bytes(gzip.compress((finished / "cases.jsonl").read_bytes()))
    assert mod.by_position(packed, 4) == parts
    assert mod.main([str(packed), "--every", "3"]) == 0 and "| 1-3 |" in capsys.readouterr().out
    # one run and --metric: that metric beside the unedited model's score of the same slices
    assert mod.main([str(packed), "--every", "3", "--metric", "efficacy"]) == 0
    assert mod.side_by_side([packed], 3, "efficacy") == capsys.readouterr().out


def test_same_command_reproduces_a_run_value_for_value(
    finished: Path,
    model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """experiments/compare_runs.py: the stream of `finished` run again into another folder gives the same
    scores, batch reports and per-case records (timings aside); a changed score and a missing checkpoint are
    found; --prefix compares a run still going with its part of a longer one."""
    import shutil

    mod = _script("compare_runs", monkeypatch)

    again = tmp_path / "again"  # the command of the `finished` fixture, another --out
    assert cli.main(_stream_argv(model_dir, again, finished.parent / "stats")) == 0
    cmp = mod.compare_runs(finished, again)
    assert cmp.same and cmp.values > 100, cmp.differences[:5]
    assert {"results.json", "cases.jsonl", "batches.json", "checkpoints/000003.json"} <= set(cmp.files)
    assert mod.main([str(finished), str(again)]) == 0
    assert "same" in capsys.readouterr().out

    # one changed score is found, with its place; timings are not compared
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    res = json.loads((copy / "results.json").read_text())
    res["post"]["efficacy"] += 1.0
    res["timings"]["seconds"] = -1.0
    (copy / "results.json").write_text(json.dumps(res))
    cmp = mod.compare_runs(finished, copy)
    assert [(f, p) for f, p, _, _ in cmp.differences] == [("results.json", "post.efficacy")]
    assert mod.compare_runs(finished, copy, rtol=0.5).same  # within a relative tolerance
    assert mod.main([str(finished), str(copy)]) == 1
    assert "results.json post.efficacy" in capsys.readouterr().out

    # a run at an earlier point of the stream: different, unless only the common part is compared
    part = tmp_path / "part"
    shutil.copytree(finished, part)
    for name in ("results.json", "cases.jsonl", "checkpoints/000003.json"):
        (part / name).unlink()
    batches = json.loads((part / "batches.json").read_text())
    (part / "batches.json").write_text(json.dumps(batches[:1]))
    assert not mod.compare_runs(finished, part).same
    cmp = mod.compare_runs(finished, part, prefix=True)
    assert cmp.same and cmp.truncated == {"batches.json": (2, 1)} and "results.json" in cmp.only_a

    with pytest.raises(SystemExit):  # not a run folder
        mod.main([str(finished), str(tmp_path)])
    assert mod.main([str(finished), str(again), "--rtol", "0"]) == 0


def test_pace_estimates_the_editing_left() -> None:
    from rlsedit.experiment import _Pace

    pace = _Pace(1000)
    assert pace.left(0) == ""  # nothing timed yet: no estimate
    pace.add(100, 600.0)  # 6 s per edit
    assert pace.left(100) == ", ~90 min of editing left"
    pace.add(100, 1200.0)  # the mean of this invocation's chunks: 9 s per edit
    assert pace.left(200) == ", ~120 min of editing left"
    assert pace.left(1000) == ""  # the end: nothing left


def test_batch_log_names_the_editors_own_steps() -> None:
    from rlsedit.editors.base import BatchReport
    from rlsedit.experiment import _steps

    closed_form = BatchReport(batch_id=0, n_requests=100, residual_before=23.1, residual_after=4.2)
    closed_form.timings = {"targets": 140.25, "keys": 11.0, "update": 0.213, "save": 0.4, "total": 152.0}
    assert _steps(closed_form) == "targets 140.2s keys 11.0s update 0.21s save 0.40s; residual 23.10 -> 4.20"
    # FT optimises the weights directly: its own step name, and no residual (NaN) in place of a figure
    ft = BatchReport(batch_id=3, n_requests=100)
    ft.timings = {"finetune": 450.31, "keys": 0.0, "update": 0.012, "total": 450.4}
    assert _steps(ft) == "finetune 450.3s keys 0.00s update 0.01s"


def test_batch_log_lines_count_the_stream(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import re

    spec = ExperimentSpec(model=str(model_dir), split="tune", edits=6, batch_size=2, overrides=dict(SETTINGS))
    with caplog.at_level(logging.INFO, logger="rlsedit.experiment"):
        run_experiment(spec, tmp_path / "run", stats_dir=tmp_path / "stats", stop_after=4)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("batch ")]
    assert len(lines) == 2
    assert re.match(r"batch 0 \(2 of 6 edits, ~\d+ min of editing left\): targets ", lines[0])
    assert lines[1].startswith("batch 1 (4 of 6 edits): ")  # the stop: nothing left to estimate


def _seed(src: Path, dst: Path) -> None:
    """A copy of run folder ``src`` without its editor state (what is committed of a run)."""
    import shutil

    shutil.copytree(src, dst, ignore=lambda d, names: ["editor"] if Path(d) == src else [])


def test_a_recorded_stream_replays_from_its_files_and_cached_targets(
    finished: Path,
    model_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run folder's files without its editor state, plus its targets cache, carry a stream on: the same
    command replays the recorded batches (targets read back, each batch checked against its record, the
    recorded checkpoints not scored again) and goes on; the result equals the stream run in one go. A
    replay that does not reproduce its record is refused with a clear error."""
    import logging

    from rlsedit.replay import ReplayMismatch
    from rlsedit.store import load_tensors

    stats = finished.parent / "stats"
    first = tmp_path / "first"  # the first session: 3 of the 6 edits, targets kept in the folder
    argv = [*_stream_argv(model_dir, first, stats), "--targets-cache", str(first / "targets")]
    assert cli.main([*argv, "--stop-after", "3"]) == 0
    cached = sorted((first / "targets").glob("*.safetensors"))
    assert len(cached) == 1 and set(load_tensors(cached[0])) == {"z", "nll_init", "nll_final", "steps"}

    later = tmp_path / "later"  # a later session: the committed files only, no editor/
    _seed(first, later)
    assert not (later / "editor").exists() and (later / "checkpoints" / "000003.json").exists()
    checkpoint = (later / "checkpoints" / "000003.json").read_bytes()
    argv = [*_stream_argv(model_dir, later, stats), "--targets-cache", str(later / "targets")]
    with caplog.at_level(logging.INFO, logger="rlsedit"):
        assert cli.main(argv) == 0
    log = caplog.text
    assert "targets read from the cache" in log and "replayed 1 recorded batches" in log
    assert "checkpoint at 3 edits" not in log  # recorded, not scored again
    assert (later / "checkpoints" / "000003.json").read_bytes() == checkpoint
    cmp = _script("compare_runs", monkeypatch).compare_runs(finished, later)
    assert cmp.same and cmp.values > 100, cmp.differences[:5]
    assert len(json.loads((later / "batches.json").read_text())) == 2

    # a record the replay does not reproduce: refused, naming the value, and batches.json left as it was
    bad = tmp_path / "bad"
    _seed(first, bad)
    batches = json.loads((bad / "batches.json").read_text())
    batches[0]["residual_after"] *= 1.5
    (bad / "batches.json").write_text(json.dumps(batches))
    before = (bad / "batches.json").read_bytes()
    with pytest.raises(ReplayMismatch, match="residual_after"):
        run_experiment(
            _stream_spec(model_dir),
            bad,
            stats_dir=stats,
            targets_cache=bad / "targets",
        )
    assert (bad / "batches.json").read_bytes() == before
    # the mismatched batch is in bad/editor now: the same command refuses the folder rather than resume
    with pytest.raises(ReplayMismatch, match="residual_after"):
        run_experiment(_stream_spec(model_dir), bad, stats_dir=stats, targets_cache=bad / "targets")
    assert (bad / "batches.json").read_bytes() == before


def test_a_replay_on_another_machine_reads_the_recorded_targets_within_a_stated_tolerance(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another CPU rounds differently, so its weights hash to other targets-cache keys and its reports
    differ from the record in the last bits. The replay reads each batch's targets from the file the
    record names (for a record written before batches kept the keys, the migration names the one file
    whose NLLs are the recorded ones) and accepts differences within ``--replay-rtol``, keeping each
    batch's largest difference in replays.json; the default tolerance refuses them, and says how to go
    on."""
    import logging

    from rlsedit.replay import REPLAY_FILE, REPLAY_MISMATCH_FILE, ReplayMismatch

    stats = tmp_path / "stats"
    first = tmp_path / "first"
    argv = [*_stream_argv(model_dir, first, stats), "--targets-cache", str(first / "targets")]
    assert cli.main([*argv, "--stop-after", "3"]) == 0
    (recorded_file,) = (first / "targets").glob("*.safetensors")
    (record,) = json.loads((first / "batches.json").read_text())
    assert record["targets_keys"] == [recorded_file.name[len("targets-") : -len(".safetensors")]]

    other = tmp_path / "other"  # the committed files, as another machine sees them
    _seed(first, other)
    (other / "targets" / recorded_file.name).rename(other / "targets" / "targets-recorded.safetensors")
    assert record["machine"]["threads"] >= 1
    for key in ("targets_keys", "machine"):  # a record written before batches kept these
        record.pop(key)
    record["residual_after"] *= 1 + 1e-5  # the last bits of another CPU
    (other / "batches.json").write_text(json.dumps([record]))
    migrate = _script("migrate_runs", monkeypatch, folder="scripts")
    assert migrate.migrate(other, other / "targets") == ["batches.json"]
    assert json.loads((other / "batches.json").read_text())[0]["targets_keys"] == ["recorded"]
    argv = [*_stream_argv(model_dir, other, stats), "--targets-cache", str(other / "targets")]
    with pytest.raises(ReplayMismatch, match="--replay-rtol"):
        run_experiment(_stream_spec(model_dir), other, stats_dir=stats, targets_cache=other / "targets")
    assert cli.main(argv) == 1  # the folder is refused from then on
    assert (other / REPLAY_MISMATCH_FILE).is_file()
    # as the message says: drop the editor state and the refusal, replay with a larger tolerance
    import shutil

    shutil.rmtree(other / "editor")
    (other / REPLAY_MISMATCH_FILE).unlink()
    with pytest.raises(SystemExit):
        cli.main([*argv, "--replay-rtol", "0"])
    with caplog.at_level(logging.INFO, logger="rlsedit"):
        assert cli.main([*argv, "--replay-rtol", "1e-4"]) == 0
    assert "targets-recorded.safetensors" in caplog.text  # read back, not optimised again
    # the recorded file plus the new batch's (the failed attempt's optimised batch 1 is one more)
    names = {p.name for p in (other / "targets").glob("*.safetensors")}
    assert "targets-recorded.safetensors" in names
    batches = json.loads((other / "batches.json").read_text())
    assert len(batches) == 2 and f"targets-{batches[1]['targets_keys'][0]}.safetensors" in names
    replays = json.loads((other / REPLAY_FILE).read_text())
    assert [(r["command"], r["rtol"]) for r in replays] == [(None, 1e-6), (replays[1]["command"], 1e-4)]
    assert "--replay-rtol 1e-4" in replays[1]["command"]
    assert replays[1]["machine"]["torch"] and replays[1]["machine"]["threads"] >= 1
    # the batch applied now names its machine; the replayed record is left as it was written
    assert batches[1]["machine"] == replays[1]["machine"] and "machine" not in batches[0]
    (refused,) = replays[0]["batches"]  # the refused batch's comparison is on record
    assert refused["refused"] and refused["where"] == "residual_after"
    (checked,) = replays[1]["batches"]
    assert checked["where"] == "residual_after" and checked["differing"] == 1
    n = checked["values"]  # the log counts the values as recorded and those differing within the tolerance
    assert f"of {n} values, {n - 1} as recorded and 1 different but within the relative tolerance 0.0001" in (
        caplog.text
    )
    assert checked["max_relative_difference"] == pytest.approx(1e-5, rel=1e-3)
    # the replayed value itself is kept: the record's value without the 1e-5 the test put on it
    assert checked["replayed"]["residual_after"] == pytest.approx(
        record["residual_after"] / (1 + 1e-5), rel=1e-12
    )
    assert refused["replayed"] == checked["replayed"]
    assert json.loads((other / "results.json").read_text())["edits"] == 6


def test_recorded_targets_are_found_by_key_or_by_their_unique_nlls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record's ``targets_keys`` are what a replay reads; the migration gives an older record the one
    file with its request count and its exact mean NLLs, and none where two files match (or the figures
    differ)."""
    import torch

    from rlsedit.replay import recorded_targets_keys

    migrate = _script("migrate_runs", monkeypatch, folder="scripts")

    def _recorded_targets_keys(cache: Path, record: dict, index: dict) -> list[str]:
        if "targets_keys" in record:
            return recorded_targets_keys(record)
        if not index and cache.is_dir():
            index.update(migrate.cached_target_figures(cache))
        return migrate.matching_keys(record, index)

    from rlsedit.store import save_tensors

    def put(name: str, n: int, init: float, final: float) -> None:
        save_tensors(
            tmp_path / f"targets-{name}.safetensors",
            {
                "z": torch.zeros(n, 4),
                "nll_init": torch.full((n,), init),
                "nll_final": torch.full((n,), final),
                "steps": torch.ones(n, dtype=torch.long),
            },
        )

    put("a", 3, 9.5, 0.25)
    put("b", 3, 8.5, 0.25)
    put("c", 2, 9.5, 0.25)
    old = {"n_requests": 3, "target_nll_init": 9.5, "target_nll_final": 0.25}
    assert _recorded_targets_keys(tmp_path, {**old, "targets_keys": ["x", "y"]}, {}) == ["x", "y"]
    index: dict = {}
    assert _recorded_targets_keys(tmp_path, old, index) == ["a"]
    assert set(index) == {"a", "b", "c"}  # read once, reused
    assert _recorded_targets_keys(tmp_path, {**old, "target_nll_final": 0.5}, index) == []
    assert _recorded_targets_keys(tmp_path, {**old, "n_requests": 2}, index) == ["c"]
    put("d", 3, 9.5, 0.25)  # two files with the record's figures: neither is trusted
    assert _recorded_targets_keys(tmp_path, old, {}) == []
    assert _recorded_targets_keys(tmp_path / "absent", old, {}) == []


def test_replay_divergence_tables_each_batch_last_accepted_replay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """experiments/replay_divergence.py: one column per run, a batch's last replay that was not refused,
    the machines named; a folder without replays.json is an error."""
    mod = _script("replay_divergence", monkeypatch)

    def check(i: int, diff: float, **extra: Any) -> dict[str, Any]:
        return {"batch_id": i, "values": 9, "differing": 1, "max_relative_difference": diff, **extra}

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    machine = {"cpu": "X", "cpu_capability": "AVX2", "torch": "2", "threads": 2}
    (a / "replays.json").write_text(
        json.dumps(
            [
                {"command": "c1", "rtol": 1e-6, "batches": [check(0, 1e-7), check(1, 0.5, refused=True)]},
                {"command": "c2", "machine": machine, "rtol": 1, "batches": [check(0, 2e-7), check(1, 0.25)]},
            ]
        )
    )
    (b / "replays.json").write_text(json.dumps([{"command": "c", "rtol": 1, "batches": [check(0, 3e-7)]}]))
    assert mod.main([str(a), str(b), "--every", "1"]) == 0
    out = capsys.readouterr().out
    assert "| 0 | 2.0e-07 | 3.0e-07 |" in out and "| 1 | 2.5e-01 | - |" in out
    assert '"cpu": "X"' in out and "b: replayed on an unrecorded machine" in out
    assert mod.main([str(a), str(tmp_path / "none")]) == 2


def test_report_stream_plot_log_scale_only_for_an_outlier_batch() -> None:
    from rlsedit.report import _has_outlier

    assert not _has_outlier([])
    assert not _has_outlier([1.9, 2.0, 2.1, 2.4])
    # one batch whose wall time includes a stopped process (batch 33 of the CounterFact stream)
    assert _has_outlier([1.9, 2.0, 2.1, 58.7])
    assert not _has_outlier([0.0, 1.0, 4.0])


def test_report_legend_sits_right_of_the_last_panel() -> None:
    """The one legend of a row of panels lies outside every plotted area (right of the last panel), names
    the curves of the first panel that has labelled ones, and is left out where none has."""
    from rlsedit.report import _legend, _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, squeeze=False)
    _legend(axes[0], 6)  # nothing drawn yet: no legend
    assert all(ax.get_legend() is None for ax in axes[0])
    axes[0][1].plot([0, 1], [0, 1], label="run a")
    axes[0][1].plot([0, 1], [1, 0], label="run b")
    axes[0][2].plot([0, 1], [0, 1], label="run a")
    _legend(axes[0], 6)
    assert axes[0][0].get_legend() is None and axes[0][1].get_legend() is None
    legend = axes[0][2].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["run a", "run b"]
    fig.canvas.draw()
    box = legend.get_window_extent()
    assert all(box.x0 > ax.get_window_extent().x1 for ax in axes[0])
    plt.close(fig)


def test_report_gives_each_run_one_colour_in_every_panel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run with no points in a panel (no memory figures) does not shift the colours of the runs after it
    there: the one legend names every panel's curves."""
    from rlsedit import report

    def run(name: str, memory: bool) -> dict:
        batch = {"edits_after": 2, "n_requests": 2, "timings": {"total": 1.0}}
        if memory:
            batch["memory"] = {"rss_bytes": 2**30}
        return {"_dir": str(tmp_path / name), "spec": {"method": "m"}, "partial": True, "batches": [batch]}

    colours: dict[str, list[str]] = {}
    real_save = report._save

    def keep(plt_: object, fig, path: Path, drawn: bool, written: list[Path]) -> None:
        if path.name == "stream.png":
            colours.update(
                {
                    ax.get_title(): [line.get_label() + ":" + str(line.get_color()) for line in ax.lines]
                    for ax in fig.axes
                }
            )
        real_save(plt_, fig, path, drawn, written)

    monkeypatch.setattr(report, "_save", keep)
    report._plot([run("a", memory=False), run("b", memory=True)], tmp_path)  # _save closes each figure
    timing, memory = colours.values()
    assert timing == ["a (m):C0", "b (m):C1"] and memory == ["b (m):C1"]


def test_final_scoring_resumes_after_its_last_saved_piece(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The post-edit scoring of a long stream is saved piece by piece: an interrupted one scores only the
    cases left, a torn last line is scored again, and a file of another editor state is not reused."""
    from rlsedit import measure as ex
    from rlsedit.datasets import load_counterfact

    model, tok = tiny_model("llama", seed=3)
    cases = load_counterfact(split="tune", limit=7)
    key = {"batches": 2, "last_hash": "abc", "active": 7}
    whole = ex.score(model, tok, cases, {cases[1].case_id}, "counterfact")
    real, calls = ex.records, []

    def counted(m: Any, t: Any, cs: list[Any], ds: str) -> list[dict[str, Any]]:
        calls.append([c.case_id for c in cs])
        if len(calls) == 3:
            raise KeyboardInterrupt  # stopped during the third piece
        return real(m, t, cs, ds)

    monkeypatch.setattr(ex, "records", counted)
    partial = tmp_path / "post.partial.jsonl"
    with pytest.raises(KeyboardInterrupt):
        ex.score_in_pieces(partial, model, tok, cases, {cases[1].case_id}, "counterfact", key, piece=2)
    assert len(partial.read_text().splitlines()) == 3  # the head and two pieces
    with partial.open("a") as f:
        f.write('{"records": [{"case_id"')  # a torn line: a crash while appending
    calls.clear()
    res = ex.score_in_pieces(partial, model, tok, cases, {cases[1].case_id}, "counterfact", key, piece=2)
    assert calls == [[c.case_id for c in cases[4:6]], [cases[6].case_id]]
    assert res["summary"] == whole["summary"] and res["superseded"] == whole["superseded"]
    assert [r["case_id"] for r in res["records"]] == [c.case_id for c in cases]
    for got, want in zip(res["records"], whole["records"], strict=True):  # padding differs with the pieces
        assert got.keys() == want.keys()
        for k, v in want.items():
            assert got[k] == (pytest.approx(v, rel=1e-4, abs=1e-5) if isinstance(v, list) else v), k
    calls.clear()
    ex.score_in_pieces(partial, model, tok, cases, set(), "counterfact", {**key, "batches": 3}, piece=4)
    assert len(calls) == 2  # another editor state: everything scored again


def _fake_run(name: str, method: str, mu: float, eff: list[float], ppl: list[float]) -> dict[str, Any]:
    """A results dict of a stream stopped at its last checkpoint (1,000 edits apart), with perplexity."""
    cps = [
        {"edits": 1000 * (k + 1), "summary": {"efficacy": e, "generalization": e - 10, "specificity": 60.0}}
        for k, e in enumerate(eff)
    ]
    cap = {
        "pre": {"perplexity": {"perplexity": 22.0}},
        "checkpoints": [
            {"edits": 1000 * (k + 1), "perplexity": {"perplexity": p}} for k, p in enumerate(ppl)
        ],
    }
    return {
        "_dir": f"/x/{name}",
        "spec": {"method": method, "targets": "static", "model": "m", "split": "sweep", "offset": 0},
        "config": {"mu": mu, "layers": [3, 4]},
        "partial": True,
        "edits": 1000 * len(eff),
        "checkpoints": cps,
        "pre": {"efficacy": 20.0, "generalization": 20.0, "specificity": 70.0},
        "post": {},
        "capability": cap,
    }


def test_frontier_table_and_figure(tmp_path: Path) -> None:
    from rlsedit.report import _plot_frontier, _pyplot, frontier_points, frontier_table

    runs = [
        _fake_run("a", "rlsedit", 31.6, [95, 90], [30.0, 45.0]),
        _fake_run("b", "rlsedit", 100.0, [80, 78], [24.0, 26.0]),
        _fake_run("c", "memit", 31.6, [70, 50], [200.0, 900.0]),
    ]
    assert [p[0] for p in frontier_points(runs[0])] == [0, 1000, 2000]
    table = frontier_table(runs, ["mu"])
    lines = table.strip().splitlines()
    assert len(lines) == 5  # header, rule, 3 runs
    # each run's last point, grouped by method and ordered by perplexity within it
    assert lines[2].startswith("| c | memit | static | mu=31.6 | 2000 | 50.0 | 40.0 | 60.0 | 900.0 |")
    assert lines[3].startswith("| b | rlsedit") and lines[4].startswith("| a | rlsedit")
    assert "1000: 95/30, 2000: 90/45" in lines[4]
    assert frontier_table([{**runs[0], "capability": {}}]) == ""
    plt = _pyplot()
    written: list[Path] = []
    _plot_frontier(plt, runs, tmp_path, written)
    assert written == [tmp_path / "frontier.png"] and written[0].stat().st_size > 0


def test_paired_runs_difference(monkeypatch: pytest.MonkeyPatch) -> None:
    """experiments/paired_runs.py: B - A over the cases both runs scored, with the normal interval."""
    mod = _script("paired_runs", monkeypatch)
    a = {1: {"efficacy": 1.0}, 2: {"efficacy": 0.0}, 3: {"efficacy": 1.0}, 4: {"efficacy": 1.0}}
    b = {1: {"efficacy": 1.0}, 2: {"efficacy": 1.0}, 3: {"efficacy": 0.0}, 4: {"efficacy": 1.0}, 5: {}}
    r = mod.paired(a, b, "efficacy")
    assert (r["n"], r["a"], r["b"], r["diff"]) == (4, 75.0, 75.0, 0.0)
    assert (r["b_better"], r["a_better"]) == (1, 1)
    assert r["ci95"] == pytest.approx(100 * 1.96 * (2 / 3) ** 0.5 / 2)
