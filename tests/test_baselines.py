"""Unit tests of the baseline editors (MEMIT, AlphaEdit, ROME, FT): each solve against a direct solution on
random matrices, their configuration, the request-by-request loop, FT's L-infinity bound, and the
shipped per-model defaults. The conformance suite (``test_conformance.py``) covers their behaviour on
tiny models of several architectures."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch

import tiny_models
from rlsedit import EditRequest, make_editor
from rlsedit.configs import model_defaults
from rlsedit.editors.base import EditError, LayerUpdate, build_config, editor_class
from rlsedit.editors.loop import LocateThenEditEditor
from rlsedit.models.arch import num_layers

D_K, D_V = tiny_models.TINY_DIMS["intermediate"], tiny_models.TINY_DIMS["hidden"]
FAST: dict[str, Any] = {"n_templates": 0, "steps": 5, "kl_factor": 0.0, "weight_decay": 0.0}


def random_sigma(seed: int, d: int = D_K) -> torch.Tensor:
    """A random SPD ``(d, d)`` float64 matrix with a spread spectrum (eigenvalues 1e-4 .. 1)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    evals = torch.logspace(-4, 0, d, dtype=torch.float64)
    return (Q * evals) @ Q.T


def random_problem(seed: int, u: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys ``K (d_k, u)`` and residual ``E (u, d_v)``, float64."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(D_K, u, generator=g, dtype=torch.float64), torch.randn(
        u, D_V, generator=g, dtype=torch.float64
    )


def editor_on_tiny(name: str, layers: list[int], **overrides: Any) -> Any:
    model, tok = tiny_models.tiny_model("llama")
    sigmas = {layer: random_sigma(layer) for layer in range(num_layers(model))}
    return make_editor(name, model, tok, sigmas=sigmas, layers=layers, **{**FAST, **overrides})


def weight(editor: Any, layer: int) -> torch.Tensor:
    return editor._weights()[layer].detach()


def request(subject: str = "Danielle Darrieux", target: str = "English") -> EditRequest:
    """A request whose prompt ends with the subject (a tiny random model's last layer acts only there)."""
    return EditRequest("The mother tongue of {}", subject, target, "French")


# ----------------------------------------------------------------------------------------------------------
# MEMIT


def test_memit_solve_matches_direct_solution() -> None:
    mu = 2.0
    ed = editor_on_tiny("memit", [2, 3], mu=mu)
    K, E = random_problem(0)
    W = weight(ed, 2)
    p = ed.solve(2, K, E, W)
    sigma = ed.sigmas[2]
    direct = torch.linalg.solve(mu**2 * sigma + K @ K.T, K @ E)
    torch.testing.assert_close(p.delta, direct, rtol=1e-9, atol=1e-10)
    assert p.delta.shape == (D_K, D_V) and p.state == {} and p.record == {}
    # the minimiser of ||K^T (W + D) - (K^T W + E)||^2 + mu^2 ||K_0^T D||^2: zero gradient
    grad = K @ (K.T @ p.delta - E) + mu**2 * sigma @ p.delta
    assert float(grad.abs().max()) < 1e-8


def test_memit_config_validation() -> None:
    with pytest.raises(ValueError, match="mu"):
        editor_on_tiny("memit", [2], mu=0.0)


# ----------------------------------------------------------------------------------------------------------
# AlphaEdit


@pytest.mark.parametrize("rule", ["absolute", "relative"])
def test_alphaedit_solve_matches_direct_solution_and_accumulates_keys(caplog, rule: str) -> None:
    """Reference (AlphaEdit ``get_project``): ``U, S = svd(cov)``; ``P = U[:, S < 2e-2] U[:, S < 2e-2]^T``
    with an absolute threshold; "relative" scales it by the largest eigenvalue."""
    alpha = 0.5
    caplog.set_level(logging.INFO, logger="rlsedit.editors.alphaedit")
    probe = editor_on_tiny("alphaedit", [2], alpha=alpha)
    evals, evecs = torch.linalg.eigh(probe.sigmas[2])
    # a threshold between two middle eigenvalues, so that the null space is neither empty nor everything
    mid = float(evals[D_K // 2 - 1] + evals[D_K // 2]) / 2
    threshold = mid if rule == "absolute" else mid / float(evals[-1])
    ed = editor_on_tiny("alphaedit", [2], alpha=alpha, nullspace_threshold=threshold, nullspace_rule=rule)
    U = evecs[:, evals < mid]
    assert U.shape[1] == D_K // 2
    P = U @ U.T
    assert torch.equal(ed.layer_state[2]["KpKpT"], torch.zeros(D_K, D_K, dtype=torch.float64))
    K1, E1 = random_problem(1)
    p1 = ed.solve(2, K1, E1, weight(ed, 2))
    assert f"null space of dimension {U.shape[1]} of {D_K}" in caplog.text
    assert ed.nullspace_dims == {2: D_K // 2}
    eye = torch.eye(D_K, dtype=torch.float64)
    direct1 = torch.linalg.solve(P @ (K1 @ K1.T) + alpha * eye, P @ K1 @ E1)
    torch.testing.assert_close(p1.delta, direct1, rtol=1e-8, atol=1e-10)
    # the update lives in the null space: (I - P) Delta = 0, so ordinary keys are not disturbed
    assert float(((eye - P) @ p1.delta).abs().max()) < 1e-9
    torch.testing.assert_close(p1.state["KpKpT"], K1 @ K1.T)
    # the second batch keeps the first batch's keys in the objective
    ed.layer_state[2] = p1.state
    K2, E2 = random_problem(2)
    p2 = ed.solve(2, K2, E2, weight(ed, 2))
    direct2 = torch.linalg.solve(P @ (K1 @ K1.T + K2 @ K2.T) + alpha * eye, P @ K2 @ E2)
    torch.testing.assert_close(p2.delta, direct2, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(p2.state["KpKpT"], K1 @ K1.T + K2 @ K2.T)


@pytest.mark.parametrize("field", ["alpha", "nullspace_threshold"])
def test_alphaedit_config_validation(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        editor_on_tiny("alphaedit", [2], **{field: 0.0})
    with pytest.raises(ValueError, match="nullspace_rule"):
        editor_on_tiny("alphaedit", [2], nullspace_rule="scaled")


# ----------------------------------------------------------------------------------------------------------
# ROME


def test_rome_solve_is_the_exact_rank_one_update() -> None:
    lam, mu = 0.5, 3.0
    ed = editor_on_tiny("rome", [2], lam=lam, mu=mu)
    C_inv = torch.linalg.inv(lam**2 * torch.eye(D_K, dtype=torch.float64) + mu**2 * ed.sigmas[2])
    K, E = random_problem(3, u=1)
    W = weight(ed, 2).to(torch.float64)
    p = ed.solve(2, K, E, W)
    k, e = K[:, 0], E[0]
    direct = torch.outer(C_inv @ k, e) / (k @ C_inv @ k)
    torch.testing.assert_close(p.delta, direct, rtol=1e-8, atol=1e-10)
    assert int(torch.linalg.matrix_rank(p.delta)) == 1
    torch.testing.assert_close(k @ (W + p.delta), k @ W + e)  # the key now maps to its value exactly
    # only lam / mu matters
    ed2 = editor_on_tiny("rome", [2], lam=2 * lam, mu=2 * mu)
    torch.testing.assert_close(ed2.solve(2, K, E, W).delta, p.delta, rtol=1e-8, atol=1e-10)


def test_rome_solve_with_the_prompt_key_follows_the_reference() -> None:
    """Reference (ROME ``compute_v``): ``right = (v - W^T k_p) / (k_p . left)``, ``left = C^-1 k_avg`` (its
    norm cancels), ``Delta = left right^T``; ``k_p`` the bare prompt's key (``cur_input``), ``k_avg`` the
    key averaged over templates (``compute_u``)."""
    lam, mu = 0.5, 3.0
    ed = editor_on_tiny("rome", [2], lam=lam, mu=mu)
    C_inv = torch.linalg.inv(lam**2 * torch.eye(D_K, dtype=torch.float64) + mu**2 * ed.sigmas[2])
    K, E = random_problem(3, u=1)
    K_p = K + 0.3 * random_problem(9, u=1)[0]  # another key: the bare prompt's
    W = weight(ed, 2).to(torch.float64)
    p = ed.solve(2, K, E, W, K_prompt=K_p)
    k, kp, e = K[:, 0], K_p[:, 0], E[0]
    left = C_inv @ k
    left = left / left.norm()
    v = W.T @ kp + e  # the target value: the prompt's output moved by the residual
    direct = torch.outer(left, (v - W.T @ kp) / (kp @ left))
    torch.testing.assert_close(p.delta, direct, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(kp @ (W + p.delta), v)  # the bare prompt's key reaches its value exactly
    assert float((k @ (W + p.delta) - (k @ W + e)).norm()) > 1e-6  # the averaged key does not, in general
    assert not torch.allclose(p.delta, ed.solve(2, K, E, W).delta)
    # a prompt key pointing against the update direction is refused, the weights untouched
    with pytest.raises(EditError, match="not positive"):
        ed.solve(2, K, E, W, K_prompt=-K)


def test_rome_edit_moves_the_bare_prompt_exactly_onto_its_target() -> None:
    """Through the pipeline (2 generated templates, so the averaged key differs from the prompt's): the
    reference update maps the bare prompt's key onto its value, so the edited layer's hidden state at the
    subject's last token of the bare prompt reaches the target (residual after ~ 0)."""
    ed = editor_on_tiny("rome", [2], n_templates=2, template_length=4)
    assert len(ed.templates) == 3
    report = ed.edit([request()]).batches[0]
    assert report.residual_before > 1e-2
    assert report.residual_after < 1e-4 * report.residual_before


def test_rome_solve_of_several_columns_is_sequential() -> None:
    ed = editor_on_tiny("rome", [2])
    K, E = random_problem(4, u=2)
    W = weight(ed, 2).to(torch.float64)
    first = ed.solve(2, K[:, :1], E[:1], W).delta
    # the second column's value is relative to the weight the batch started from
    second = ed.solve(2, K[:, 1:], (K[:, 1] @ W + E[1] - K[:, 1] @ (W + first))[None], W + first).delta
    torch.testing.assert_close(ed.solve(2, K, E, W).delta, first + second, rtol=1e-9, atol=1e-12)


def test_rome_needs_exactly_one_layer() -> None:
    with pytest.raises(ValueError, match="exactly one layer"):
        editor_on_tiny("rome", [2, 3])


def test_rome_batch_equals_its_requests_one_by_one() -> None:
    """A ROME batch is applied request by request: identical weights to one batch per request."""
    reqs = [request(), request("Lyon", "Beirut")]
    together = editor_on_tiny("rome", [3])
    report = together.edit(reqs).batches[0]
    apart = editor_on_tiny("rome", [3])
    apart.edit(reqs[:1])
    apart.edit(reqs[1:])
    assert torch.equal(weight(together, 3), weight(apart, 3))
    assert report.n_requests == 2 and len(together.batches) == 1
    assert report.layers[3]["delta_norm"] > 0
    assert {"targets", "keys", "update", "total"} <= set(report.timings)


def test_rome_edit_reaches_the_target_hidden_state() -> None:
    """With bare prompts, the key the update is solved for is the edited prompt's key: the last layer's
    hidden state reaches the optimised target exactly."""
    ed = editor_on_tiny("rome", [3])
    report = ed.edit([request()]).batches[0]
    assert report.residual_after < 1e-4 * report.residual_before


# ----------------------------------------------------------------------------------------------------------
# request by request in the base loop


class _Counting(LocateThenEditEditor):
    """Not registered: counts the requests it sees one at a time, records each key, changes nothing."""

    name: ClassVar[str] = "counting"
    one_request_at_a_time: ClassVar[bool] = True

    def init_layer_state(
        self, layer: int, W0: torch.Tensor, sigma: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        return {"n": torch.zeros((), dtype=torch.int64)}

    def solve(
        self,
        layer: int,
        K: torch.Tensor,
        E: torch.Tensor,
        W: torch.Tensor,
        *,
        K_prompt: torch.Tensor | None = None,
    ) -> LayerUpdate:
        assert K.shape[1] == 1 and E.shape[0] == 1
        n = self.layer_state[layer]["n"]
        return LayerUpdate(
            torch.zeros_like(W, dtype=torch.float64), {"n": n + 1}, {"K": K.float().contiguous()}
        )


def test_one_request_at_a_time_threads_state_and_keeps_records() -> None:
    model, tok = tiny_models.tiny_model("llama")
    cfg = build_config(_Counting.config_class, {}, {**FAST, "layers": [2, 3]})
    sigmas = {layer: random_sigma(layer) for layer in range(num_layers(model))}
    ed = _Counting(model, tok, cfg, sigmas=sigmas)
    reqs = [request(), request("Lyon", "Beirut"), request("Toko Yasuda", "piano")]
    ed.edit(reqs)
    assert len(ed.batches) == 1
    for layer in (2, 3):
        assert int(ed.layer_state[layer]["n"]) == 3
        rec = ed.load_record(ed.batches[0], layer)
        assert sorted(rec) == ["0.K", "1.K", "2.K"]
        assert all(t.shape == (D_K, 1) for t in rec.values())
    ed.edit([request("Lionel Messi", "tennis")])
    assert int(ed.layer_state[2]["n"]) == 4


# ----------------------------------------------------------------------------------------------------------
# FT


def _max_change(ed: Any, layer: int, ref: torch.Tensor) -> float:
    return float((weight(ed, layer) - ref).abs().max())


def test_ft_respects_the_linf_bound_per_batch() -> None:
    eps = 1e-3
    ed = editor_on_tiny("ft", [3], lr=0.05, steps=5, norm_constraint=eps)
    W0 = weight(ed, 3).clone()
    report = ed.edit([request()]).batches[0]
    change = _max_change(ed, 3, W0)
    assert eps * 0.99 < change <= eps * (1 + 1e-4)  # the bound is active and holds
    assert report.target_nll_final < report.target_nll_init
    assert report.timings["finetune"] > 0 and "targets" not in report.timings  # no target optimisation
    W1 = weight(ed, 3).clone()
    ed.edit([request("Lyon", "Beirut")])
    assert _max_change(ed, 3, W1) <= eps * (1 + 1e-4)
    assert _max_change(ed, 3, W0) > eps * 1.01  # "batch": each batch has its own budget


def test_ft_base_bound_holds_over_the_run() -> None:
    eps = 1e-3
    ed = editor_on_tiny("ft", [3], lr=0.05, steps=5, norm_constraint=eps, clamp_to="base")
    W0 = weight(ed, 3).clone()
    ed.edit([request()])
    ed.edit([request("Lyon", "Beirut")])
    assert _max_change(ed, 3, W0) <= eps * (1 + 1e-4)


def test_ft_needs_no_statistics_and_leaves_no_gradients(monkeypatch) -> None:
    import rlsedit.stats

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("FT must not compute statistics")

    monkeypatch.setattr(rlsedit.stats, "second_moments", refuse)
    model, tok = tiny_models.tiny_model("gpt2")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ed = make_editor("ft", model, tok, layers=[3], **FAST)
    assert ed.sigmas == {}
    ed.edit([request()])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    ("field", "value"),
    [("lr", 0.0), ("steps", 0), ("norm_constraint", 0.0), ("clamp_to", "run"), ("stop_loss", -1.0)],
)
def test_ft_config_validation(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        build_config(editor_class("ft").config_class, {}, {field: value})


# ----------------------------------------------------------------------------------------------------------
# per-model defaults


SMOLLM2 = SimpleNamespace(
    config=SimpleNamespace(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30)
)


@pytest.mark.parametrize("name", ["rlsedit", "memit", "alphaedit", "rome", "ft"])
def test_smollm2_defaults_build_valid_configs(name: str) -> None:
    defaults = model_defaults(SMOLLM2, name)
    cfg = build_config(editor_class(name).config_class, defaults, {})
    assert all(0 <= layer < 30 for layer in cfg.layers)
    if name in ("rome", "ft"):
        assert cfg.layers == (5,)
    else:
        assert cfg.layers == (3, 4, 5, 6, 7)


# ----------------------------------------------------------------------------------------------------------
# Norm-anchored targets (NAS), shared by every closed-form editor


def test_norm_anchor_targets_follow_nas() -> None:
    """Reference (NAS ``compute_z``): ``v* = delta + v0``; if ``||v*|| > 2 mean`` then ``v* = v0`` else
    ``v* = v* * mean / ||v*||``; ``target = (target_init - v0) + v*``; ``mean`` the upper-trimmed (95%) mean
    of ``||v*||`` over sampled requests."""
    from rlsedit.locate.norm_anchor import norm_anchor_targets, reference_value_norm

    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(5, 8, generator=g, dtype=torch.float64)
    v0 = torch.randn(5, 8, generator=g, dtype=torch.float64)
    delta = torch.randn(5, 8, generator=g, dtype=torch.float64)
    delta[3] *= 40.0  # a value vector far above twice the reference: left at v0
    z = h0 + delta
    ref = 3.0
    got, skipped = norm_anchor_targets(z, h0, v0, ref)
    for i in range(5):
        v_star = delta[i] + v0[i]
        v_star = v0[i] if v_star.norm() > 2 * ref else v_star * ref / v_star.norm()
        torch.testing.assert_close(got[i], (h0[i] - v0[i]) + v_star)
    assert skipped == 1
    norms = (v0 + delta).norm(dim=1)
    many = torch.cat([norms, norms + 1, norms + 2, norms + 3])  # 20 rows: the largest one is dropped
    rows = torch.cat([v0 + delta] * 4)
    scale = many / norms.repeat(4)
    assert reference_value_norm(rows * scale[:, None], torch.zeros_like(rows), torch.zeros_like(rows)) == (
        pytest.approx(float(torch.sort(many).values[:19].mean()))
    )
    with pytest.raises(ValueError, match="reference norm"):
        norm_anchor_targets(z, h0, v0, 0.0)


def test_norm_anchor_is_measured_once_and_applied_by_every_closed_form_editor() -> None:
    """The reference is measured on the unedited model from tune cases (kept in the config), and each
    batch's targets are rescaled before the solve: the MEMIT and AlphaEdit editors take the same option."""
    from rlsedit.datasets import load_counterfact
    from rlsedit.locate import compute_hidden, compute_targets
    from rlsedit.locate.norm_anchor import norm_anchor_targets, reference_value_norm

    ed = editor_on_tiny("memit", [2, 3], norm_anchor=True, norm_anchor_samples=3)
    tune = load_counterfact(split="tune")
    reqs = [tune[i * len(tune) // 3].request for i in range(3)]
    tr = compute_targets(ed.model, ed.tokenizer, reqs, 3, ed.templates, ed.config.targets)
    v0 = compute_hidden(ed.model, ed.tokenizer, reqs, ed.modules[3])
    assert ed.config.norm_anchor_ref == pytest.approx(reference_value_norm(v0, tr.z, tr.h0), rel=1e-5)
    # the batch's targets are the rescaled ones
    batch = [request(), request("Lyon", "Beirut")]
    tb = compute_targets(ed.model, ed.tokenizer, batch, 3, ed.templates, ed.config.targets)
    want, _ = norm_anchor_targets(
        tb.z, tb.h0, compute_hidden(ed.model, ed.tokenizer, batch, ed.modules[3]), ed.config.norm_anchor_ref
    )
    torch.testing.assert_close(ed._norm_anchored(batch, tb, 3), want)
    assert float((want - tb.z).norm()) > 1e-4
    for name in ("memit", "alphaedit", "rlsedit"):
        e = editor_on_tiny(name, [2, 3], norm_anchor=True, norm_anchor_ref=2.5)
        assert e.edit(batch).batches[0].n_requests == 2
    with pytest.raises(ValueError, match="norm_anchor_ref"):
        editor_on_tiny("memit", [2], norm_anchor_ref=-1.0)


# ----------------------------------------------------------------------------------------------------------
# EvoEdit


def test_evoedit_solve_follows_the_reference() -> None:
    """Reference (the RLSEdit release's ``EvoEdit_main.py``): ``Y = P K``, ``S0 = K^T Y``,
    ``upd = resid (S0 + L2 I)^{-1} Y^T`` (their orientation), then ``P <- P - Q Q^T`` with ``Q`` the left
    singular vectors of ``P K`` above the rounding threshold; a batch with ``||P K|| < 1e-3`` is skipped."""
    alpha = 0.5
    probe = editor_on_tiny("evoedit", [2], alpha=alpha)
    evals, evecs = torch.linalg.eigh(probe.sigmas[2])
    mid = float(evals[D_K // 2 - 1] + evals[D_K // 2]) / 2
    ed = editor_on_tiny("evoedit", [2], alpha=alpha, nullspace_threshold=mid)
    U = evecs[:, evals < mid]
    P = U @ U.T
    torch.testing.assert_close(ed.layer_state[2]["P"], P, atol=1e-10, rtol=0)
    K1, E1 = random_problem(1)
    p1 = ed.solve(2, K1, E1, weight(ed, 2))
    Y = P @ K1
    ref = Y @ torch.linalg.solve(K1.T @ Y + alpha * torch.eye(K1.shape[1], dtype=torch.float64), E1)
    torch.testing.assert_close(p1.delta, ref, rtol=1e-8, atol=1e-10)
    # the same as (P K K^T + alpha I)^{-1} P K E (the Woodbury identity)
    eye = torch.eye(D_K, dtype=torch.float64)
    torch.testing.assert_close(p1.delta, torch.linalg.solve(P @ K1 @ K1.T + alpha * eye, P @ K1 @ E1))
    # the projector loses exactly the batch's projected key directions
    Q = torch.linalg.svd(Y, full_matrices=False).U
    torch.testing.assert_close(p1.state["P"], P - Q @ Q.T, atol=1e-10, rtol=0)
    assert float((p1.state["P"] @ Y).abs().max()) < 1e-9
    # a later batch acts only where the earlier one's directions are gone
    ed.layer_state[2] = p1.state
    K2, E2 = random_problem(2)
    p2 = ed.solve(2, K2, E2, weight(ed, 2))
    assert float((Y.T @ p2.delta).abs().max()) < 1e-8
    # keys with no component in the projector's range: skipped, the layer and its state unchanged
    K3 = (eye - p1.state["P"]) @ K2
    p3 = ed.solve(2, K3, E2, weight(ed, 2))
    assert float(p3.delta.abs().max()) == 0.0 and p3.state["P"] is p1.state["P"]


# ----------------------------------------------------------------------------------------------------------
# UltraEdit


def test_ultraedit_follows_the_reference() -> None:
    """Reference (UltraEdit ``nets.RunningMeanStd`` and ``ULTRAEDIT.predict_param_shifts``):
    ``update``: ``n' = n + m; delta = mean(x) - mean; mean += m delta / n';``
    ``var += m var(x) + n m delta^2 / n'``;
    ``forward``: ``(x - mean) / (sqrt(var / (n' - 1 + eps)) + eps)``; ``coeffs = -lr sum(k^2)``;
    ``shift = solve(K^T K + I, K^T (coeffs g^))``; the keys and gradients those of one forward/backward of
    the mean cross-entropy over the target tokens, at the positions that predict them."""
    from rlsedit.editors.ft import _encode
    from rlsedit.editors.ultraedit import running_update, ultraedit_delta

    g = torch.Generator().manual_seed(0)
    X1 = torch.randn(7, 5, generator=g, dtype=torch.float64)
    X2 = torch.randn(4, 5, generator=g, dtype=torch.float64) + 1.0
    n, mean, var = (
        torch.zeros(1, dtype=torch.float64),
        torch.zeros(5, dtype=torch.float64),
        torch.zeros(5, dtype=torch.float64),
    )
    n, mean, var = running_update(n, mean, var, X1)
    n, mean, var = running_update(n, mean, var, X2)
    both = torch.cat([X1, X2])
    assert float(n) == 11 and torch.allclose(mean, both.mean(0))
    # the reference's accumulated variance (its own formula, not exactly the pooled one)
    d = X2.mean(0) - X1.mean(0)
    ref_var = 7 * X1.var(0) + 4 * X2.var(0) + 7 * 4 * d**2 / 11
    torch.testing.assert_close(var, ref_var)
    K, G = both[:, :3], both[:, 3:]
    eps = float(torch.finfo(torch.float32).eps)
    z = (both - mean) / ((var / (n - 1 + eps)).sqrt() + eps)
    V = -0.1 * (z[:, :3] ** 2).sum(1, keepdim=True) * z[:, 3:]
    ref = torch.linalg.solve(K.T @ K + torch.eye(3, dtype=torch.float64), K.T @ V)
    torch.testing.assert_close(ultraedit_delta(K, G, n, mean, var, 0.1, 1.0), ref)
    # through the editor: keys and gradients of the edited matrix (the MLP input projection)
    ed = editor_on_tiny("ultraedit", [1, 2], lr=1e-3)
    assert ed.modules == {1: "model.layers.1.mlp.up_proj", 2: "model.layers.2.mlp.up_proj"}
    reqs = [request(), request("Lyon", "Beirut")]
    feats, loss = ed._features(reqs)
    batch = _encode(ed.tokenizer, reqs, torch.device("cpu"))
    up = ed.model.model.layers[2].mlp.up_proj
    seen = {}
    h1 = up.register_forward_hook(lambda m, a, o: seen.__setitem__("x", a[0]))
    h2 = up.register_full_backward_hook(lambda m, gi, go: seen.__setitem__("g", go[0]))
    ed.model.zero_grad()
    logits = ed.model(input_ids=batch.ids, attention_mask=batch.mask).logits
    torch.nn.functional.cross_entropy(logits[batch.rows, batch.pos], batch.tok).backward()
    h1.remove()
    h2.remove()
    torch.testing.assert_close(feats[2][0], seen["x"][batch.rows, batch.pos].double())
    torch.testing.assert_close(feats[2][1], seen["g"][batch.rows, batch.pos].double())
    # an edit moves the state and lowers the targets' loss; the normaliser is saved with the lowest layer
    report = ed.edit(reqs).batches[0]
    assert report.target_nll_final < report.target_nll_init
    assert float(ed.layer_state[1]["n"]) == 2 * feats[2][0].shape[0] and ed.layer_state[2] == {}
    with pytest.raises(ValueError, match="lr > 0"):
        editor_on_tiny("ultraedit", [1], lr=0.0)
