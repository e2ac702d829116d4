"""The benchmark suite (``benchmarks/``) at tiny sizes: output structure, not timings.

The linear-algebra benchmarks run on synthetic keys (no model); the report is rendered through the CLI
with an even smaller scale than ``--quick``; the model benchmarks run once on a tiny random model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from rlsedit.linalg import nullspace_projector
from rlsedit.locate.targets import TargetConfig
from rlsedit.models.arch import get_module, mlp_out_name, weight_kv
from rlsedit.requests import EditRequest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import bench_linalg  # noqa: E402
import bench_model  # noqa: E402
import benchlib  # noqa: E402
import run as bench_run  # noqa: E402


def _positive(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_update_vs_history_structure() -> None:
    r = bench_linalg.bench_update_vs_history(24, 6, u=3, n_batches=5, repeats=2)
    assert [b["batch"] for b in r["batches"]] == [1, 2, 3, 4, 5]
    assert [b["edits_after"] for b in r["batches"]] == [3, 6, 9, 12, 15]
    assert [b["edits_before"] for b in r["batches"]] == [0, 3, 6, 9, 12]
    for b in r["batches"]:
        assert len(b["samples"]) == 2
        assert _positive(b["update_s"]) and _positive(b["a_update_s"])
    for key in ("first_s", "last_s", "ratio_last_first", "ratio_window", "drift_s", "a_update_s"):
        assert _positive(r[key]), key
    assert r["first_s"] == r["batches"][0]["update_s"]
    assert r["window"] == 1
    assert r["drift_amortised_s"] == pytest.approx(r["drift_s"] / r["drift_every"])
    # the carried C stays the inverse of the accumulated A: the timed updates are the real recursion
    assert r["drift"] < 1e-10
    json.dumps(r)
    # double buffering (C and A written into spares, as the editor does) follows the same recursion
    fresh = bench_linalg.bench_update_vs_history(24, 6, u=3, n_batches=5, repeats=1, double_buffer=False)
    assert fresh["drift"] == pytest.approx(r["drift"], abs=1e-12) and not fresh["double_buffer"]


def test_update_vs_resolve_structure_and_agreement() -> None:
    r = bench_linalg.bench_update_vs_resolve(40, 7, u=4, repeats=2)
    assert set(r["seconds"]) == {"rlsedit", "resolve", "alphaedit"}
    assert all(len(v) == 2 for v in r["samples"].values())
    assert all(_positive(v) for v in r["seconds"].values())
    assert set(r["ratios"]) == {"resolve/rlsedit", "alphaedit/rlsedit"}
    assert r["ratios"]["resolve/rlsedit"] == pytest.approx(r["seconds"]["resolve"] / r["seconds"]["rlsedit"])
    assert set(r["gflop"]) == set(r["gflops_rate"]) == {"rlsedit", "resolve", "alphaedit"}
    # RLSEdit's W_t and the re-solve's are the same minimiser
    assert r["agreement"] < 1e-8
    json.dumps(r)


def test_synthetic_projector_is_the_library_projector() -> None:
    prob = bench_linalg.SyntheticProblem(30, 5, 2)
    P, dim = nullspace_projector(torch.diag(prob.s), bench_linalg.NULLSPACE_THRESHOLD)
    torch.testing.assert_close(prob.projector(), P, atol=1e-12, rtol=0)
    assert int(prob.projector().diagonal().sum()) == dim
    torch.testing.assert_close(prob.initial_inverse() @ prob.anchor(), torch.eye(30, dtype=torch.float64))


def test_cli_writes_markdown_and_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = dataclasses.replace(
        bench_run.QUICK,
        u=3,
        dims=(
            bench_run.Dims("tiny-a", 16, 4, n_batches=12, history_repeats=1, resolve_repeats=1),
            bench_run.Dims("tiny-b", 24, 6, n_batches=2, history_repeats=1, resolve_repeats=1),
        ),
    )
    monkeypatch.setattr(bench_run, "QUICK", tiny)
    out = tmp_path / "B.md"
    argv = ["--quick", "--only", "update_vs_resolve,update_vs_history", "--out", str(out)]
    assert bench_run.main(argv) == 0
    md = out.read_text(encoding="utf-8")
    assert md.startswith("# rlsedit benchmarks")
    assert "## Machine" in md and "torch intra-op threads" in md and "CPU" in md
    # sections in the suite's order, each with the command that reproduces it
    assert md.index("## RLSEdit update time vs") < md.index("## RLSEdit update vs full re-solve")
    assert "Reproduce: `python benchmarks/run.py --quick --only update_vs_history --out " in md
    assert "Reproduce: `python benchmarks/run.py --quick --only update_vs_resolve --out " in md
    assert "re-solve / RLSEdit" in md and "last / first" in md
    data = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert data["quick"] is True
    assert [s["name"] for s in data["sections"]] == ["update_vs_history", "update_vs_resolve"]
    history = data["sections"][0]["data"]["runs"]
    assert [r["label"] for r in history] == ["tiny-a", "tiny-b"]
    assert len(history[0]["batches"]) == 12 and history[0]["window"] == 1
    resolve = data["sections"][1]["data"]["runs"]
    assert all(r["agreement"] < 1e-8 for r in resolve)
    # --update re-measures one section and keeps the other (tables included), in the suite's order
    kept_md = md[md.index("## RLSEdit update time vs") : md.index("## RLSEdit update vs full re-solve")]
    assert bench_run.main(["--quick", "--only", "update_vs_resolve", "--update", "--out", str(out)]) == 0
    md2 = out.read_text(encoding="utf-8")
    assert kept_md in md2 and "kept from an earlier run" in md2
    assert md2.index("## RLSEdit update time vs") < md2.index("## RLSEdit update vs full re-solve")
    data2 = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert [s["name"] for s in data2["sections"]] == ["update_vs_history", "update_vs_resolve"]
    assert data2["sections"][0] == data["sections"][0]
    assert set(data2["sections"][1]["measured"]) == {"measured", "at revision", "load average"}
    # without --update the file holds only what this run measured
    assert bench_run.main(["--quick", "--only", "update_vs_resolve", "--out", str(out)]) == 0
    assert "## RLSEdit update time vs" not in out.read_text(encoding="utf-8")


def test_cli_rejects_unknown_benchmark(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--only", "nope", "--out", str(tmp_path / "x.md")])


def test_table_and_formatting() -> None:
    t = benchlib.Table(["a", "b"], [["1", "2"]], caption="c")
    assert t.to_markdown().splitlines() == ["*c*", "", "| a | b |", "|---|---|", "| 1 | 2 |"]
    with pytest.raises(ValueError):
        benchlib.Table(["a"], [["1", "2"]]).to_markdown()
    assert benchlib.fmt_seconds(2e-6) == "2 us"
    assert benchlib.fmt_seconds(0.0123) == "12.3 ms"
    assert benchlib.fmt_seconds(12.34) == "12.3 s"
    assert benchlib.fmt_ratio(1.234) == "1.23x"
    assert benchlib.median([3.0, 1.0, 2.0]) == 2.0


def test_model_benchmarks_on_a_tiny_model(tiny_model_factory) -> None:
    model, tok = tiny_model_factory("llama")
    reqs = [
        EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English"),
        EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome"),
    ]
    r = bench_model.bench_targets(
        model,
        tok,
        reqs,
        1,
        ["", "The "],
        repeats=1,
        gflops=10.0,
        config=TargetConfig(steps=3, stop_nll=0.0),
        reference=TargetConfig(steps=6, stop_nll=0.0),
    )
    # another step rule, timed in turn: twice the steps
    ref = r["paths"]["reference"]
    assert ref["mean_steps"] == 6 and r["paths"]["fast"]["mean_steps"] == 3
    assert ref["tokens"]["block_bwd"] == 2 * r["paths"]["fast"]["tokens"]["block_bwd"]
    assert r["ratio_reference_fast"] == pytest.approx(ref["seconds"] / r["paths"]["fast"]["seconds"])
    fast, full = r["paths"]["fast"], r["paths"]["full"]
    assert fast["fast_path_ran"] and not full["fast_path_ran"]
    # the prefix cache means fewer token positions through the blocks, the same through the LM head
    assert 0 < fast["tokens"]["block_fwd"] < full["tokens"]["block_fwd"]
    assert fast["tokens"]["head_fwd"] == full["tokens"]["head_fwd"] > 0
    assert full["tokens"]["block_bwd"] > 0
    for p in (fast, full):
        assert p["flops"]["tight"] < p["flops"]["standard"]
        assert p["floor_s"]["standard"] == pytest.approx(p["flops"]["standard"] / 1e10)
    assert r["z_rel_diff"] < 1e-4 and r["z_rel_diff_no_skip"] < 1e-4
    # the layer skip: fewer block parameter-tokens forward than without it, the same backward
    no_skip = r["paths"]["fast_no_skip"]
    assert fast["skip_layers"] and not no_skip["skip_layers"]
    assert fast["tokens"]["block_param_tokens"] < no_skip["tokens"]["block_param_tokens"]
    assert fast["tokens"]["block_bwd"] == no_skip["tokens"]["block_bwd"]
    assert fast["flops"]["tight"] < no_skip["flops"]["tight"]

    before = {layer: weight_kv(get_module(model, mlp_out_name(model, layer))).clone() for layer in (0, 1)}
    sigmas = {layer: torch.eye(64, dtype=torch.float64) for layer in (0, 1)}
    e2e = bench_model.bench_end_to_end(
        model,
        tok,
        reqs,
        batch_size=1,
        layers=[0, 1],
        sigmas=sigmas,
        static=True,
        reference={"steps": 4, "stop_nll": 0.0},
    )
    # the reference step side by side: the same batches, its own target timings
    assert len(e2e["reference"]["batches"]) == 2 and e2e["reference"]["per_edit_median"]["targets"] > 0
    assert len(e2e["batches"]) == 2
    assert set(e2e["per_edit_median"]) == {"targets", "keys", "update", "save", "total"}
    # the static stream, side by side: the same batches, targets read (no optimisation in its timings)
    st = e2e["static"]
    assert len(st["batches"]) == 2 and st["fill_s"] > 0
    assert st["per_edit_median"]["targets"] < 0.1 * e2e["per_edit_median"]["targets"]
    # the first batch sees the unedited model in both protocols: the same targets, the same final NLL
    assert st["batches"][0]["target_nll_final"] == pytest.approx(
        e2e["batches"][0]["target_nll_final"], rel=1e-5
    )
    assert e2e["rss"]["stream_peak"] >= e2e["rss"]["stream_start"] > 0
    for layer, w in before.items():  # the edits were taken back
        torch.testing.assert_close(weight_kv(get_module(model, mlp_out_name(model, layer))), w)

    st = bench_model.bench_stats(model, tok, [0, 1], samples=3, repeats=1)
    assert st["tokens"] > 0
    assert set(st["tokens_per_s"]) == {"second_moments", "forward_full", "forward_to_last_layer"}
    assert all(_positive(v) for v in st["tokens_per_s"].values())


def test_scoring_benchmark_on_a_tiny_model(tiny_model_factory) -> None:
    from rlsedit.datasets import load_counterfact

    model, tok = tiny_model_factory("llama")
    r = bench_model.bench_scoring(model, tok, load_counterfact(split="tune", limit=4), repeats=1)
    assert r["pairs"] > 8 and r["logits_to_keep"]
    assert r["max_nll_diff"] < 1e-4 and r["top1_agree"] and r["win_flips"] == 0
    sorted_, plain = r["paths"]["sorted"], r["paths"]["plain"]
    assert 0 < sorted_["positions"] <= plain["positions"] == plain["head_positions"]
    assert sorted_["head_positions"] < sorted_["positions"]  # the LM head only where a target is predicted
    assert _positive(r["ratio_plain_sorted"]) and _positive(sorted_["per_case_s"])


def test_sizes_that_do_not_fit_in_memory_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = dataclasses.replace(
        bench_run.QUICK,
        u=2,
        dims=(bench_run.Dims("tiny", 8, 3, n_batches=2, history_repeats=1, resolve_repeats=1),),
    )
    monkeypatch.setattr(bench_run, "QUICK", tiny)
    monkeypatch.setattr(bench_run, "_available_bytes", lambda device: 1)
    out = tmp_path / "B.md"
    assert (
        bench_run.main(["--quick", "--only", "update_vs_history,update_vs_resolve", "--out", str(out)]) == 0
    )
    data = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    for sec in data["sections"]:
        assert sec["data"]["runs"] == []
        assert [s["label"] for s in sec["data"]["skipped"]] == ["tiny"]
    assert "**skipped**" in out.read_text(encoding="utf-8")


def test_gpu_scale_script_runs_quick_on_the_cpu(tmp_path: Path) -> None:
    """benchmarks/gpu_scale.py (the 8B-scale GPU benchmark) in --quick form on the CPU: one batch per
    method, the targets optimised once and shared, the update alone timed, the report written."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_scale.py"
    spec = importlib.util.spec_from_file_location("gpu_scale", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "G.md"
    argv = [
        "--quick",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--edits",
        "4",
        "--steps",
        "2",
        "--out",
        str(out),
    ]
    assert mod.main(argv) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert list(res["methods"]) == ["rlsedit", "memit", "alphaedit"]
    assert not res["methods"]["rlsedit"]["targets_shared"]
    assert res["methods"]["memit"]["targets_shared"] and res["methods"]["alphaedit"]["targets_shared"]
    for r in res["methods"].values():
        assert set(r["timings"]) >= {"targets", "keys", "update", "total"}
        assert r["residual_after"] < r["residual_before"]
    assert res["update_alone"]["d_k"] == 192 and res["update_alone"]["seconds"] > 0
    assert "| alphaedit |" in out.read_text()
