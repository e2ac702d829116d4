"""The command line end to end on a tiny model: edit, resume, retract, export (model and deltas)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlsedit import cli, commands
from rlsedit.editors import load_editor
from rlsedit.export import apply_deltas
from rlsedit.models.arch import get_module, weight_kv
from rlsedit.models.load import load_model
from tiny_models import tiny_model

SETS = {"layers": [2, 3], "n_templates": 0, "steps": 3, "stats_samples": 16, "stats_max_len": 32}
REQS = [
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"},
    {"prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": "piano", "target_true": "guitar"},
    {"prompt": "The capital of {} is", "subject": "Freedonia", "target_new": "Paris"},
    {"prompt": "{} was born in", "subject": "Ada Lovelace", "target_new": "Rome"},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    model, tok = tiny_model("llama", seed=5)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    reqs = root / "reqs.jsonl"
    reqs.write_text("".join(json.dumps(r) + "\n" for r in REQS))
    return {"root": root, "model": root / "model", "reqs": reqs, "stats": root / "stats"}


def _edit(s: dict[str, Path], run: Path, extra: list[str] | None = None) -> int:
    argv = ["edit", "--model", str(s["model"]), "--requests", str(s["reqs"]), "--run", str(run)]
    argv += ["--batch-size", "2", "--stats", str(s["stats"])]
    for k, v in SETS.items():
        argv += ["--set", f"{k}={json.dumps(v)}"]
    return cli.main(argv + (extra or []))


def _weights(model) -> dict[str, torch.Tensor]:
    return {f"l{i}": weight_kv(get_module(model, f"model.layers.{i}.mlp.down_proj")).clone() for i in (2, 3)}


def test_edit_resume_retract_export(setup: dict[str, Path], tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert _edit(setup, run) == 0
    assert "applied 4 request(s) in 2 batch(es)" in capsys.readouterr().out
    manifest = json.loads((run / "manifest.json").read_text())
    assert [b["id"] for b in manifest["batches"]] == [0, 1]

    # resuming the same command applies nothing again
    assert _edit(setup, run) == 0
    assert "applied 0 request(s) in 0 batch(es); 2 batch(es) were already" in capsys.readouterr().out

    base, tok = load_model(str(setup["model"]))
    w0 = _weights(base)
    edited_model, _ = load_model(str(setup["model"]))
    load_editor(run, edited_model, tok, attach=False)
    w_edit = _weights(edited_model)
    assert any(not torch.equal(w0[k], w_edit[k]) for k in w0)

    # export: the HF checkpoint has the edited weights; the deltas apply to the base model and come off again
    out = tmp_path / "export"
    assert cli.main(["export", "--model", str(setup["model"]), "--run", str(run), "--out", str(out)]) == 0
    exported = AutoModelForCausalLM.from_pretrained(out / "model")
    for k, w in _weights(exported).items():
        torch.testing.assert_close(w, w_edit[k])
    names = apply_deltas(base, out / "deltas")
    assert names == sorted(["model.layers.2.mlp.down_proj", "model.layers.3.mlp.down_proj"])
    for k, w in _weights(base).items():
        torch.testing.assert_close(w, w_edit[k], rtol=0, atol=1e-6)
    apply_deltas(base, out / "deltas", sign=-1.0)
    for k, w in _weights(base).items():
        torch.testing.assert_close(w, w0[k], rtol=0, atol=1e-6)

    # retract batch 0 from the command line; batch 1 stays
    assert cli.main(["retract", "--model", str(setup["model"]), "--run", str(run), "--batch", "0"]) == 0
    assert "retracted batch 0" in capsys.readouterr().out
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["batches"][0]["active"] == [0, 0] and manifest["batches"][1]["active"] == [1, 1]
    after, _ = load_model(str(setup["model"]))
    load_editor(run, after, tok, attach=False)
    assert any(not torch.equal(w_edit[k], w) for k, w in _weights(after).items())


def test_export_loads_and_applies_without_rlsedit(setup: dict[str, Path], tmp_path: Path) -> None:
    """In a fresh interpreter where rlsedit cannot be imported: the exported checkpoint loads with plain
    AutoModelForCausalLM.from_pretrained, and the README's three-line snippet applies
    weight_deltas.safetensors to the unedited model; both give the edited weights."""
    import subprocess
    import sys

    run = tmp_path / "run"
    assert _edit(setup, run) == 0
    out = tmp_path / "export"
    assert cli.main(["export", "--model", str(setup["model"]), "--run", str(run), "--out", str(out)]) == 0
    edited, tok = load_model(str(setup["model"]))
    load_editor(run, edited, tok, attach=False)
    expected = {n: p.detach().clone() for n, p in edited.named_parameters() if "mlp.down_proj" in n}
    torch.save(expected, tmp_path / "expected.pt")
    code = f"""
import sys
sys.modules["rlsedit"] = None  # rlsedit is not importable here
try:
    import rlsedit  # noqa
    raise SystemExit("rlsedit was importable")
except ImportError:
    pass
import torch
from transformers import AutoModelForCausalLM
expected = torch.load({str(tmp_path / "expected.pt")!r})
exported = AutoModelForCausalLM.from_pretrained({str(out / "model")!r})
model = AutoModelForCausalLM.from_pretrained({str(setup["model"])!r})
from safetensors.torch import load_file
for name, delta in load_file({str(out / "deltas" / "weight_deltas.safetensors")!r}).items():
    model.get_parameter(name).data += delta.to(model.get_parameter(name).dtype)
for m in (exported, model):
    params = dict(m.named_parameters())
    for k, w in expected.items():
        torch.testing.assert_close(params[k].detach(), w, rtol=0, atol=1e-6)
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("ok")


def test_deltas_refuse_a_model_they_do_not_fit(setup: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert _edit(setup, run) == 0
    out = tmp_path / "export"
    argv = ["export", "--model", str(setup["model"]), "--run", str(run), "--out", str(out), "--deltas-only"]
    assert cli.main(argv) == 0
    assert not (out / "model").exists()
    other, _ = tiny_model("llama", seed=5, intermediate_size=48)
    before = {n: p.clone() for n, p in other.named_parameters()}
    with pytest.raises(ValueError, match="does not fit"):
        apply_deltas(other, out / "deltas")
    assert all(torch.equal(before[n], p) for n, p in other.named_parameters())


def test_help_and_methods(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    assert "edit" in capsys.readouterr().out
    assert cli.main(["methods"]) == 0
    assert set(capsys.readouterr().out.split()) >= {"rlsedit", "memit", "alphaedit", "rome", "ft"}


def test_bad_names_and_missing_runs_are_refused_before_the_model_loads(
    setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded for input refused anyway")

    monkeypatch.setattr(commands, "_load", no_model)
    run = tmp_path / "run"
    assert _edit(setup, run, ["--method", "memitt"]) == 1  # ValueError: unknown editor, closest names
    assert _edit(setup, run, ["--set", "stepz=3"]) == 1  # ValueError: unknown option
    assert not run.exists()
    for argv in (
        ["retract", "--run", str(run), "--batch", "0"],
        ["export", "--run", str(run), "--out", str(tmp_path / "exp")],
        ["eval", "--run", str(run)],
    ):
        with pytest.raises(SystemExit, match="holds no saved editor"):
            cli.main(argv)
    (run / "editor").mkdir(parents=True)  # an experiment folder: read by eval / export, not retracted from
    (run / "editor" / "manifest.json").write_text("{}")
    with pytest.raises(SystemExit, match="experiment folder"):
        cli.main(["retract", "--run", str(run), "--batch", "0"])
    (run / "spec.json").write_text("{}")
    with pytest.raises(SystemExit, match="experiment folder"):
        _edit(setup, run)
    assert sorted(p.name for p in run.iterdir()) == ["editor", "spec.json"]
    with pytest.raises(SystemExit) as exc:  # argparse: not a list of layer indices
        cli.main(["stats", "--model", str(setup["model"]), "--layers", "2,abc"])
    assert exc.value.code == 2


def test_stats_refuses_a_layer_the_model_lacks(setup: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "stats"
    argv = ["stats", "--model", str(setup["model"]), "--layers", "2,99", "--out", str(out)]
    assert cli.main(argv) == 1
    assert "layer 99 out of range" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
