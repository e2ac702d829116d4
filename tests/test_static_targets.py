"""Static targets: `rlsedit targets` keeps each request's target optimised once on the unedited model, and
`rlsedit run --static-targets` reads them instead of optimising per batch; a store that does not fit the
run is refused before anything is written, naming what differs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlsedit import cli, commands, make_editor
from rlsedit.datasets import load_counterfact
from rlsedit.experiment import ExperimentSpec, run_experiment
from rlsedit.locate import compute_hidden
from rlsedit.locate import targets as targets_mod
from rlsedit.locate.provider import StaticTargetStore, TargetProvider, fill_static_targets
from rlsedit.locate.targets import compute_targets
from rlsedit.models.arch import mlp_out_name
from rlsedit.models.load import model_fingerprint
from test_experiment import SET_ARGS, SETTINGS, _script  # the tiny run settings (model_dir: conftest.py)
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def store_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Targets of tune cases 0-5 in two calls side by side in one folder (0-3 and 4-5), pieces of 2."""
    out = tmp_path_factory.mktemp("static") / "targets"
    base = ["targets", "--model", str(model_dir), "--split", "tune", "--piece", "2", "--out", str(out)]
    assert cli.main([*base, "--edits", "4", *SET_ARGS]) == 0
    assert cli.main([*base, "--edits", "2", "--offset", "4", *SET_ARGS]) == 0
    return out


def _editor(model_dir: Path, **overrides):
    from rlsedit.models.load import load_model

    model, tok = load_model(str(model_dir))
    return make_editor("rlsedit", model, tok, **{**SETTINGS, **overrides})


def test_store_holds_what_compute_targets_gives(store_dir: Path, model_dir: Path) -> None:
    store = StaticTargetStore(store_dir)
    assert [(a, b) for a, b, _ in store.pieces()] == [(0, 2), (2, 4), (4, 6)]
    assert store.done() == set(range(6))
    ed = _editor(model_dir)
    assert store.meta["settings"] == ed.target_settings()
    assert store.meta["model"]["fingerprint"] == model_fingerprint(ed.model)
    reqs = [c.request for c in load_counterfact(split="tune", limit=6)]
    got = store.read(reqs[2:4])
    ref = compute_targets(ed.model, ed.tokenizer, reqs[2:4], 3, ed.templates, ed.config.targets)
    torch.testing.assert_close(got.z, ref.z)
    torch.testing.assert_close(got.h0, ref.h0)
    v0 = compute_hidden(ed.model, ed.tokenizer, reqs[2:4], mlp_out_name(ed.model, 3))
    torch.testing.assert_close(got.v0, v0)
    assert float((got.h0 - got.v0).norm()) > 1e-3  # the residual stream the MLP output adds to
    assert torch.equal(got.steps, ref.steps)
    # in any order, across pieces
    both = store.read([reqs[5], reqs[0]])
    torch.testing.assert_close(both.z, torch.cat([store.read(reqs[5:6]).z, store.read(reqs[:1]).z]))


def test_a_second_call_computes_nothing(store_dir: Path, model_dir: Path, monkeypatch) -> None:
    store = StaticTargetStore(store_dir)
    ed = _editor(model_dir)
    reqs = [c.request for c in load_counterfact(split="tune", limit=6)]

    def boom(*a, **k):
        raise AssertionError("optimised again")

    monkeypatch.setattr("rlsedit.locate.provider.compute_targets", boom)
    res = fill_static_targets(
        store, ed.model, ed.tokenizer, reqs, range(6), 3, ed.templates, ed.config.targets, 2, False
    )
    assert res == {"computed": 0, "skipped": 6, "seconds": 0.0}


def test_editor_reads_static_targets_without_optimising(
    store_dir: Path, model_dir: Path, monkeypatch
) -> None:
    ed = _editor(model_dir)
    ed.use_targets(TargetProvider(static=store_dir))
    assert ed.targets_provider.protocol == "static"
    reqs = [c.request for c in load_counterfact(split="tune", limit=6)]

    def boom(*a, **k):
        raise AssertionError("optimised")

    monkeypatch.setattr("rlsedit.locate.provider.compute_targets", boom)
    monkeypatch.setattr(targets_mod, "compute_targets", boom)
    report = ed.edit(reqs[:3]).batches[0]
    assert report.targets_cached and report.target_nll_final >= 0
    assert report.residual_after < report.residual_before


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"layers": [1, 2]}, "last edited layer (store 3, editor 2)"),
        ({"kl_factor": 0.5}, "target setting kl_factor"),
        ({"weight_decay_form": "squared"}, "target setting weight_decay_form"),
        ({"n_templates": 2}, "context templates"),
        ({"n_contexts": 1}, "target setting n_contexts"),
        ({"init": "gradient"}, "target setting init"),
    ],
)
def test_a_store_of_other_settings_is_refused(
    store_dir: Path, model_dir: Path, overrides, named: str
) -> None:
    ed = _editor(model_dir, **overrides)
    with pytest.raises(ValueError, match="do not fit") as err:
        ed.use_targets(TargetProvider(static=store_dir))
    assert named in str(err.value)
    # the runtime knobs (how, not what) do not matter
    _editor(model_dir, chunk_rows=7, fast=False).use_targets(TargetProvider(static=store_dir))


def test_a_store_older_than_an_option_reads_as_its_default(
    store_dir: Path, model_dir: Path, tmp_path: Path
) -> None:
    """A store made before a target option existed has no entry for it: it was made with the option's
    default (options keep the earlier behaviour by default), so it fits an editor at the default and not
    one that sets it."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(store_dir, old)
    meta = json.loads((old / "meta.json").read_text())
    for k in ("init", "init_scale", "n_contexts"):
        del meta["settings"]["targets"][k]
    (old / "meta.json").write_text(json.dumps(meta))
    _editor(model_dir).use_targets(TargetProvider(static=old))
    with pytest.raises(ValueError, match="target setting n_contexts"):
        _editor(model_dir, n_contexts=1).use_targets(TargetProvider(static=old))


def test_another_model_and_missing_requests_are_refused(
    store_dir: Path, model_dir: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    model, tok = tiny_model("llama", seed=4)
    model.save_pretrained(other)
    tok.save_pretrained(other)
    ed = _editor(other)
    with pytest.raises(ValueError, match="the model") as err:
        ed.use_targets(TargetProvider(static=store_dir))
    assert "fingerprint" in str(err.value)
    store = StaticTargetStore(store_dir)
    reqs = [c.request for c in load_counterfact(split="tune", limit=8)]
    with pytest.raises(ValueError, match="2 of the 8 requests have no target"):
        store.check(_editor(model_dir).model, store.meta["settings"], reqs)
    store.check(_editor(model_dir).model, store.meta["settings"], reqs[:6])


def test_static_run_refuses_a_stream_beyond_the_store_before_writing(
    store_dir: Path, model_dir: Path, tmp_path
) -> None:
    out = tmp_path / "run"
    spec = ExperimentSpec(
        model=str(model_dir),
        split="tune",
        edits=8,
        batch_size=3,
        overrides=dict(SETTINGS),
        fluency=0,
        targets="static",
    )
    with pytest.raises(ValueError, match="2 of the 8 requests have no target"):
        run_experiment(spec, out, static_targets=store_dir)
    assert not out.exists()
    # a call that stops inside the store checks (and applies) only its own requests; one going further
    # is refused before it applies anything
    with pytest.raises(ValueError, match="2 of the 8 requests have no target"):
        run_experiment(spec, out, static_targets=store_dir, stop_after=7)  # the chunk ends at 9
    assert not out.exists()
    run_experiment(spec, out, static_targets=store_dir, stop_after=6)
    assert len(json.loads((out / "batches.json").read_text())) == 2
    with pytest.raises(ValueError, match="2 of the 8 requests have no target"):
        run_experiment(spec, out, static_targets=store_dir)
    assert len(json.loads((out / "batches.json").read_text())) == 2
    out = tmp_path / "run2"
    with pytest.raises(ValueError, match="static-target run needs"):
        run_experiment(
            ExperimentSpec(
                model=str(model_dir), split="tune", edits=3, overrides=dict(SETTINGS), targets="static"
            ),
            out,
        )
    with pytest.raises(ValueError, match="targets must be one of"):
        ExperimentSpec(targets="frozen")


def test_static_run_end_to_end(store_dir: Path, model_dir: Path, tmp_path: Path) -> None:
    """`rlsedit run --static-targets`: the spec and results say "static"; its batches apply the stored
    targets (each batch's residual is measured against them); a dynamic run of the same stream differs from
    the second batch on (its targets are optimised on the edited model)."""
    out = tmp_path / "static-run"
    argv = [
        "run",
        "--model",
        str(model_dir),
        "--split",
        "tune",
        "--edits",
        "6",
        "--batch-size",
        "3",
        "--fluency",
        "0",
    ]
    assert cli.main([*argv, "--static-targets", str(store_dir), "--out", str(out), *SET_ARGS]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["spec"]["targets"] == "static"
    batches = json.loads((out / "batches.json").read_text())
    assert all(b["targets_cached"] for b in batches)
    assert all(b["timings"]["targets"] < 1.0 for b in batches)
    dyn = tmp_path / "dynamic-run"
    assert cli.main([*argv, "--out", str(dyn), *SET_ARGS]) == 0
    dres = json.loads((dyn / "results.json").read_text())
    assert dres["spec"]["targets"] == "dynamic"
    dbatches = json.loads((dyn / "batches.json").read_text())
    # the first batch sees the unedited model in both protocols: the same targets
    assert batches[0]["target_nll_final"] == pytest.approx(dbatches[0]["target_nll_final"], rel=1e-4)
    # the second batch: the static run's are the stored ones (the unedited model's), the dynamic run's not
    stored = StaticTargetStore(store_dir).read(
        [c.request for c in load_counterfact(split="tune", limit=6)][3:]
    )
    assert batches[1]["target_nll_init"] == pytest.approx(float(stored.nll_init.mean()), rel=1e-6)
    assert abs(dbatches[1]["target_nll_init"] - batches[1]["target_nll_init"]) > 1e-4


def test_sweep_streams_share_one_store_and_report_the_frontier(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """experiments/sweep.py --stream: one static-target run per grid point on the sweep split, stopped at
    --stop-after, a frontier table over the points; a second call resumes (nothing re-applied)."""
    store = tmp_path / "targets"
    argv = ["targets", "--model", str(model_dir), "--split", "sweep", "--edits", "6", "--out", str(store)]
    assert cli.main([*argv, *SET_ARGS]) == 0
    mod = _script("sweep", monkeypatch)
    fixed = [a for k, v in SETTINGS.items() if k != "layers" for a in ("--set", f"{k}={json.dumps(v)}")]
    run = [
        "--stream", "--model", str(model_dir), "--static-targets", str(store), "--out", str(tmp_path / "sw"),
        "--edits", "6", "--batch-size", "2", "--eval-every", "2", "--checkpoint-cases", "2",
        "--stop-after", "4", "--grid", "mu=[1.0,10.0]", "--set", "layers=[2,3]", *fixed,
    ]  # fmt: skip
    assert mod.main(run) == 0
    runs = sorted((tmp_path / "sw" / "runs").iterdir())
    assert [r.name for r in runs] == ["rlsedit-mu1.0", "rlsedit-mu10.0"]
    for r in runs:
        spec_json = json.loads((r / "spec.json").read_text())
        assert spec_json["split"] == "sweep" and spec_json["targets"] == "static"
        assert len(json.loads((r / "batches.json").read_text())) == 2  # stopped after 4 edits
        assert sorted(p.name for p in (r / "checkpoints").iterdir()) == ["000002.json", "000004.json"]
    report = (tmp_path / "sw" / "report" / "REPORT.md").read_text()
    assert "The frontier" in report and "| static | mu=1.0 |" in report
    assert (tmp_path / "sw" / "report" / "frontier.png").stat().st_size > 0
    assert mod.main(run) == 0  # resumed: nothing more to do
    assert len(json.loads((runs[0] / "batches.json").read_text())) == 2


def test_a_named_step_rule_sets_the_target_settings(model_dir: Path, tmp_path: Path) -> None:
    """``--target-step NAME`` applies the rule's settings (``--set`` wins), and the store says so."""
    from rlsedit.locate.targets import FAST_STEP, STEP_RULES

    assert commands._overrides(["steps=2"], "fast") == {**FAST_STEP, "steps": 2}
    assert commands._overrides(None, "memit") == STEP_RULES["memit"]
    out = tmp_path / "fast"
    argv = ["targets", "--model", str(model_dir), "--split", "tune", "--edits", "2", "--out", str(out)]
    assert cli.main([*argv, *SET_ARGS, "--target-step", "fast"]) == 0
    stored = json.loads((out / "meta.json").read_text())["settings"]["targets"]
    assert {k: stored[k] for k in FAST_STEP if k != "steps"} == {
        k: v for k, v in FAST_STEP.items() if k != "steps"
    }
    assert stored["steps"] == SETTINGS["steps"]  # --set wins


def test_a_static_store_keeps_the_first_layer_keys(
    store_dir: Path, model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """The first edited layer's keys never change (nothing below or beside its projection is edited):
    kept beside the static targets, a stream reading them ends at the same weights as one computing them in
    every batch, and a second stream of the same requests computes none."""
    import shutil

    from rlsedit.models.arch import get_module, weight_kv

    store = tmp_path / "store"
    shutil.copytree(store_dir, store, ignore=shutil.ignore_patterns("keys"))  # kept by other tests
    reqs = [c.request for c in load_counterfact(split="tune", limit=6)]
    weights = {}
    for keep in (False, True):
        ed = _editor(model_dir)
        ed.use_targets(TargetProvider(static=store, keep_keys=keep))
        ed.edit(reqs, batch_size=2)
        weights[keep] = {n: weight_kv(get_module(ed.model, n)).detach().clone() for n in ed.edited_modules()}
    kept = sorted((store / "keys").glob("keys-*.safetensors"))
    assert len(kept) == 3  # one per batch
    for n, w in weights[True].items():
        torch.testing.assert_close(w, weights[False][n], rtol=1e-6, atol=1e-7)
    assert float(w.norm()) > 0

    first = SETTINGS["layers"][0]
    from rlsedit.locate import provider as provider_mod

    calls = []
    original = provider_mod.compute_keys

    def counting(*a, **k):
        calls.append(a[3])
        return original(*a, **k)

    monkeypatch.setattr(provider_mod, "compute_keys", counting)
    ed = _editor(model_dir)
    ed.use_targets(TargetProvider(static=store))
    ed.edit(reqs, batch_size=2)
    assert calls == []  # all three batches read their first-layer keys
    for n, w in weights[True].items():
        torch.testing.assert_close(weight_kv(get_module(ed.model, n)), w, rtol=1e-6, atol=1e-7)
    # another order of the requests is another batch: computed and kept
    ed = _editor(model_dir)
    ed.use_targets(TargetProvider(static=store))
    ed.edit(reqs[::-1][:2])
    assert calls == [ed.modules[first]]
