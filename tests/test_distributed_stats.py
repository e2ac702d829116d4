"""Second-moment statistics beyond one process: ``rlsedit stats`` under ``torchrun`` (2 CPU ranks, gloo on
loopback) equals the single-process result, and editors use a folder written by ``rlsedit stats --out``
without computing anything.

The model is a tiny random Llama saved to a temporary directory and loaded in float64 by every process, so
the only difference between the runs is the order of the float64 sums (texts are sharded ``rank::2`` and
batched differently).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny_models
from rlsedit import make_editor
from rlsedit.cli import main
from rlsedit.models.arch import mlp_out_name
from rlsedit.models.load import load_model, model_fingerprint
from rlsedit.store import load_tensors

LAYERS = [1, 2]
SAMPLES = 13  # odd: the two ranks get 7 and 6 texts
MAX_LEN = 24
TEXTS = [
    "The Eiffel Tower is located in the city of Paris, France.",
    "Michael Jordan plays the sport of basketball.",
    "In 1925, the author was born in London, England, and later worked for the BBC as a journalist.",
    "The official language of Italy is Italian.",
    "What is the twin city of Lyon? It is Beirut.",
    "Apple A5 was created by Google.",
    "Q: Who developed the iPhone? A: Apple.",
    "Toko Yasuda produces the most amazing music on the piano, and the guitar, and the bass, every day.",
    "the of and to in is was for on that with as by at from his her it an be this which or are",
    "Autonomous University of Madrid, which is located in Spain.",
    "0 1 2 3 4 5 6 7 8 9 10 100 2024",
    "The mother tongue of Danielle Darrieux is French.",
    "Lionel Messi is a professional soccer player.",
    "This line is beyond the sample count and must not be used.",
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama and its tokenizer saved to a folder, and a text corpus file."""
    root = tmp_path_factory.mktemp("dist")
    model, tok = tiny_models.tiny_model("llama", seed=4)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    return {"root": root, "model": root / "model", "corpus": corpus}


def _stats_args(saved: dict[str, Path], out: Path) -> list[str]:
    return [
        "stats",
        "--model",
        str(saved["model"]),
        "--dtype",
        "float64",
        "--layers",
        ",".join(map(str, LAYERS)),
        "--samples",
        str(SAMPLES),
        "--max-len",
        str(MAX_LEN),
        "--batch-size",
        "3",
        "--corpus",
        str(saved["corpus"]),
        "--out",
        str(out),
    ]


def _stats_folder(out: Path, model: torch.nn.Module) -> Path:
    folders = list((out / model_fingerprint(model)).iterdir())
    assert len(folders) == 1, folders
    return folders[0]


@pytest.fixture(scope="module")
def single(saved: dict[str, Path]) -> dict[str, object]:
    """``rlsedit stats`` in this process (no torch.distributed): its folder, the model and tokenizer."""
    out = saved["root"] / "single"
    assert main(_stats_args(saved, out)) == 0
    model, tok = load_model(saved["model"], dtype="float64")
    return {"out": out, "model": model, "tok": tok, "folder": _stats_folder(out, model)}


def test_torchrun_two_cpu_ranks_equal_single_process(
    saved: dict[str, Path], single: dict[str, object]
) -> None:
    out = saved["root"] / "torchrun"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--nnodes",
        "1",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "rlsedit",
        *_stats_args(saved, out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 1 of 2 (gloo" in proc.stderr
    assert proc.stdout.count("d_k=64") == len(LAYERS)  # only rank 0 prints

    model = single["model"]
    folder = _stats_folder(out, model)
    ref_folder = single["folder"]
    assert folder.name == ref_folder.name
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{mlp_out_name(model, layer)}.safetensors" for layer in LAYERS
    )  # rank 0 wrote the moments; no rank left a partial file
    n_tokens = sum(
        min(len(single["tok"](t)["input_ids"]), MAX_LEN) for t in TEXTS[:SAMPLES]
    )  # every non-padding token of the first SAMPLES texts
    worst = 0.0
    for layer in LAYERS:
        name = mlp_out_name(model, layer)
        dist = load_tensors(folder / f"{name}.safetensors")
        ref = load_tensors(ref_folder / f"{name}.safetensors")
        assert int(dist["count"]) == int(ref["count"]) == n_tokens
        assert dist["sum"].dtype == torch.float64 and dist["sum"].shape == (64, 64)
        scale = float(ref["sum"].abs().max())
        worst = max(worst, float((dist["sum"] - ref["sum"]).abs().max()) / scale)
    logging.getLogger(__name__).info("torchrun vs single process: max relative difference %.3g", worst)
    assert worst < 1e-12, worst


def test_single_process_cli_matches_second_moments(single: dict[str, object], saved: dict[str, Path]) -> None:
    from rlsedit.stats import second_moments

    model, tok = single["model"], single["tok"]
    names = [mlp_out_name(model, layer) for layer in LAYERS]
    direct = second_moments(
        model, tok, names, samples=SAMPLES, corpus=saved["corpus"], max_len=MAX_LEN, use_cache=False
    )
    for name in names:
        t = load_tensors(single["folder"] / f"{name}.safetensors")
        torch.testing.assert_close(t["sum"] / float(t["count"]), direct[name], rtol=1e-12, atol=1e-14)


def _no_recompute(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> int:
        raise AssertionError("the statistics were computed again")

    monkeypatch.setattr("rlsedit.stats._accumulate", refuse)


FAST = {"n_templates": 0, "steps": 3, "kl_factor": 0.0, "weight_decay": 0.0}


@pytest.mark.parametrize("method", ["rlsedit", "memit"])
def test_editor_reads_precomputed_folder(
    method: str, single: dict[str, object], saved: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_recompute(monkeypatch)
    model, tok = load_model(saved["model"], dtype="float64")
    editor = make_editor(
        method,
        model,
        tok,
        stats_dir=single["out"],
        layers=LAYERS,
        stats_samples=SAMPLES,
        stats_max_len=MAX_LEN,
        stats_corpus=str(saved["corpus"]),
        **FAST,
    )
    for layer in LAYERS:
        t = load_tensors(single["folder"] / f"{mlp_out_name(model, layer)}.safetensors")
        torch.testing.assert_close(editor.sigmas[layer], t["sum"] / float(t["count"]), rtol=0, atol=0)


def test_editor_warns_about_other_settings(
    single: dict[str, object], saved: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    model, tok = load_model(saved["model"], dtype="float64")
    with caplog.at_level(logging.WARNING, logger="rlsedit"):
        make_editor(
            "memit",
            model,
            tok,
            stats_dir=single["out"],
            layers=LAYERS,
            stats_samples=SAMPLES - 1,  # not what the folder holds: computed anew, with a warning
            stats_max_len=MAX_LEN,
            stats_corpus=str(saved["corpus"]),
            **FAST,
        )
    assert f"stats_samples={SAMPLES}, stats_max_len={MAX_LEN}" in caplog.text
    assert "computing new ones" in caplog.text


def test_cli_edit_with_stats_folder(
    single: dict[str, object], saved: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_recompute(monkeypatch)
    requests = tmp_path / "requests.jsonl"
    record = {"prompt": "The mother tongue of {}", "subject": "Danielle Darrieux", "target_new": "English"}
    requests.write_text(json.dumps(record) + "\n", encoding="utf-8")
    settings = {
        "layers": LAYERS,
        "stats_samples": SAMPLES,
        "stats_max_len": MAX_LEN,
        "stats_corpus": str(saved["corpus"]),
        **FAST,
    }
    args = ["edit", "--model", str(saved["model"]), "--dtype", "float64", "--method", "rlsedit"]
    args += ["--requests", str(requests), "--run", str(tmp_path / "run"), "--stats", str(single["out"])]
    for key, value in settings.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    assert main(args) == 0
    assert (tmp_path / "run").is_dir()


def test_editor_warns_about_another_dtype(
    single: dict[str, object], saved: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Statistics of the float64 model do not serve the float32 one (the fingerprint holds the dtype)."""
    model, tok = load_model(saved["model"], dtype="float32")
    with caplog.at_level(logging.WARNING, logger="rlsedit"):
        make_editor(
            "memit",
            model,
            tok,
            stats_dir=single["out"],
            layers=LAYERS,
            stats_samples=SAMPLES,
            stats_max_len=MAX_LEN,
            stats_corpus=str(saved["corpus"]),
            **FAST,
        )
    assert "holds no statistics of this model" in caplog.text and "--dtype" in caplog.text


def test_interrupted_statistics_resume(saved: dict[str, Path], tmp_path: Path) -> None:
    """A run killed after a checkpoint resumes from it and ends with the uninterrupted result."""
    from rlsedit.stats import second_moments

    model, tok = load_model(saved["model"], dtype="float64")
    names = [mlp_out_name(model, layer) for layer in LAYERS]
    common = {"samples": SAMPLES, "corpus": saved["corpus"], "max_len": MAX_LEN, "batch_size": 2}
    calls = {"n": 0}

    def failing_tok(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return tok(*args, **kwargs)

    failing_tok.pad_token_id = tok.pad_token_id  # type: ignore[attr-defined]
    kw = {"cache_dir": tmp_path, "checkpoint_every": 2, "checkpoint_seconds": 0.0, "progress": False}
    with pytest.raises(KeyboardInterrupt):
        second_moments(model, failing_tok, names, **common, **kw)
    partials = list(tmp_path.rglob("partial-rank0of1.safetensors"))
    assert len(partials) == 1 and int(load_tensors(partials[0])["done"]) == 8
    resumed = second_moments(model, tok, names, **common, **kw)
    assert not list(tmp_path.rglob("partial-*"))
    direct = second_moments(model, tok, names, **common, use_cache=False, progress=False)
    for name in names:
        torch.testing.assert_close(resumed[name], direct[name], rtol=1e-12, atol=1e-14)
