"""Tests of rlsedit.linalg against closed-form solutions of the same problems."""

from __future__ import annotations

import logging
import math
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlsedit import linalg
from rlsedit.linalg import (
    RetractionError,
    alphaedit_delta,
    drift,
    drift_estimate,
    initial_inverse,
    memit_delta,
    nullspace_projector,
    reinvert,
    rls_retract,
    rls_step,
    rome_rank_one,
    solve_spd,
)

logger = logging.getLogger(__name__)

F64 = torch.float64
D_K = 48
D_V = 20
LAM = 0.1
MU = 2.0


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of ``a`` against the reference ``b``."""
    return float(
        torch.linalg.norm((a.to(F64) - b.to(F64)).flatten()) / torch.linalg.norm(b.to(F64).flatten())
    )


def random_orthogonal(d: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


def make_problem(d_k: int = D_K, d_v: int = D_V, seed: int = 0, decay: float = 5.0):
    """Sigma from random keys with a decaying spectrum, a key sampler from the same law, and W0 != 0."""
    g = torch.Generator().manual_seed(seed)
    U = random_orthogonal(d_k, g)
    scales = torch.exp(-torch.linspace(0.0, decay, d_k, dtype=F64))
    n = 4 * d_k
    X = U @ (scales[:, None] * torch.randn(d_k, n, generator=g, dtype=F64))
    sigma = X @ X.T / n
    W0 = torch.randn(d_k, d_v, generator=g, dtype=F64)

    def keys(u: int) -> torch.Tensor:
        # typical keys plus a little isotropic part, scaled up as edit keys tend to be
        z = torch.randn(d_k, u, generator=g, dtype=F64)
        return 3.0 * (U @ (scales[:, None] * z)) + 0.1 * torch.randn(d_k, u, generator=g, dtype=F64)

    def values(K: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        return K.T @ W + torch.randn(K.shape[1], d_v, generator=g, dtype=F64)

    return sigma, W0, keys, values, g


def closed_form(sigma, lam, mu, W0, batches):
    """Minimiser of J over the given batches by solving the normal equations directly."""
    d_k = sigma.shape[0]
    A0 = lam**2 * torch.eye(d_k, dtype=F64) + mu**2 * sigma
    A = A0.clone()
    b = A0 @ W0
    for K, V in batches:
        A = A + K @ K.T
        b = b + K @ V
    return A, torch.linalg.solve(A, b)


def run_history(n_batches: int = 30, seed: int = 0, lam: float = LAM, mu: float = MU):
    sigma, W0, keys, values, g = make_problem(seed=seed)
    sizes = [1, 2, 5, 1, 3, 8, 1, 4]
    C = initial_inverse(sigma, lam, mu)
    W = W0.clone()
    batches = []
    for t in range(n_batches):
        K = keys(sizes[t % len(sizes)])
        V = values(K, W)  # targets computed on the current model, as the editor does
        C, W = rls_step(C, W, K, V)
        batches.append((K, V))
    return sigma, W0, C, W, batches


# --------------------------------------------------------------------------------------------------
# initial_inverse
# --------------------------------------------------------------------------------------------------


def test_initial_inverse_matches_explicit_inverse():
    sigma, *_ = make_problem()
    C0 = initial_inverse(sigma, LAM, MU)
    A0 = LAM**2 * torch.eye(D_K, dtype=F64) + MU**2 * sigma
    assert C0.dtype == F64
    assert torch.equal(C0, C0.T)
    assert rel(C0, torch.linalg.inv(A0)) < 1e-10
    C32 = initial_inverse(sigma, LAM, MU, dtype=torch.float32)
    assert C32.dtype == torch.float32
    assert rel(C32, torch.linalg.inv(A0)) < 1e-6


def test_initial_inverse_lam_zero_with_definite_sigma():
    sigma, *_ = make_problem()
    C0 = initial_inverse(sigma, 0.0, MU)
    assert rel(C0 @ (MU**2 * sigma), torch.eye(D_K, dtype=F64)) < 1e-8


@pytest.mark.parametrize(
    ("sigma", "lam", "mu", "match"),
    [
        (torch.eye(4, 3, dtype=F64), 0.1, 1.0, "square"),
        (torch.eye(4, dtype=F64)[None], 0.1, 1.0, "2-dimensional"),
        (torch.eye(4, dtype=F64), -0.1, 1.0, "lam must be >= 0"),
        (torch.eye(4, dtype=F64), 0.1, -1.0, "mu must be >= 0"),
        (torch.eye(4, dtype=F64), float("nan"), 1.0, "lam must be finite"),
        (torch.eye(4, dtype=F64), 0.0, 0.0, "both zero"),
        (torch.full((4, 4), float("nan"), dtype=F64), 0.1, 1.0, "NaN"),
        (torch.eye(4, dtype=torch.int64), 0.1, 1.0, "floating"),
        (-torch.eye(4, dtype=F64), 0.0, 1.0, "not positive definite"),
    ],
)
def test_initial_inverse_validation(sigma, lam, mu, match):
    with pytest.raises(ValueError, match=match):
        initial_inverse(sigma, lam, mu)


def test_initial_inverse_singular_sigma_without_lam_raises():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(D_K, 10, generator=g, dtype=F64)  # rank 10 < d_k
    sigma = X @ X.T / 10
    with pytest.raises(ValueError, match="positive definite|singular"):
        initial_inverse(sigma, 0.0, 1.0)
    initial_inverse(sigma, 1e-3, 1.0)  # a little lam fixes it


# --------------------------------------------------------------------------------------------------
# rls_step
# --------------------------------------------------------------------------------------------------


def test_rls_step_matches_closed_form_minimiser():
    sigma, W0, C, W, batches = run_history(n_batches=30)
    assert any(K.shape[1] == 1 for K, _ in batches)
    A, W_star = closed_form(sigma, LAM, MU, W0, batches)
    assert rel(W, W_star) < 1e-8
    assert rel(C, torch.linalg.inv(A)) < 1e-8
    assert torch.equal(C, C.T)
    assert drift(C, A) < 1e-8
    # the objective's gradient vanishes at W: A W = b
    assert rel(A @ W, A @ W_star) < 1e-8


def test_rls_step_batch_equals_column_by_column():
    sigma, W0, keys, values, _ = make_problem(seed=3)
    C0 = initial_inverse(sigma, LAM, MU)
    K = keys(6)
    V = values(K, W0)
    C_b, W_b = rls_step(C0, W0, K, V)
    C_c, W_c = C0, W0
    for j in range(6):
        C_c, W_c = rls_step(C_c, W_c, K[:, j : j + 1], V[j : j + 1])
    assert rel(W_b, W_c) < 1e-10
    assert rel(C_b, C_c) < 1e-10


def test_rls_step_does_not_mutate_inputs():
    sigma, W0, keys, values, _ = make_problem()
    C = initial_inverse(sigma, LAM, MU)
    K = keys(4)
    V = values(K, W0)
    copies = [t.clone() for t in (C, W0, K, V)]
    C_next, W_next = rls_step(C, W0, K, V)
    for before, after in zip(copies, (C, W0, K, V), strict=True):
        assert torch.equal(before, after)
    assert C_next.data_ptr() != C.data_ptr() and W_next.data_ptr() != W0.data_ptr()


@pytest.mark.parametrize("panel", [1, 7, 16, 50, 4096])
@pytest.mark.parametrize("alpha", [-1.0, 1.0])
def test_sym_rank_update_matches_dense_and_is_symmetric(panel: int, alpha: float) -> None:
    """The panelled update equals C + alpha G G^T (float64 dense), is exactly symmetric, and in place
    (out = C) gives the same matrix, for panel sizes that do and do not divide d."""
    g = torch.Generator().manual_seed(panel)
    d, u = 50, 6
    X = torch.randn(d, d, generator=g, dtype=torch.float64)
    C = X @ X.T + d * torch.eye(d, dtype=torch.float64)
    G = torch.randn(d, u, generator=g, dtype=torch.float64)
    dense = C + alpha * (G @ G.T)
    out = linalg.rls._sym_rank_update(C, G, torch.empty_like(C), alpha=alpha, panel=panel)
    assert rel(out, dense) < 1e-14
    assert torch.equal(out, out.T)
    C2 = C.clone()
    same = linalg.rls._sym_rank_update(C2, G, C2, alpha=alpha, panel=panel)
    assert same.data_ptr() == C2.data_ptr()
    assert torch.equal(same, out)


def test_rls_step_inplace_and_into_a_buffer_equal_out_of_place(monkeypatch: pytest.MonkeyPatch) -> None:
    """``inplace`` writes C_next into C, ``out=`` into a given buffer (C untouched): both bitwise what a
    fresh C_next holds; a buffer that overlaps C, has the wrong shape/dtype/layout, or comes with
    inplace=True is refused; a failing step leaves C as it was."""
    monkeypatch.setattr(linalg.rls, "_PANEL_ROWS", 5)
    sigma, W0, keys, values, _ = make_problem(seed=5)
    C = initial_inverse(sigma, LAM, MU)
    K = keys(4)
    V = values(K, W0)
    C_ref, W_ref = rls_step(C, W0, K, V)
    before = C.clone()
    C_in = C.clone()
    C_next, W_next = rls_step(C_in, W0, K, V, inplace=True)
    assert C_next.data_ptr() == C_in.data_ptr()
    assert torch.equal(C_next, C_ref) and torch.equal(W_next, W_ref)
    buf = torch.full_like(C, float("nan"))
    C_next, W_next = rls_step(C, W0, K, V, out=buf)
    assert C_next.data_ptr() == buf.data_ptr()
    assert torch.equal(C_next, C_ref) and torch.equal(W_next, W_ref)
    assert torch.equal(C, before)
    # ping-pong over a few batches: the same as fresh allocations every time
    a, b, spare = C.clone(), C.clone(), torch.empty_like(C)
    Wa = Wb = W0
    for t in range(3):
        Kt = keys(3)
        Vt = values(Kt, Wa)
        a, Wa = rls_step(a, Wa, Kt, Vt)
        nb, Wb = rls_step(b, Wb, Kt, Vt, out=spare)
        spare, b = b, nb
        assert torch.equal(a, b) and torch.equal(Wa, Wb), t
    for bad, match in (
        (C, "shares memory"),
        (C.view(-1).view(C.shape), "shares memory"),
        (torch.empty(C.shape[0] + 1, C.shape[0] + 1, dtype=C.dtype), "must match C"),
        (torch.empty_like(C, dtype=torch.float32), "must match C"),
        (torch.empty_like(C).T, "contiguous"),
    ):
        with pytest.raises(ValueError, match=match):
            rls_step(C, W0, K, V, out=bad)
    with pytest.raises(ValueError, match="not both"):
        rls_step(C, W0, K, V, out=torch.empty_like(C), inplace=True)
    assert torch.equal(C, before)
    # a failing step (non-positive-definite S) leaves C as it was
    C_bad = -torch.eye(C.shape[0], dtype=C.dtype)
    before_bad = C_bad.clone()
    with pytest.raises(ValueError, match="positive definite"):
        rls_step(C_bad, W0, K, V, inplace=True)
    assert torch.equal(C_bad, before_bad)


def test_rls_step_result_is_row_major_and_layout_independent() -> None:
    """A column-major C (as LAPACK's inverse returns) gives bitwise what its row-major copy gives, and
    C_next is row-major either way: a state saved and loaded (row-major) computes exactly as before."""
    sigma, W0, keys, values, _ = make_problem(seed=7)
    C = initial_inverse(sigma, LAM, MU)
    assert C.is_contiguous()
    K = keys(3)
    V = values(K, W0)
    col_major = C.T.contiguous().T  # same values, Fortran order
    assert not col_major.is_contiguous() and torch.equal(col_major, C)
    C1, W1 = rls_step(C, W0, K, V)
    C2, W2 = rls_step(col_major, W0, K, V)
    assert C1.is_contiguous() and C2.is_contiguous()
    assert torch.equal(C1, C2) and torch.equal(W1, W2)


def test_rls_step_float32_weights_with_float64_inverse():
    sigma, W0, keys, values, _ = make_problem()
    C = initial_inverse(sigma, LAM, MU)
    K = keys(3)
    V = values(K, W0)
    C64, W64 = rls_step(C, W0, K, V)
    C_next, W_next = rls_step(C, W0.float(), K.float(), V.float())
    assert C_next.dtype == F64
    assert W_next.dtype == torch.float32
    assert rel(W_next, W64) < 1e-5
    assert rel(C_next, C64) < 1e-5


def test_rls_step_float32_inverse():
    sigma, W0, keys, values, _ = make_problem()
    C = initial_inverse(sigma, LAM, MU, dtype=torch.float32)
    K = keys(3)
    V = values(K, W0)
    C_next, W_next = rls_step(C, W0, K, V)
    assert C_next.dtype == torch.float32
    assert W_next.dtype == F64
    A, W_star = closed_form(sigma, LAM, MU, W0, [(K, V)])
    assert rel(W_next, W_star) < 1e-3


def _step_args():
    sigma, W0, keys, values, _ = make_problem()
    C = initial_inverse(sigma, LAM, MU)
    K = keys(3)
    return C, W0, K, values(K, W0)


_BAD_STEP_CASES = {
    "C not square": (lambda C, W, K, V: (C[:, :-1], W, K, V), "C must be square"),
    "C 3-d": (lambda C, W, K, V: (C[None], W, K, V), "C must be 2-dimensional"),
    "W rows": (lambda C, W, K, V: (C, W[:-1], K, V), "W must have d_k = 48 rows"),
    "K rows": (lambda C, W, K, V: (C, W, K[:-1], V), r"K must be \(d_k, u\)"),
    "K 1-d": (lambda C, W, K, V: (C, W, K[:, 0], V), "K must be 2-dimensional"),
    "V rows": (lambda C, W, K, V: (C, W, K, V[:-1]), r"V must be \(u, d_v\)"),
    "V cols": (lambda C, W, K, V: (C, W, K, V[:, :-1]), r"V must be \(u, d_v\)"),
    "V transposed": (lambda C, W, K, V: (C, W, K, V.T), r"V must be \(u, d_v\)"),
    "empty batch": (lambda C, W, K, V: (C, W, K[:, :0], V[:0]), "empty batch"),
    "integer K": (lambda C, W, K, V: (C, W, K.long(), V), "floating dtype"),
    "NaN V": (lambda C, W, K, V: (C, W, K, V * float("nan")), "NaN"),
}


@pytest.mark.parametrize("fn", [rls_step, rls_retract], ids=["step", "retract"])
@pytest.mark.parametrize("case", list(_BAD_STEP_CASES))
def test_rls_shapes_validated(fn, case):
    mangle, match = _BAD_STEP_CASES[case]
    args = mangle(*_step_args())
    with pytest.raises(ValueError, match=match):
        fn(*args)


def test_rls_step_rejects_non_tensor():
    C, W, K, V = _step_args()
    with pytest.raises(TypeError, match="K must be a torch.Tensor"):
        rls_step(C, W, K.tolist(), V)


def test_rls_step_indefinite_inverse_raises():
    C, W, K, V = _step_args()
    with pytest.raises(ValueError, match="reinvert"):
        rls_step(-C, W, K, V)


# --------------------------------------------------------------------------------------------------
# rls_retract
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "index", [0, 1, 14, 28, 29], ids=["first", "second", "middle", "penultimate", "last"]
)
def test_retract_batch_equals_minimiser_without_it(index):
    sigma, W0, C, W, batches = run_history(n_batches=30)
    K, V = batches[index]
    C_wo, W_wo = rls_retract(C, W, K, V)
    remaining = batches[:index] + batches[index + 1 :]
    A, W_star = closed_form(sigma, LAM, MU, W0, remaining)
    assert rel(W_wo, W_star) < 1e-8
    assert rel(C_wo, torch.linalg.inv(A)) < 1e-8
    assert torch.equal(C_wo, C_wo.T)
    # check=False gives the same numbers when the batch is retractable
    C_nc, W_nc = rls_retract(C, W, K, V, check=False)
    assert torch.equal(C_nc, C_wo) and torch.equal(W_nc, W_wo)


@pytest.mark.parametrize(("index", "column"), [(5, 3), (13, 0), (29, 2)])
def test_retract_single_column(index, column):
    sigma, W0, C, W, batches = run_history(n_batches=30)
    K, V = batches[index]
    assert K.shape[1] > column
    C_wo, W_wo = rls_retract(C, W, K[:, column : column + 1], V[column : column + 1])
    keep = [j for j in range(K.shape[1]) if j != column]
    remaining = batches[:index] + [(K[:, keep], V[keep])] + batches[index + 1 :]
    A, W_star = closed_form(sigma, LAM, MU, W0, remaining)
    assert rel(W_wo, W_star) < 1e-8
    assert rel(C_wo, torch.linalg.inv(A)) < 1e-8


def test_retract_several_batches_in_sequence():
    sigma, W0, C, W, batches = run_history(n_batches=30)
    removed = [22, 3, 17]
    for i in removed:
        C, W = rls_retract(C, W, *batches[i])
    remaining = [b for i, b in enumerate(batches) if i not in removed]
    A, W_star = closed_form(sigma, LAM, MU, W0, remaining)
    assert rel(W, W_star) < 1e-8
    assert rel(C, torch.linalg.inv(A)) < 1e-8


def test_retract_does_not_mutate_inputs():
    _, _, C, W, batches = run_history(n_batches=10)
    K, V = batches[4]
    copies = [t.clone() for t in (C, W, K, V)]
    rls_retract(C, W, K, V)
    for before, after in zip(copies, (C, W, K, V), strict=True):
        assert torch.equal(before, after)


def test_retract_float32_weights():
    sigma, W0, C, W, batches = run_history(n_batches=10)
    K, V = batches[4]
    C_ref, W_ref = rls_retract(C, W, K, V)
    C_wo, W_wo = rls_retract(C, W.float(), K.float(), V.float())
    assert W_wo.dtype == torch.float32 and C_wo.dtype == F64
    assert rel(W_wo, W_ref) < 1e-5


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    d_k=st.integers(1, 12),
    d_v=st.integers(1, 5),
    u=st.integers(1, 6),
    lam=st.floats(0.05, 2.0),
    mu=st.floats(0.0, 3.0),
)
def test_step_then_retract_is_identity(seed, d_k, d_v, u, lam, mu):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d_k, 2 * d_k, generator=g, dtype=F64)
    sigma = X @ X.T / (2 * d_k)
    C = initial_inverse(sigma, lam, mu)
    W = torch.randn(d_k, d_v, generator=g, dtype=F64)
    for _ in range(3):  # some history first
        K = torch.randn(d_k, 2, generator=g, dtype=F64)
        C, W = rls_step(C, W, K, torch.randn(2, d_v, generator=g, dtype=F64))
    K = torch.randn(d_k, u, generator=g, dtype=F64)
    V = torch.randn(u, d_v, generator=g, dtype=F64)
    C1, W1 = rls_step(C, W, K, V)
    C2, W2 = rls_retract(C1, W1, K, V, check=False)
    assert rel(C2, C) < 1e-8
    assert torch.linalg.norm(W2 - W) <= 1e-8 * (1 + torch.linalg.norm(W))


def _assert_unchanged_after_raise(C, W, K, V):
    copies = [t.clone() for t in (C, W, K, V)]
    with pytest.raises(RetractionError, match="cannot retract"):
        rls_retract(C, W, K, V)
    for before, after in zip(copies, (C, W, K, V), strict=True):
        assert torch.equal(before, after)


def test_retract_dominating_batch_with_tiny_lam_raises():
    """Sigma is zero on the last half of the coordinates; one batch is the only data there."""
    g = torch.Generator().manual_seed(7)
    half = D_K // 2
    X = torch.zeros(D_K, 64, dtype=F64)
    X[:half] = torch.randn(half, 64, generator=g, dtype=F64)
    sigma = X @ X.T / 64
    lam = 1e-5
    C = initial_inverse(sigma, lam, 1.0)
    W = torch.randn(D_K, D_V, generator=g, dtype=F64)
    batches = []
    for t in range(6):
        K = torch.zeros(D_K, 3, dtype=F64)
        if t == 2:  # the dominating batch: the only keys in coordinates half..half+3
            K[half : half + 4] = 3.0 * torch.randn(4, 3, generator=g, dtype=F64)
        else:
            K[:half] = torch.randn(half, 3, generator=g, dtype=F64)
        V = torch.randn(3, D_V, generator=g, dtype=F64)
        C, W = rls_step(C, W, K, V)
        batches.append((K, V))
    _assert_unchanged_after_raise(C, W, *batches[2])
    # one of its columns alone dominates its direction as well
    K2, V2 = batches[2]
    _assert_unchanged_after_raise(C, W, K2[:, :1], V2[:1])
    # a batch in the well-determined block is still retractable
    rls_retract(C, W, *batches[0])


def test_retract_batch_in_ill_conditioned_direction_raises():
    """lam = 0 and Sigma full rank but with an eigenvalue of 1e-12 relative; the batch is alone there.

    C is only accurate to ~1e-3 here (condition 1e12), so the computed lambda_min(T) is ~1e-3 for a true
    2.5e-13: only the check that is given A can see it.
    """
    g = torch.Generator().manual_seed(11)
    U = random_orthogonal(D_K, g)
    evals = torch.logspace(0, -12, D_K, dtype=F64)
    sigma = U @ torch.diag(evals) @ U.T
    C = initial_inverse(sigma, 0.0, 1.0)
    A = sigma.clone()
    W = torch.randn(D_K, D_V, generator=g, dtype=F64)
    weak = U[:, -1:]
    proj = torch.eye(D_K, dtype=F64) - weak @ weak.T
    batches = []
    for t in range(5):
        if t == 3:
            K = 2.0 * weak
        else:
            K = proj @ torch.randn(D_K, 2, generator=g, dtype=F64)
        V = torch.randn(K.shape[1], D_V, generator=g, dtype=F64)
        C, W = rls_step(C, W, K, V)
        A = A + K @ K.T
        batches.append((K, V))
    K, V = batches[3]
    copies = [t.clone() for t in (C, W, K, V, A)]
    with pytest.raises(RetractionError, match="inherited from C"):
        rls_retract(C, W, K, V, A=A)
    for before, after in zip(copies, (C, W, K, V, A), strict=True):
        assert torch.equal(before, after)


def test_retract_with_A_agrees_on_retractable_batch():
    sigma, W0, C, W, batches = run_history(n_batches=12)
    A, _ = closed_form(sigma, LAM, MU, W0, batches)
    C1, W1 = rls_retract(C, W, *batches[5])
    C2, W2 = rls_retract(C, W, *batches[5], A=A)
    assert torch.equal(C1, C2) and torch.equal(W1, W2)
    with pytest.raises(ValueError, match="A must have the shape of C"):
        rls_retract(C, W, *batches[5], A=A[:-1, :-1])


def test_retract_batch_never_applied_raises():
    _, _, C, W, batches = run_history(n_batches=5)
    K, V = batches[1]
    _assert_unchanged_after_raise(C, W, 100.0 * K, V)
    with pytest.raises(RetractionError):
        rls_retract(C, W, 100.0 * K, V, check=False)


def test_retract_tolerance_validated():
    C, W, K, V = _step_args()
    with pytest.raises(ValueError, match="tol must be >= 0"):
        rls_retract(C, W, K, V, tol=-1.0)


# --------------------------------------------------------------------------------------------------
# drift and re-inversion
# --------------------------------------------------------------------------------------------------


def test_drift_and_reinvert():
    sigma, W0, C, W, batches = run_history(n_batches=10)
    A, _ = closed_form(sigma, LAM, MU, W0, batches)
    C_exact = reinvert(A)
    assert drift(C_exact, A) < 1e-12
    assert rel(C_exact, torch.linalg.inv(A)) < 1e-10
    C_bad = C_exact * (1 + 1e-3)
    assert drift(C_bad, A) == pytest.approx(1e-3, rel=1e-6)
    C32 = reinvert(A, torch.float32)
    assert C32.dtype == torch.float32
    assert drift(C32, A) < 1e-3
    with pytest.raises(ValueError, match="same shape"):
        drift(C_exact[:-1, :-1], A)
    with pytest.raises(ValueError, match="positive definite|singular"):
        reinvert(A - 10 * torch.eye(D_K, dtype=F64) * float(torch.linalg.eigvalsh(A)[-1]))


# --------------------------------------------------------------------------------------------------
# solves shared with the baselines
# --------------------------------------------------------------------------------------------------


def test_solve_spd_matches_direct_solve():
    sigma, *_ = make_problem()
    A = sigma + 1e-3 * torch.eye(D_K, dtype=F64)
    g = torch.Generator().manual_seed(5)
    B = torch.randn(D_K, 7, generator=g, dtype=F64)
    assert rel(solve_spd(A, B), torch.linalg.solve(A, B)) < 1e-10
    b = B[:, 0]
    x = solve_spd(A, b)
    assert x.shape == (D_K,)
    assert rel(x, torch.linalg.solve(A, b)) < 1e-10
    assert solve_spd(A.float(), B).dtype == F64


def test_solve_spd_jitter_fallback(caplog):
    A = torch.diag(torch.tensor([2.0, 1.0, 0.5, 0.0], dtype=F64))  # PSD, singular
    B = torch.tensor([[1.0], [2.0], [3.0], [0.0]], dtype=F64)
    with caplog.at_level(logging.WARNING, logger="rlsedit.linalg"):
        X = solve_spd(A, B)
    assert "jitter" in caplog.text
    assert torch.allclose(A @ X, B, atol=1e-10)


def test_solve_spd_failure_and_validation():
    with pytest.raises(ValueError, match="not positive definite"):
        solve_spd(torch.diag(torch.tensor([1.0, -1.0], dtype=F64)), torch.ones(2, dtype=F64))
    with pytest.raises(ValueError, match="B must have 3 rows"):
        solve_spd(torch.eye(3, dtype=F64), torch.ones(4, dtype=F64))
    with pytest.raises(ValueError, match="A must be square"):
        solve_spd(torch.ones(3, 4, dtype=F64), torch.ones(3, dtype=F64))


def test_memit_delta_matches_explicit_formula():
    sigma, W0, keys, values, g = make_problem()
    K = keys(6)
    E = torch.randn(6, D_V, generator=g, dtype=F64)
    mu2 = 15000.0
    delta = memit_delta(sigma, K, E, math.sqrt(mu2))
    assert delta.shape == (D_K, D_V)
    ref = torch.linalg.lstsq(mu2 * sigma + K @ K.T, K @ E).solution
    assert rel(delta, ref) < 1e-8
    # MEMIT is the first RLS step from C_0 = (mu^2 Sigma)^{-1} with V = K^T W0 + E
    C0 = initial_inverse(sigma, 0.0, math.sqrt(mu2))
    _, W1 = rls_step(C0, W0, K, K.T @ W0 + E)
    assert rel(W1 - W0, delta) < 1e-7
    with pytest.raises(ValueError, match=r"E must be \(u, d_v\)"):
        memit_delta(sigma, K, E[:-1], 1.0)
    with pytest.raises(ValueError, match=r"K must be \(d_k, u\)"):
        memit_delta(sigma, K[:-1], E, 1.0)


def test_nullspace_projector_on_constructed_spectrum():
    g = torch.Generator().manual_seed(2)
    U = random_orthogonal(D_K, g)
    evals = torch.cat(
        [
            torch.logspace(1, -0.9, 30, dtype=F64),  # 10 .. 0.126: above 1e-2 * 10 = 0.1
            torch.logspace(-1.1, -8, 15, dtype=F64),  # below the threshold
            torch.zeros(3, dtype=F64),
        ]
    )
    sigma = U @ torch.diag(evals) @ U.T
    # relative: below 1e-2 x lambda_max = 0.1
    P, dim = nullspace_projector(sigma, threshold=1e-2, relative=True)
    assert dim == 18
    # absolute (AlphaEdit's get_project: singular values below 2e-2): 0.0794 .. 1e-8 and the zeros
    # are 10^-1.1 .. : count those below 0.02 directly from the spectrum
    P_abs, dim_abs = nullspace_projector(sigma, threshold=2e-2)
    assert dim_abs == int((evals < 2e-2).sum()) and 3 < dim_abs < 18
    torch.testing.assert_close(P_abs, U[:, evals < 2e-2] @ U[:, evals < 2e-2].T, atol=1e-10, rtol=0)
    assert float(torch.linalg.norm(P_abs @ sigma)) < 2e-2 * dim_abs**0.5
    assert P.shape == (D_K, D_K) and P.dtype == F64
    assert torch.allclose(P, P.T, atol=1e-14)
    assert torch.allclose(P @ P, P, atol=1e-12)
    assert float(torch.trace(P)) == pytest.approx(18, abs=1e-9)
    big = U[:, :30]
    small = U[:, 30:]
    assert float(torch.linalg.norm(P @ big)) < 1e-10
    assert torch.allclose(P @ small, small, atol=1e-10)
    # P kills the keys' span that Sigma knows
    assert float(torch.linalg.norm(P @ sigma)) < 0.1 * 18**0.5
    P32, dim32 = nullspace_projector(sigma.float(), threshold=1e-2, relative=True)
    assert dim32 == 18 and P32.dtype == torch.float32
    P0, dim0 = nullspace_projector(torch.zeros(5, 5, dtype=F64))
    assert dim0 == 5 and torch.allclose(P0, torch.eye(5, dtype=F64))
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        nullspace_projector(sigma, threshold=-1.0)


def test_alphaedit_delta_matches_explicit_formula():
    sigma, W0, keys, values, g = make_problem()
    P, dim = nullspace_projector(sigma, threshold=1e-2)
    assert 0 < dim < D_K
    Kp = keys(10)
    KpKpT = Kp @ Kp.T
    K = keys(4)
    E = torch.randn(4, D_V, generator=g, dtype=F64)
    alpha = 10.0
    delta = alphaedit_delta(P, KpKpT, K, E, alpha)
    M = P @ (KpKpT + K @ K.T) + alpha * torch.eye(D_K, dtype=F64)
    ref = torch.linalg.lstsq(M, P @ K @ E).solution
    assert delta.shape == (D_K, D_V)
    assert rel(delta, ref) < 1e-8
    # the update lives in the null space: it leaves the preserved keys' outputs alone
    assert rel(P @ delta, delta) < 1e-10
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        alphaedit_delta(P, KpKpT, K, E, -1.0)
    with pytest.raises(ValueError, match="KpKpT must be"):
        alphaedit_delta(P, KpKpT[:-1, :-1], K, E, alpha)
    with pytest.raises(ValueError, match="singular"):
        alphaedit_delta(
            torch.zeros(3, 3, dtype=F64),
            torch.zeros(3, 3, dtype=F64),
            torch.ones(3, 1, dtype=F64),
            torch.ones(1, 2, dtype=F64),
            0.0,
        )


def test_rome_rank_one_matches_explicit_formula():
    sigma, W0, keys, values, g = make_problem()
    C_inv = torch.linalg.inv(sigma + 1e-2 * torch.eye(D_K, dtype=F64))
    k = keys(1)[:, 0]
    v = torch.randn(D_V, generator=g, dtype=F64)
    delta = rome_rank_one(C_inv, W0, k, v)
    assert delta.shape == (D_K, D_V)
    assert torch.linalg.matrix_rank(delta) == 1
    assert rel(k @ (W0 + delta), v) < 1e-10
    # the minimum-norm solution of k^T Delta = r in the metric C = C_inv^{-1}:
    # Delta = C_inv k lambda^T, lambda = r / (k^T C_inv k), compared via a direct solve
    C = torch.linalg.inv(C_inv)
    left = torch.linalg.solve(C, k)
    ref = torch.outer(left, v - W0.T @ k) / (k @ left)
    assert rel(delta, ref) < 1e-8
    # float32 weights: computed in the promoted dtype
    assert rome_rank_one(C_inv, W0.float(), k.float(), v.float()).dtype == F64
    with pytest.raises(ValueError, match=r"k must have shape \(48,\)"):
        rome_rank_one(C_inv, W0, k[:-1], v)
    with pytest.raises(ValueError, match=r"v must have shape \(20,\)"):
        rome_rank_one(C_inv, W0, k, v[:-1])
    with pytest.raises(ValueError, match="not positive"):
        rome_rank_one(-C_inv, W0, k, v)


# --------------------------------------------------------------------------------------------------
# long-run drift
# --------------------------------------------------------------------------------------------------


DRIFT_CONFIGS = {
    # name: (spectral decay of Sigma's scales, lam, number of key directions the edits use)
    "moderate": (3.0, 0.1, 64),
    "ill-conditioned": (6.0, 0.01, 32),
}


def _drift_run(
    dtype: torch.dtype,
    decay: float,
    lam: float,
    key_dims: int,
    n_updates: int = 10_000,
    d_k: int = 64,
    d_v: int = 32,
    seed: int = 123,
):
    """Run ``n_updates`` steps of 1-4 keys; return ``[(t, drift)]`` every 1000 steps, cond(A), failure.

    Keys follow Sigma's law restricted to its ``key_dims`` leading directions, so with
    ``key_dims < d_k`` the remaining directions are held only by ``lam^2 + mu^2 sigma_i`` and ``A`` stays
    ill-conditioned.
    """
    g = torch.Generator().manual_seed(seed)
    U = random_orthogonal(d_k, g)
    scales = torch.exp(-torch.linspace(0.0, decay, d_k, dtype=F64))
    n = 4 * d_k
    X = U @ (scales[:, None] * torch.randn(d_k, n, generator=g, dtype=F64))
    sigma = X @ X.T / n
    mu = 2.0
    A = lam**2 * torch.eye(d_k, dtype=F64) + mu**2 * sigma
    C = initial_inverse(sigma, lam, mu, dtype=dtype)
    W = torch.randn(d_k, d_v, generator=g, dtype=F64).to(dtype)
    key_scales = scales.clone()
    key_scales[key_dims:] = 0.0
    sizes = torch.randint(1, 5, (n_updates,), generator=g).tolist()
    history = []
    failure = None
    for t, u in enumerate(sizes, start=1):
        K = U @ (key_scales[:, None] * torch.randn(d_k, u, generator=g, dtype=F64))
        V = K.T @ W.to(F64) + torch.randn(u, d_v, generator=g, dtype=F64)
        A += K @ K.T
        try:
            C, W = rls_step(C, W, K.to(dtype), V.to(dtype))
        except ValueError as exc:  # float32 C can lose definiteness when A is ill-conditioned
            failure = f"update {t}: {exc}"
            break
        if t % 1000 == 0:
            history.append((t, drift(C, A)))
    return history, float(torch.linalg.cond(A)), failure, A


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_drift_estimate_close_to_exact(seed: int) -> None:
    """The probe estimate of ||A C - I||_F / sqrt(d) is within a factor 1.5 of the exact value (64 probes),
    deterministic per seed, and 0 for an exact identity residual."""
    g = torch.Generator().manual_seed(seed)
    d = 80
    X = torch.randn(d, d, generator=g, dtype=torch.float64)
    A = X @ X.T + d * torch.eye(d, dtype=torch.float64)
    C = torch.linalg.inv(A) + 1e-6 * torch.randn(d, d, generator=g, dtype=torch.float64)
    exact = drift(C, A)
    est = drift_estimate(C, A, probes=64, seed=seed)
    assert exact / 1.5 < est < exact * 1.5
    assert est == drift_estimate(C, A, probes=64, seed=seed)
    eye = torch.eye(d, dtype=torch.float64)
    assert drift_estimate(eye, eye) == 0.0
    with pytest.raises(ValueError, match="probes"):
        drift_estimate(C, A, probes=0)


def test_drift_over_ten_thousand_updates():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threading only adds overhead and noise
    try:
        results = {}
        for name, (decay, lam, key_dims) in DRIFT_CONFIGS.items():
            for dtype in (torch.float64, torch.float32):
                start = time.perf_counter()
                history, cond, failure, A = _drift_run(dtype, decay, lam, key_dims)
                elapsed = time.perf_counter() - start
                for t, value in history:
                    logger.info(
                        "drift [%s, %s] after %5d updates: ||A C - I||_F / sqrt(d) = %.3e",
                        name,
                        dtype,
                        t,
                        value,
                    )
                final = history[-1][1] if history else float("nan")
                floor = drift(reinvert(A, dtype), A)
                logger.info(
                    "drift [%s, %s]: final %.3e, max %.3e, cond(A) %.2e, fresh re-inversion %.3e, "
                    "failure %s, %.1f s",
                    name,
                    dtype,
                    final,
                    max((v for _, v in history), default=float("nan")),
                    cond,
                    floor,
                    failure,
                    elapsed,
                )
                results[name, dtype] = (history, failure)
    finally:
        torch.set_num_threads(threads)
    for name in DRIFT_CONFIGS:
        history, failure = results[name, torch.float64]
        assert failure is None
        assert len(history) == 10
        assert max(v for _, v in history) < 1e-6
    history, failure = results["moderate", torch.float32]
    assert failure is None and max(v for _, v in history) < 1e-3
