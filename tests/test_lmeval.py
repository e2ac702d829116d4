"""lm-evaluation-harness as a scorer of general ability: the bundled tasks load offline from the shipped
definitions, score the same items and prompts as our own zero-shot code (and agree with it), and
`rlsedit eval --lm-eval` / `rlsedit run --lm-eval` store the harness's results beside ours."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlsedit import cli
from rlsedit.eval.capability import CapabilityConfig, evaluate_capability, task_items, zero_shot_accuracy
from rlsedit.eval.lmeval import BUNDLED_TASKS_DIR, harness_available, lm_eval_accuracy
from test_cli import _edit, setup  # noqa: F401 - the fixture: a tiny model and a 4-request edit file
from tiny_models import tiny_model

pytestmark = pytest.mark.skipif(not harness_available(), reason="lm-eval is not installed")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: the bundled tasks must not reach for a hub."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")


def test_the_bundled_tasks_are_harness_task_files() -> None:
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(BUNDLED_TASKS_DIR), include_defaults=False)
    assert manager.all_tasks == [f"rlsedit_{t}" for t in ("cola", "mmlu", "mrpc", "rte", "sst2")]
    assert sorted(p.name for p in BUNDLED_TASKS_DIR.glob("*.yaml")) == [
        f"rlsedit_{t}.yaml" for t in ("cola", "mmlu", "mrpc", "rte", "sst2")
    ]


def test_harness_and_our_code_agree_on_the_same_items() -> None:
    """Same items, prompts and label words: the same prediction for every item (tasks whose prompts fit the
    tiny model's 128-token context; past it the two cut prompts differently: ours keeps prompt and label
    within the context, the harness feeds the last 128 tokens of prompt and label)."""
    model, tok = tiny_model("llama", seed=3)
    tasks = ("sst2", "cola", "rte")
    theirs = lm_eval_accuracy(model, tok, tasks, n_items=12, seed=1)
    for task in tasks:
        ours = zero_shot_accuracy(model, tok, task, n_items=12, seed=1)
        assert theirs[task]["backend"] == "lm-eval" and ours["backend"] == "rlsedit"
        assert theirs[task]["n"] == ours["n"] == len(task_items(task, 12, 1)) == 12
        for key in ("accuracy", "correct", "predicted", "labels", "chance", "ci95"):
            assert theirs[task][key] == ours[key], (task, key)
    with pytest.raises(ValueError, match="not bundled"):
        lm_eval_accuracy(model, tok, ["hellaswag"])


def test_capability_backends() -> None:
    model, tok = tiny_model("llama", seed=3)
    cfg = {"tasks": ["sst2"], "n_items": 6, "perplexity": False}
    harness = evaluate_capability(model, tok, {**cfg, "backend": "lm-eval"})
    ours = evaluate_capability(model, tok, {**cfg, "backend": "rlsedit"})
    assert harness["sst2"]["backend"] == "lm-eval" and ours["sst2"]["backend"] == "rlsedit"
    assert harness["sst2"]["predicted"] == ours["sst2"]["predicted"]
    assert CapabilityConfig().zero_shot_backend() == "lm-eval"  # installed here: the default
    with pytest.raises(ValueError, match="backend must be"):
        CapabilityConfig(backend="harness")


def test_eval_and_run_store_the_harness_results(
    setup: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    capsys,
) -> None:
    run = tmp_path / "run"
    assert _edit(setup, run) == 0
    out = tmp_path / "eval.json"
    argv = ["eval", "--run", str(run), "--lm-eval", "sst2,rte", "--capability-items", "4", "--out", str(out)]
    assert cli.main(argv) == 0
    assert "sst2 lm-eval" in capsys.readouterr().out
    cap = json.loads(out.read_text())["capability"]
    assert cap["config"]["backend"] == "lm-eval" and cap["config"]["tasks"] == ["sst2", "rte"]
    assert "perplexity" not in cap
    assert {cap[t]["backend"] for t in ("sst2", "rte")} == {"lm-eval"}
    assert cap["sst2"]["n"] == 4

    exp = tmp_path / "exp"
    argv = ["run", "--model", str(setup["model"]), "--split", "tune", "--edits", "2", "--batch-size", "2"]
    argv += ["--out", str(exp), "--stats", str(setup["stats"]), "--fluency", "0", "--lm-eval", "cola"]
    argv += ["--capability-items", "4", "--set", "layers=[2,3]", "--set", "steps=2", "--set", "n_templates=1"]
    assert cli.main(argv) == 0
    res = json.loads((exp / "results.json").read_text())
    for when in ("pre", "post"):
        assert res["capability"][when]["cola"]["backend"] == "lm-eval"


def test_harness_named_tasks_run_with_the_harness_results() -> None:
    """`lm_eval` names tasks as the harness registers them (ours too, as rlsedit_<task>); their results
    are the harness's own, per task."""
    model, tok = tiny_model("llama", seed=3)
    cap = evaluate_capability(
        model, tok, {"tasks": [], "perplexity": False, "lm_eval": ["rlsedit_rte"], "lm_eval_limit": 6}
    )
    r = cap["lm_eval"]["results"]["rlsedit_rte"]
    assert 0.0 <= r["acc,none"] <= 1.0 and cap["lm_eval"]["harness"]
    assert r["sample_len"] == 6
