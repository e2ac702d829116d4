"""Objective terms of RLSEdit (Figure 2): running sums against direct computation from the records, across
batches, retraction, save/load and a run saved without the running sums."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from rlsedit import EditRequest, load_editor, make_editor
from rlsedit.editors import RLSEditor
from rlsedit.eval.objective import objective_terms, objective_terms_from_records
from rlsedit.linalg import anchor_matrix
from tiny_models import SAMPLE_REQUESTS, TINY_DIMS, tiny_model

LAYERS = (1, 2)
D_K, D_V = TINY_DIMS["intermediate"], TINY_DIMS["hidden"]

REQUESTS = [EditRequest(*r) for r in SAMPLE_REQUESTS]


def _sigmas() -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for layer in LAYERS:
        X = torch.randn(D_K, 2 * D_K, generator=g, dtype=torch.float64)
        out[layer] = X @ X.T / (2 * D_K)
    return out


def _editor(**overrides: Any) -> RLSEditor:
    model, tok = tiny_model("llama", seed=0)
    settings: dict[str, Any] = {"layers": list(LAYERS), "n_templates": 0, "steps": 3, "lam": 1.0, "mu": 2.0}
    settings.update(overrides)
    return make_editor("rlsedit", model, tok, sigmas=_sigmas(), **settings)


def _naive(editor: RLSEditor) -> dict[int, dict[str, float]]:
    """Every term by the definitions, with explicit loops over the active requests."""
    out = {}
    cfg = editor.config
    for layer in LAYERS:
        W = editor._weights()[layer].detach().double()
        W0 = editor.W0[layer].double()
        S = editor.sigmas[layer].double()
        fit_total, n = 0.0, 0
        for b in editor.batches:
            rec = editor.load_record(b, layer)
            for j, a in enumerate(b["active"]):
                if a:
                    r = rec["K"][:, j].double() @ W - rec["V"][j].double()
                    fit_total += float(r @ r)
                    n += 1
        last = editor.batches[-1]
        rec = editor.load_record(last, layer)
        fit_batch = sum(
            float(((rec["K"][:, j].double() @ W - rec["V"][j].double()) ** 2).sum())
            for j, a in enumerate(last["active"])
            if a
        )
        D = W - W0
        anchor = float(torch.trace(D.T @ S @ D))
        dist = float(torch.trace(D.T @ D))
        out[layer] = {
            "fit_batch": fit_batch,
            "fit_total": fit_total,
            "dist_w0": dist,
            "anchor": anchor,
            "objective": fit_total + cfg.lam**2 * dist + cfg.mu**2 * anchor,
            "n_keys": n,
        }
    return out


def _assert_close(
    got: dict[int, dict[str, Any]], want: dict[int, dict[str, float]], rel: float = 1e-7
) -> None:
    for layer in LAYERS:
        for key, v in want[layer].items():
            assert got[layer][key] == pytest.approx(v, rel=rel, abs=1e-9), (layer, key)


def test_running_sums_match_direct_computation_over_batches() -> None:
    editor = _editor()
    seen_fit_batch = []
    for k in range(3):
        editor.edit(REQUESTS[2 * k : 2 * k + 2])
        terms = objective_terms(editor)
        assert all(t["source"] == "running sums" for t in terms.values())
        _assert_close(terms, _naive(editor))
        _assert_close(objective_terms_from_records(editor), _naive(editor))
        seen_fit_batch.append(terms[LAYERS[0]]["fit_batch"])
        for layer in LAYERS:
            st = editor.layer_state[layer]
            assert st["B"].shape == (D_K, D_V) and st["B"].dtype == torch.float64 and st["vv"].shape == (1,)
            # the cumulative fit contains the last batch's fit; every term is non-negative
            t = terms[layer]
            assert t["fit_total"] >= t["fit_batch"] - 1e-9 and min(t["dist_w0"], t["anchor"]) > 0
    assert terms[LAYERS[0]]["n_keys"] == 6
    # the editor's weights minimise J: the gradient A W - B - A_0 W_0 vanishes
    for layer in LAYERS:
        st = editor.layer_state[layer]
        W = editor._weights()[layer].detach().double()
        A0 = anchor_matrix(editor.sigmas[layer], editor.config.lam, editor.config.mu)
        grad = st["A"] @ W - st["B"] - A0 @ editor.W0[layer].double()
        assert float(grad.norm()) < 1e-4 * float((st["A"] @ W).norm())


def test_terms_follow_retraction_and_save_load(tmp_path: Path) -> None:
    editor = _editor()
    editor.edit(REQUESTS, batch_size=2)
    editor.retract(1, 0)  # one request of the middle batch
    editor.retract(2)  # the whole last batch: fit_batch of the last batch is then 0
    terms = objective_terms(editor)
    want = _naive(editor)
    _assert_close(terms, want)
    assert terms[LAYERS[0]]["n_keys"] == 3 and terms[LAYERS[0]]["fit_batch"] == 0.0
    editor.save(tmp_path / "run")
    model, tok = tiny_model("llama", seed=0)
    loaded = load_editor(tmp_path / "run", model, tok)
    for layer in LAYERS:
        for key in ("B", "vv"):
            assert torch.equal(loaded.layer_state[layer][key], editor.layer_state[layer][key])
    _assert_close(objective_terms(loaded), want)


def _migration_script() -> Any:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "migrate_runs.py"
    spec = importlib.util.spec_from_file_location("migrate_runs", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_run_saved_without_running_sums_is_refused_until_migrated(tmp_path: Path) -> None:
    """A run saved before the editor kept B and vv (editor format 1) is refused on load, naming the
    migration script; the migration computes B and vv from the records (the active requests: the same as
    the editor kept, up to the records' float32 rounding), the terms then match the naive ones, and the
    resumed editor edits and retracts."""
    from rlsedit.store import RESERVED_MANIFEST_KEYS, RunStore

    editor = _editor()
    editor.edit(REQUESTS[:4], batch_size=2)
    editor.retract(1, 0)  # one request of batch 1: the sums cover the active ones only
    run = tmp_path / "run"
    editor.save(run)
    store = RunStore(run)
    manifest = store.load_manifest()
    state = {name: store.load_state(name) for name in manifest["files"]}
    for group in state.values():
        group.pop("B", None)
        group.pop("vv", None)
    caller = {k: v for k, v in manifest.items() if k not in RESERVED_MANIFEST_KEYS}
    store.commit(state, {**caller, "kind": "rlsedit-editor/1"})
    model, tok = tiny_model("llama", seed=0)
    with pytest.raises(ValueError, match="migrate_runs"):
        load_editor(run, model, tok)
    migrate = _migration_script()
    assert migrate.migrate(run) == ["run directory"] and migrate.migrate(run) == []
    loaded = load_editor(run, model, tok)
    for layer in LAYERS:
        for key in ("B", "vv"):
            torch.testing.assert_close(
                loaded.layer_state[layer][key], editor.layer_state[layer][key], rtol=1e-5, atol=1e-6
            )
        assert torch.equal(loaded.layer_state[layer]["C"], editor.layer_state[layer]["C"])
    _assert_close(objective_terms(loaded), _naive(loaded))
    loaded.edit(REQUESTS[4:6])
    loaded.retract(0)
    _assert_close(objective_terms(loaded), _naive(loaded))


def test_only_for_rlsedit() -> None:
    model, tok = tiny_model("llama", seed=0)
    memit = make_editor("memit", model, tok, sigmas=_sigmas(), layers=list(LAYERS), n_templates=0)
    with pytest.raises(TypeError, match="rlsedit"):
        objective_terms(memit)
