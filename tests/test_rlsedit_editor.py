"""RLSEditor on tiny random models: exact algebra against the closed-form minimiser, retraction,
supersede, save/load, drift control, refused architectures and config overrides.

The target optimisation of a tiny random model barely moves its predictions, but that does not matter
here: every check compares the edited weights with the minimiser of the objective computed directly
from the keys and targets the editor recorded,

    J(W) = sum_s ||K_s^T W - V_s||^2 + lam^2 ||W - W0||^2 + mu^2 tr((W - W0)^T Sigma (W - W0)),

i.e. ``W* = A^{-1} ((lam^2 I + mu^2 Sigma) W0 + sum_s K_s V_s)`` with
``A = lam^2 I + mu^2 Sigma + sum_s K_s K_s^T``. Errors are measured relative to the size of the edit,
``||W - W*|| / ||W* - W0||`` (the model weight is float32, so about 1e-6 is expected).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch

from rlsedit import EditRequest, load_editor, make_editor
from rlsedit.editors import EditError, RLSEditor
from rlsedit.linalg import RetractionError, drift, reinvert
from rlsedit.models.arch import get_arch
from tiny_models import SAMPLE_REQUESTS, TINY_DIMS, tiny_model

log = logging.getLogger(__name__)

LAYERS = (1, 2)
D_K = TINY_DIMS["intermediate"]
#: Tolerance on ``||W - W*|| / ||W* - W0||`` (float32 weights: 2e-7 to 7e-7 measured).
TOL_W = 1e-5
#: Tolerance on ``||C A - I||_F / sqrt(d)`` for a float64 state.
TOL_C = 1e-9

REQUESTS = [EditRequest(*r) for r in SAMPLE_REQUESTS]


# ----------------------------------------------------------------------------------------------------------
# helpers


def _sigmas(seed: int = 0) -> dict[int, torch.Tensor]:
    """A random, well-conditioned SPD ``Sigma`` per edited layer (skips computing statistics)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in LAYERS:
        X = torch.randn(D_K, 2 * D_K, generator=g, dtype=torch.float64)
        out[layer] = X @ X.T / (2 * D_K)
    return out


def _editor(seed: int = 0, **overrides: Any) -> RLSEditor:
    """A fresh tiny llama (``seed``) and an RLSEditor on layers 1 and 2 with fast settings."""
    model, tok = tiny_model("llama", seed=seed)
    settings: dict[str, Any] = {
        "layers": list(LAYERS),
        "n_templates": 0,
        "steps": 3,
        "lam": 1.0,
        "mu": 1.0,
    }
    settings.update(overrides)
    return make_editor("rlsedit", model, tok, sigmas=_sigmas(), **settings)


def _direct(
    editor: RLSEditor, layer: int, skip: Iterable[tuple[int, int]] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """The closed-form minimiser ``W*`` and ``A`` from the recorded keys and targets (float64).

    Every active request of every batch is included except those in ``skip`` (``(batch_id, index)``).
    """
    skip = set(skip)
    cfg = editor.config
    sigma = editor.sigmas[layer].to(torch.float64)
    W0 = editor.W0[layer].to(torch.float64)
    # mu_t^2: the configured mu^2 unless a growing anchor raised it
    A = editor.anchor_mu2(layer) * sigma + cfg.lam**2 * torch.eye(sigma.shape[0], dtype=torch.float64)
    B = A @ W0
    for b in editor.batches:
        cols = [j for j, a in enumerate(b["active"]) if a and (b["id"], j) not in skip]
        if not cols:
            continue
        rec = editor.load_record(b, layer)
        K = rec["K"][:, cols].to(torch.float64)
        V = rec["V"][cols].to(torch.float64)
        A = A + K @ K.T
        B = B + K @ V
    return torch.linalg.solve(A, B), A


def _weight(editor: RLSEditor, layer: int) -> torch.Tensor:
    """The current edited weight ``W`` (d_k, d_v) as float64."""
    return editor._weights()[layer].detach().to(torch.float64).cpu()


def _rel_err(editor: RLSEditor, layer: int, W_star: torch.Tensor) -> float:
    """``||W - W*|| / ||W* - W0||``: the error relative to the size of the edit."""
    W = _weight(editor, layer)
    edit = (W_star - editor.W0[layer].to(torch.float64)).norm()
    assert float(edit) > 1e-3, "the edit is too small for the comparison to mean anything"
    return float((W - W_star).norm() / edit)


def _inv_err(C: torch.Tensor, A: torch.Tensor) -> float:
    """``||C A - I||_F / sqrt(d)``."""
    return drift(C, A)


def _check_minimiser(editor: RLSEditor, skip: Iterable[tuple[int, int]] = (), what: str = "") -> None:
    """Assert that every edited layer holds the minimiser and ``C = A^{-1}`` for the active requests."""
    skip = list(skip)
    for layer in LAYERS:
        W_star, A = _direct(editor, layer, skip)
        st = editor.layer_state[layer]
        err_w = _rel_err(editor, layer, W_star)
        err_a = float((st["A"] - A).norm() / A.norm())
        err_c = _inv_err(st["C"], A)
        log.info("%s layer %d: W vs W* %.2e, A %.2e, C A - I %.2e", what, layer, err_w, err_a, err_c)
        assert err_w < TOL_W, f"{what} layer {layer}: ||W - W*|| / ||W* - W0|| = {err_w:.3e}"
        assert err_a < 1e-12, f"{what} layer {layer}: stored A differs from the direct A ({err_a:.3e})"
        assert err_c < TOL_C, f"{what} layer {layer}: ||C A - I|| = {err_c:.3e}"


def _snapshot(editor: RLSEditor) -> dict[str, Any]:
    """Copies of the weights, state and batch flags (to check that a failure changed nothing)."""
    return {
        "weights": {layer: w.detach().clone() for layer, w in editor._weights().items()},
        "state": {layer: {k: v.clone() for k, v in st.items()} for layer, st in editor.layer_state.items()},
        "active": [list(b["active"]) for b in editor.batches],
    }


def _assert_unchanged(editor: RLSEditor, snap: dict[str, Any]) -> None:
    for layer, w in editor._weights().items():
        assert torch.equal(w.detach(), snap["weights"][layer]), f"layer {layer}: weight changed"
    for layer, st in editor.layer_state.items():
        assert st.keys() == snap["state"][layer].keys()
        for k, v in st.items():
            assert torch.equal(v, snap["state"][layer][k]), f"layer {layer}: state {k} changed"
    assert [list(b["active"]) for b in editor.batches] == snap["active"]


# ----------------------------------------------------------------------------------------------------------
# 1. the recursion equals the closed-form minimiser


def test_weights_equal_closed_form_minimiser() -> None:
    """After three batches each layer holds the closed-form minimiser and ``C = A^{-1}``."""
    editor = _editor()
    report = editor.edit(REQUESTS, batch_size=2)
    assert len(report.batches) == 3 and len(editor.batches) == 3
    for b in editor.batches:
        for layer in LAYERS:
            rec = editor.load_record(b, layer)
            assert rec["K"].shape == (D_K, 2) and rec["K"].dtype == torch.float32
            assert rec["V"].shape == (2, TINY_DIMS["hidden"]) and rec["V"].dtype == torch.float32
    for layer in LAYERS:
        st = editor.layer_state[layer]
        assert st["C"].dtype == torch.float64 and st["A"].dtype == torch.float64
        # the state is symmetric and the edit is not negligible
        assert torch.equal(st["C"], st["C"].T)
        assert float((_weight(editor, layer) - editor.W0[layer].double()).norm()) > 0.1
    _check_minimiser(editor, what="3 batches")


def test_growing_anchor_keeps_the_exact_minimiser_and_exact_retraction() -> None:
    """mu_t^2 = mu^2 max(1, n_t / n_ref), re-weighed every batch: after 3 batches of 2 (n_ref = 2, mu = 1)
    the anchor weighs 3, every layer holds the closed-form minimiser of the re-weighed objective over all
    recorded batches, and a retraction is still exact."""
    editor = _editor(anchor_ref=2, anchor_every=1)
    editor.edit(REQUESTS, batch_size=2)
    for layer in LAYERS:
        assert editor.anchor_mu2(layer) == pytest.approx(3.0, rel=1e-12)
    _check_minimiser(editor, what="growing anchor")
    fixed = _editor()
    fixed.edit(REQUESTS, batch_size=2)
    assert fixed.anchor_mu2(LAYERS[0]) == 1.0
    assert float((_weight(editor, 1) - _weight(fixed, 1)).norm()) > 1e-3
    editor.retract(1)
    _check_minimiser(editor, skip=[(1, 0), (1, 1)], what="growing anchor, batch 1 retracted")
    # re-weighed every 2 batches: at batches 0 and 2 only (n = 2 and 6: mu_t^2 = 1, then 3)
    every2 = _editor(anchor_ref=2, anchor_every=2)
    every2.edit(REQUESTS[:4], batch_size=2)
    assert every2.anchor_mu2(1) == 1.0
    every2.edit(REQUESTS[4:6], batch_size=2)
    assert every2.anchor_mu2(1) == pytest.approx(3.0, rel=1e-12)
    _check_minimiser(every2, what="growing anchor every 2 batches")
    with pytest.raises(ValueError, match="anchor_ref"):
        _editor(anchor_ref=-1)


def test_first_batch_targets_are_current_plus_residual_share() -> None:
    """The recorded target is ``V = K^T W_prev + E``: one batch alone must fit it as RLS would."""
    editor = _editor()
    W_before = {layer: _weight(editor, layer) for layer in LAYERS}
    editor.edit(REQUESTS[:2])
    for layer in LAYERS:
        rec = editor.load_record(editor.batches[0], layer)
        K, V = rec["K"].double(), rec["V"].double()
        # V - K^T W_0 is the layer's residual share E, hence not zero; the innovation is what moved W
        E = V - K.T @ W_before[layer]
        assert float(E.norm()) > 1e-2
        # after the edit the fit at the keys has improved
        after = V - K.T @ _weight(editor, layer)
        assert float(after.norm()) < float(E.norm())


# ----------------------------------------------------------------------------------------------------------
# 2. retraction


def test_retract_middle_batch() -> None:
    """Retracting a middle batch gives the minimiser without it; the later batches stay."""
    editor = _editor()
    editor.edit(REQUESTS, batch_size=2)
    expected = {layer: _direct(editor, layer, skip=[(1, 0), (1, 1)]) for layer in LAYERS}
    before = {layer: _weight(editor, layer) for layer in LAYERS}
    out = editor.retract(1)
    assert out["batch"] == 1 and out["requests"] == [0, 1]
    assert set(out["layers"]) == set(LAYERS)
    assert [b["active"] for b in editor.batches] == [[1, 1], [0, 0], [1, 1]]
    assert editor.n_applied == 4
    for layer in LAYERS:
        W_star, A = expected[layer]
        err = _rel_err(editor, layer, W_star)
        moved = float((_weight(editor, layer) - before[layer]).norm())
        log.info("retract batch 1, layer %d: W vs W* %.2e (W moved by %.3g)", layer, err, moved)
        assert err < TOL_W
        assert moved > 1e3 * err * float((W_star - editor.W0[layer].double()).norm())
        assert torch.allclose(editor.layer_state[layer]["A"], A, rtol=0, atol=1e-12)
        assert _inv_err(editor.layer_state[layer]["C"], A) < TOL_C
    _check_minimiser(editor, what="after retract(1)")
    # retracting twice is refused and changes nothing
    snap = _snapshot(editor)
    with pytest.raises(ValueError, match="no active request"):
        editor.retract(1)
    _assert_unchanged(editor, snap)
    # the later batch is still there and can still be retracted on its own
    editor.retract(2)
    _check_minimiser(editor, skip=[(1, 0), (1, 1), (2, 0), (2, 1)], what="after retract(2)")
    with pytest.raises(KeyError, match="no batch 7"):
        editor.retract(7)


def test_retract_one_request() -> None:
    """One request of a batch can be retracted, then the rest of the batch."""
    editor = _editor()
    editor.edit(REQUESTS, batch_size=2)
    expected = {layer: _direct(editor, layer, skip=[(1, 1)])[0] for layer in LAYERS}
    out = editor.retract(1, index=1)
    assert out["requests"] == [1]
    assert editor.batches[1]["active"] == [1, 0]
    for layer in LAYERS:
        err = _rel_err(editor, layer, expected[layer])
        log.info("retract request (1, 1), layer %d: W vs W* %.2e", layer, err)
        assert err < TOL_W
    _check_minimiser(editor, what="after retract(1, 1)")
    snap = _snapshot(editor)
    with pytest.raises(ValueError, match="already retracted"):
        editor.retract(1, index=1)
    with pytest.raises(IndexError):
        editor.retract(1, index=2)
    _assert_unchanged(editor, snap)
    # retracting the batch now takes back only the request still active
    out = editor.retract(1)
    assert out["requests"] == [0]
    assert editor.batches[1]["active"] == [0, 0]
    _check_minimiser(editor, what="after retract(1)")
    with pytest.raises(ValueError, match="no active request"):
        editor.retract(1)


def test_retract_request_by_subject_and_prompt() -> None:
    """``retract_request`` finds the active request by subject and prompt."""
    editor = _editor()
    editor.edit(REQUESTS, batch_size=2)
    r = REQUESTS[3]  # batch 1, index 1
    expected = {layer: _direct(editor, layer, skip=[(1, 1)])[0] for layer in LAYERS}
    out = editor.retract_request(r.subject, r.prompt)
    assert out["batch"] == 1 and out["requests"] == [1]
    for layer in LAYERS:
        assert _rel_err(editor, layer, expected[layer]) < TOL_W
    with pytest.raises(KeyError, match="no active request"):
        editor.retract_request(r.subject, r.prompt)
    # the literal form of the prompt finds the request too
    r2 = REQUESTS[4]
    out = editor.retract_request(r2.subject, r2.text)
    assert out["batch"] == 2 and out["requests"] == [0]
    _check_minimiser(editor, what="after retract_request x2")
    with pytest.raises(KeyError):
        editor.retract_request("Nobody", "{} is a")


def test_retraction_error_leaves_everything_unchanged(tmp_path: Path) -> None:
    """With almost no regularisation the batch alone determines its key directions: refused, no change."""
    editor = _editor(lam=1e-6, mu=1e-6, max_delta_ratio=1e9)
    run = tmp_path / "run"
    editor.attach(run)
    editor.edit(REQUESTS[:2])
    manifest = (run / "manifest.json").read_text()
    snap = _snapshot(editor)
    with pytest.raises(RetractionError, match="batch 0"):
        editor.retract(0)
    with pytest.raises(RetractionError):
        editor.retract_request(REQUESTS[0].subject, REQUESTS[0].prompt)
    _assert_unchanged(editor, snap)
    assert (run / "manifest.json").read_text() == manifest


def test_failure_during_retraction_rolls_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A failure after the first layer was written restores every layer, the state and the flags."""
    editor = _editor()
    editor.attach(tmp_path / "run")
    editor.edit(REQUESTS[:4], batch_size=2)
    manifest = (tmp_path / "run" / "manifest.json").read_text()
    snap = _snapshot(editor)
    original = editor._check_delta

    def fail_on_last(layer: int, delta: torch.Tensor, W: torch.Tensor) -> None:
        if layer == LAYERS[-1]:
            raise EditError("injected failure")
        original(layer, delta, W)

    monkeypatch.setattr(editor, "_check_delta", fail_on_last)
    with pytest.raises(EditError, match="injected"):
        editor.retract(0)
    _assert_unchanged(editor, snap)
    assert (tmp_path / "run" / "manifest.json").read_text() == manifest
    monkeypatch.undo()
    editor.retract(0)
    _check_minimiser(editor, what="retract after a rolled-back retraction")


def test_retract_passes_accumulated_A(monkeypatch: pytest.MonkeyPatch) -> None:
    """The downdate's safety check sees the error C has accumulated (A is passed to rls_retract)."""
    import rlsedit.editors.rlsedit as mod

    seen: list[torch.Tensor | None] = []
    real = mod.rls_retract

    def spy(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(kwargs.get("A"))
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, "rls_retract", spy)
    editor = _editor()
    editor.edit(REQUESTS[:4], batch_size=2)
    editor.retract(0)
    assert len(seen) == len(LAYERS)
    assert all(A is not None and A.dtype == torch.float64 for A in seen)


def test_retraction_error_on_a_later_layer_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first layer's downdate succeeds, the second is refused: no layer is touched."""
    import rlsedit.editors.rlsedit as mod

    editor = _editor()
    editor.edit(REQUESTS[:4], batch_size=2)
    snap = _snapshot(editor)
    real = mod.rls_retract
    calls: list[int] = []

    def refuse_second(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        if len(calls) == 2:
            raise RetractionError("injected: near-singular")
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, "rls_retract", refuse_second)
    with pytest.raises(RetractionError, match=rf"batch 1, request\(s\) \[0\], layer {LAYERS[1]}: injected"):
        editor.retract(1, index=0)
    _assert_unchanged(editor, snap)


# ----------------------------------------------------------------------------------------------------------
# 3. supersede


def test_reedit_supersedes_earlier_request() -> None:
    """Re-editing a fact retracts the earlier request before applying the new one."""
    editor = _editor()
    editor.edit(REQUESTS[:2])
    old = REQUESTS[0]
    new = EditRequest(old.prompt, old.subject, "German")
    report = editor.edit([new, REQUESTS[2]])
    assert report.batches[0].superseded == [(0, 0)]
    assert editor.batches[0]["active"] == [0, 1]
    assert editor.batches[1]["active"] == [1, 1]
    assert editor.n_applied == 3
    # W is the minimiser with the new request and without the old one (direct, not via the flags)
    for layer in LAYERS:
        cfg = editor.config
        sigma, W0 = editor.sigmas[layer], editor.W0[layer].double()
        A = cfg.mu**2 * sigma + cfg.lam**2 * torch.eye(D_K, dtype=torch.float64)
        B = A @ W0
        for b, cols in ((editor.batches[0], [1]), (editor.batches[1], [0, 1])):
            rec = editor.load_record(b, layer)
            K, V = rec["K"][:, cols].double(), rec["V"][cols].double()
            A, B = A + K @ K.T, B + K @ V
        err = _rel_err(editor, layer, torch.linalg.solve(A, B))
        log.info("supersede, layer %d: W vs W* %.2e", layer, err)
        assert err < TOL_W
    _check_minimiser(editor, what="after supersede")
    # the superseded request can no longer be retracted by name; the new one can
    out = editor.retract_request(old.subject, old.prompt)
    assert out["batch"] == 1 and out["requests"] == [0]


def test_double_buffering_reuses_memory_and_changes_nothing() -> None:
    """With double buffering (the default) a batch writes C_t and A_t into the matrices the batch before
    last held, and every weight and state is bitwise what fresh allocations give; a re-edit (which
    retracts first) and a failed batch keep it consistent."""
    fast, plain = _editor(), _editor(double_buffer=False)
    ptrs: list[dict[int, int]] = []
    reedit = EditRequest(REQUESTS[0].prompt, REQUESTS[0].subject, "German")
    stream = (REQUESTS[:2], REQUESTS[2:4], [reedit], REQUESTS[4:5])
    for k, batch in enumerate(stream):
        for editor in (fast, plain):
            editor.edit(batch)
        ptrs.append({layer: fast.layer_state[layer]["C"].data_ptr() for layer in LAYERS})
        for layer in LAYERS:
            assert torch.equal(_weight(fast, layer), _weight(plain, layer)), (k, layer)
            for name in ("C", "A", "B", "vv"):
                assert torch.equal(fast.layer_state[layer][name], plain.layer_state[layer][name]), (k, name)
    # batch 1 wrote into C_0's memory, batch 2 into batch 0's, batch 3 into batch 1's (the re-edit's
    # retraction in between allocates its own)
    assert ptrs[1] != ptrs[0] and ptrs[2] == ptrs[0] and ptrs[3] == ptrs[1]
    _check_minimiser(fast, what="double buffered")
    # a batch that fails after its solve leaves the state as it was, and the next batch still matches
    snap = _snapshot(fast)
    orig = fast.recorder.write_records

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    fast.recorder.write_records = boom  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="disk full"):
        fast.edit(REQUESTS[5:6])
    fast.recorder.write_records = orig  # type: ignore[method-assign]
    _assert_unchanged(fast, snap)
    for editor in (fast, plain):
        editor.edit(REQUESTS[5:6])
    for layer in LAYERS:
        assert torch.equal(_weight(fast, layer), _weight(plain, layer))
        assert torch.equal(fast.layer_state[layer]["C"], plain.layer_state[layer]["C"])


def test_repeated_stream_is_skipped_and_hand_retracted_batch_reapplied() -> None:
    """Re-running a stream whose later batch re-edits an earlier fact changes nothing (resume); a batch
    retracted by hand is applied again when it is submitted again."""
    editor = _editor()
    first = REQUESTS[0]
    stream = [first, EditRequest(first.prompt, first.subject, "German")]
    editor.edit(stream, batch_size=1)
    assert [b["active"] for b in editor.batches] == [[0], [1]]
    snap = _snapshot(editor)
    report = editor.edit(stream, batch_size=1)
    assert report.skipped == 2 and not report.batches
    _assert_unchanged(editor, snap)
    # retract the second batch by hand, then submit it again: it is applied again
    editor.retract(1)
    for layer in LAYERS:  # nothing is active: back to W0 (to float32 rounding) and C = C_0
        W0 = editor.W0[layer].double()
        back = float((_weight(editor, layer) - W0).norm() / W0.norm())
        log.info("everything retracted, layer %d: ||W - W0|| / ||W0|| %.2e", layer, back)
        assert back < 1e-6
        assert _inv_err(editor.layer_state[layer]["C"], _direct(editor, layer)[1]) < TOL_C
    report = editor.edit(stream[1:])
    assert report.skipped == 0 and len(report.batches) == 1
    assert [b["active"] for b in editor.batches] == [[0], [0], [1]]
    _check_minimiser(editor, what="stream, batch 1 re-applied")


def test_duplicates_within_a_batch_keep_the_last() -> None:
    """Two requests for one fact in a batch: only the last is applied."""
    editor = _editor()
    r = REQUESTS[0]
    editor.edit([r, REQUESTS[1], EditRequest(r.prompt, r.subject, "German")])
    assert [d["target_new"] for d in editor.batches[0]["requests"]] == ["Rome", "German"]
    _check_minimiser(editor, what="in-batch duplicate")


# ----------------------------------------------------------------------------------------------------------
# 4. save / load


def test_save_load_roundtrip(tmp_path: Path) -> None:
    """Save, load into a fresh base model: identical; later edits and retractions agree."""
    editor = _editor()
    editor.edit(REQUESTS[:4], batch_size=2)
    run = tmp_path / "run"
    editor.save(run)
    model, tok = tiny_model("llama", seed=0)  # a fresh copy of the base model
    loaded = load_editor(run, model, tok)
    assert isinstance(loaded, RLSEditor)
    assert loaded.config == editor.config
    assert loaded.templates == editor.templates
    assert loaded.batches == editor.batches
    for layer in LAYERS:
        assert torch.equal(loaded._weights()[layer], editor._weights()[layer])
        assert torch.equal(loaded.W0[layer], editor.W0[layer])
        assert torch.equal(loaded.sigmas[layer], editor.sigmas[layer])
        for key in ("C", "A"):
            st, st2 = editor.layer_state[layer][key], loaded.layer_state[layer][key]
            assert st2.dtype == st.dtype and torch.equal(st2, st)
    # the records are read from the run directory
    for b in loaded.batches:
        for ref in b["records"].values():
            assert (run / ref["path"]).is_file()
    _check_minimiser(loaded, what="loaded")

    # further edits after loading equal further edits without the save/load
    editor.edit(REQUESTS[4:])
    loaded.edit(REQUESTS[4:])
    for layer in LAYERS:
        W, W2 = editor._weights()[layer].detach(), loaded._weights()[layer].detach()
        diff = float((W - W2).abs().max())
        log.info("further edit after load, layer %d: max |dW| %.2e", layer, diff)
        torch.testing.assert_close(W2, W, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(
            loaded.layer_state[layer]["C"], editor.layer_state[layer]["C"], rtol=1e-9, atol=1e-12
        )

    # a retraction after loading works (records from disk) and is committed to the run directory
    expected = {layer: _direct(loaded, layer, skip=[(0, 0), (0, 1)])[0] for layer in LAYERS}
    loaded.retract(0)
    for layer in LAYERS:
        assert _rel_err(loaded, layer, expected[layer]) < TOL_W
    model3, tok3 = tiny_model("llama", seed=0)
    again = load_editor(run, model3, tok3)
    assert [b["active"] for b in again.batches] == [[0, 0], [1, 1], [1, 1]]
    for layer in LAYERS:
        assert torch.equal(again._weights()[layer], loaded._weights()[layer])
        assert torch.equal(again.layer_state[layer]["C"], loaded.layer_state[layer]["C"])
    _check_minimiser(again, what="reloaded after retraction")


def test_load_without_attach_leaves_the_directory_alone(tmp_path: Path) -> None:
    """``attach=False`` never writes to the saved directory."""
    editor = _editor()
    editor.edit(REQUESTS[:4], batch_size=2)
    run = tmp_path / "run"
    editor.save(run)
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    model, tok = tiny_model("llama", seed=0)
    loaded = load_editor(run, model, tok, attach=False)
    loaded.edit(REQUESTS[4:])
    loaded.retract(0)  # the records of the saved batches are still readable
    _check_minimiser(loaded, what="detached after edit + retract")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files
    # and it can be saved elsewhere, then loaded from there
    loaded.save(tmp_path / "copy")
    model2, tok2 = tiny_model("llama", seed=0)
    again = load_editor(tmp_path / "copy", model2, tok2)
    assert [b["active"] for b in again.batches] == [[0, 0], [1, 1], [1, 1]]
    for layer in LAYERS:
        assert torch.equal(again._weights()[layer], loaded._weights()[layer])
    _check_minimiser(again, what="detached copy reloaded")


def test_load_refuses_a_different_model(tmp_path: Path) -> None:
    """A model that is neither the run's base nor its edited state is refused."""
    editor = _editor()
    editor.edit(REQUESTS[:2])
    editor.save(tmp_path / "run")
    other, tok = tiny_model("llama", seed=1)
    with pytest.raises(ValueError, match="neither the base model"):
        load_editor(tmp_path / "run", other, tok)


# ----------------------------------------------------------------------------------------------------------
# 5. drift control


def test_drift_check_float32(caplog: pytest.LogCaptureFixture) -> None:
    """A float32 state: drift reported within the bound; a tiny bound forces re-inversion."""
    editor = _editor(state_dtype="float32", drift_check_every=0)
    editor.edit(REQUESTS, batch_size=2)
    for layer in LAYERS:
        assert editor.layer_state[layer]["C"].dtype == torch.float32
        assert editor.layer_state[layer]["A"].dtype == torch.float64
    # within the default float32 bound (1e-3): values reported, nothing re-inverted
    C_before = {layer: editor.layer_state[layer]["C"].clone() for layer in LAYERS}
    drifts = editor.check_drift()
    log.info("float32 drift: %s", drifts)
    assert set(drifts) == set(LAYERS)
    for layer, d in drifts.items():
        assert 0.0 < d < editor.config.bound == 1e-3
        assert torch.equal(editor.layer_state[layer]["C"], C_before[layer])
    # W is still the minimiser (the float32 state costs some accuracy)
    for layer in LAYERS:
        W_star, _ = _direct(editor, layer)
        err = _rel_err(editor, layer, W_star)
        log.info("float32 state, layer %d: W vs W* %.2e", layer, err)
        assert err < 1e-4
    # a tiny bound forces a re-inversion of A
    editor.config.drift_bound = 1e-30
    with caplog.at_level(logging.WARNING, logger="rlsedit.editors.rlsedit"):
        editor.check_drift()
    assert caplog.text.count("re-inverting") == len(LAYERS)
    for layer in LAYERS:
        st = editor.layer_state[layer]
        assert st["C"].dtype == torch.float32
        assert torch.equal(st["C"], reinvert(st["A"], torch.float32))
        assert drift(st["C"], st["A"]) <= drifts[layer]
    # retraction still works from the re-inverted float32 state
    expected = {layer: _direct(editor, layer, skip=[(2, 0), (2, 1)])[0] for layer in LAYERS}
    editor.retract(2)
    for layer in LAYERS:
        assert _rel_err(editor, layer, expected[layer]) < 1e-4


def test_drift_checked_after_batches(caplog: pytest.LogCaptureFixture) -> None:
    """``drift_check_every`` runs the check after every that many batches."""
    editor = _editor(state_dtype="float32", drift_check_every=2, drift_bound=1e-30)
    with caplog.at_level(logging.WARNING, logger="rlsedit.editors.rlsedit"):
        editor.edit(REQUESTS[:2], batch_size=1)
    assert caplog.text.count("re-inverting") == len(LAYERS)  # once per layer, after batch 2
    for layer in LAYERS:
        st = editor.layer_state[layer]
        assert torch.equal(st["C"], reinvert(st["A"], torch.float32))


def test_drift_estimated_above_exact_max(monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers larger than ``drift_exact_max`` get the randomised estimate (not the O(d^3) product); it is
    near the exact figure, and a bound below it still re-inverts."""
    from rlsedit.editors import rlsedit as rls_mod

    editor = _editor(state_dtype="float32", drift_check_every=0, drift_exact_max=0, drift_probes=64)
    editor.edit(REQUESTS, batch_size=2)
    exact = {layer: drift(st["C"], st["A"]) for layer, st in editor.layer_state.items()}

    def no_exact(*_a: object) -> float:
        raise AssertionError("the exact drift ran above drift_exact_max")

    monkeypatch.setattr(rls_mod, "drift", no_exact)
    drifts = editor.check_drift()
    for layer, d in drifts.items():
        assert 0.5 * exact[layer] < d < 2.0 * exact[layer]
    editor.config.drift_bound = 1e-30
    editor.check_drift()
    for st in editor.layer_state.values():
        assert torch.equal(st["C"], reinvert(st["A"], torch.float32))


def test_drift_float64_is_tiny() -> None:
    """A float64 state stays an inverse of A to rounding level."""
    editor = _editor(drift_check_every=0)
    editor.edit(REQUESTS, batch_size=2)
    drifts = editor.check_drift()
    assert all(0.0 <= d < 1e-12 for d in drifts.values())


# ----------------------------------------------------------------------------------------------------------
# 6. refused architecture


def test_gemma2_is_refused() -> None:
    """Gemma 2 normalises the MLP output: the editor refuses it with a clear message."""
    model, tok = tiny_model("gemma2")
    assert model.config.model_type == "gemma2"
    assert get_arch(model).norm_after_mlp
    with pytest.raises(NotImplementedError, match=r"gemma2: a normalisation follows the MLP output"):
        make_editor("rlsedit", model, tok, sigmas={}, layers=[1], n_templates=0)


# ----------------------------------------------------------------------------------------------------------
# 7. config overrides


def test_overrides_are_applied() -> None:
    """Config overrides (flat or nested target options) reach the config and the state."""
    editor = _editor(mu=2.5, lam=0.5, steps=4, lr=0.2, state_dtype="float32", drift_check_every=3)
    cfg = editor.config
    assert (cfg.mu, cfg.lam, cfg.state_dtype, cfg.drift_check_every) == (2.5, 0.5, "float32", 3)
    assert cfg.targets.steps == 4 and cfg.targets.lr == 0.2
    assert cfg.layers == LAYERS and cfg.n_templates == 0
    # C_0 uses the overridden lam and mu
    layer = LAYERS[0]
    A0 = 2.5**2 * editor.sigmas[layer] + 0.5**2 * torch.eye(D_K, dtype=torch.float64)
    assert torch.allclose(editor.layer_state[layer]["A"], A0, rtol=0, atol=1e-12)
    assert editor.layer_state[layer]["C"].dtype == torch.float32
    nested = _editor(targets={"steps": 2})
    assert nested.config.targets.steps == 2


def test_unknown_override_gets_a_suggestion() -> None:
    """Unknown or invalid overrides are refused, with the closest valid names."""
    with pytest.raises(ValueError, match=r"unknown option of RLSEditConfig 'mu2'.*did you mean.*\bmu\b"):
        _editor(mu2=3.0)
    with pytest.raises(ValueError, match=r"did you mean.*steps"):
        _editor(step=3)
    with pytest.raises(ValueError, match="lam and mu"):
        _editor(lam=-1.0)
    with pytest.raises(ValueError, match="state_dtype"):
        _editor(state_dtype="float16")
