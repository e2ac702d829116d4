"""The RLSEdit recursion: ``C_0``, the Woodbury update and downdate of ``C_t = A_t^{-1}``, its drift
and re-inversion (notation: :mod:`rlsedit.linalg`)."""

from __future__ import annotations

import logging
import math

import torch

from rlsedit.linalg.checks import (
    _check_batch,
    _check_finite,
    _check_same_device,
    _check_scalar,
    _check_square,
    _cholesky_pd,
    _symmetrise,
)

logger = logging.getLogger(__name__)

Tensor = torch.Tensor


__all__ = [
    "RetractionError",
    "anchor_matrix",
    "drift",
    "drift_estimate",
    "initial_inverse",
    "reinvert",
    "rls_retract",
    "rls_step",
]


class RetractionError(ValueError):
    """A batch cannot be retracted stably: it dominates some directions of the objective.

    Raised by :func:`rls_retract` before anything is computed that a caller could mistake for a
    result; the inputs are left untouched.
    """


def anchor_matrix(sigma: torch.Tensor, lam: float, mu: float) -> torch.Tensor:
    """``A_0 = lam^2 I + mu^2 Sigma`` (``(d_k, d_k)``, float64, on Sigma's device; Sigma symmetrised):
    the matrix :func:`initial_inverse` inverts (RLSEdit's anchor)."""
    s64 = sigma.to(torch.float64)
    A0 = (mu**2) * (0.5 * (s64 + s64.T))
    A0.diagonal().add_(lam**2)
    return A0


def initial_inverse(
    sigma: Tensor,
    lam: float,
    mu: float,
    dtype: torch.dtype = torch.float64,
    *,
    compute_dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Return ``C_0 = (lam^2 I + mu^2 Sigma)^{-1}``.

    Args:
        sigma: ``(d_k, d_k)`` uncentred key second moment (symmetrised here).
        lam: Tikhonov weight ``lam >= 0`` (the objective uses ``lam^2``).
        mu: anchor weight ``mu >= 0`` (the objective uses ``mu^2``).
        dtype: dtype of the returned ``C_0``.
        compute_dtype: dtype of the Cholesky inversion (float64 by default; pass float32 on devices
            without float64 support).

    Returns:
        ``(d_k, d_k)`` symmetric positive definite ``C_0`` in ``dtype`` on ``sigma.device``.

    Raises:
        ValueError: bad shape or values, or ``lam^2 I + mu^2 Sigma`` is not (numerically) positive
            definite, e.g. ``lam = 0`` with a singular ``Sigma``.
    """
    _check_square("sigma", sigma)
    lam = _check_scalar("lam", lam)
    mu = _check_scalar("mu", mu)
    if lam == 0 and mu == 0:
        raise ValueError("lam and mu are both zero: lam^2 I + mu^2 Sigma is the zero matrix")
    _check_finite("sigma", sigma)
    d_k = sigma.shape[0]
    M = _symmetrise(sigma.to(compute_dtype)) * (mu * mu)
    M.diagonal().add_(lam * lam)
    L = _cholesky_pd(M, f"lam^2 I + mu^2 Sigma (lam={lam:g}, mu={mu:g}, d_k={d_k})")
    C0 = _symmetrise(torch.cholesky_inverse(L))
    return C0.to(dtype)


#: Rows per panel of the symmetric rank-``u`` update in :func:`rls_step`.
_PANEL_ROWS = 1024


def _sym_rank_update(
    C: Tensor, G: Tensor, out: Tensor, alpha: float = -1.0, panel: int | None = None
) -> Tensor:
    """``out = C + alpha G G^T`` for symmetric ``C`` (``(d, d)``) and ``G`` (``(d, u)``), exactly symmetric.

    Works by row panels of the upper triangle: panel ``[i0, i1)`` computes
    ``C[i0:i1, i0:] + alpha G_i G[i0:]^T`` with one ``addmm`` and writes it to ``out[i0:i1, i0:]`` and,
    transposed, to ``out[i0:, i0:i1]``. Only ``C``'s upper triangle is read (a ``C`` that is not exactly
    symmetric is taken as its upper triangle, with the diagonal blocks averaged with their transposes),
    half the FLOPs of the full product are spent, no ``(d, d)`` temporary is made, and ``out`` may be ``C``
    itself (a panel only writes lower-triangle entries that no later panel reads).
    """
    d = C.shape[0]
    panel = panel or _PANEL_ROWS
    for i0 in range(0, d, panel):
        i1 = min(d, i0 + panel)
        P = torch.addmm(C[i0:i1, i0:], G[i0:i1], G[i0:].mT, alpha=alpha)  # (i1 - i0, d - i0)
        diag = P[:, : i1 - i0]
        diag.copy_(_symmetrise(diag))
        out[i0:i1, i0:] = P
        out[i1:, i0:i1] = P[:, i1 - i0 :].mT
    return out


def rls_step(
    C: Tensor, W: Tensor, K: Tensor, V: Tensor, *, inplace: bool = False, out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Apply one batch of the soft recursive least-squares recursion.

    With ``F = C K``, ``S = I_u + K^T F = R^T R`` (``R`` upper), ``G = F R^{-1}``:
    ``C_next = C - G G^T`` and ``W_next = W + C_next K (V - K^T W)`` where ``C_next K = G R^{-T}``.
    The cost is one ``(d_k, d_k) x (d_k, u)`` product and one symmetric rank-``u`` update of ``C`` (upper
    triangle, by panels: ``~3 d_k^2 u`` FLOPs in all, one read and one write of ``C``, no ``(d_k, d_k)``
    temporary); there is no ``O(d_k^3)`` operation. ``C_next`` is exactly symmetric.

    Args:
        C: ``(d_k, d_k)`` current inverse ``A_{t-1}^{-1}``; its dtype is the computation dtype.
        W: ``(d_k, d_v)`` current weights (any float dtype).
        K: ``(d_k, u)`` keys of the batch, ``u >= 1``.
        V: ``(u, d_v)`` *target* values of the batch (not the innovation ``V - K^T W``).

        inplace: write ``C_next`` into ``C`` (saves allocating a second ``(d_k, d_k)`` matrix; ``C`` is
            then lost, also when ``W``'s update fails afterwards). Default: ``C`` is not modified.
        out: a ``(d_k, d_k)`` row-major buffer of ``C``'s dtype and device, distinct from ``C``, to write
            ``C_next`` into (double buffering: a caller that alternates two buffers allocates nothing per
            batch; a fresh 1.6 GiB matrix per step at ``d_k = 14336`` costs its page faults every time).
            Its contents are overwritten; ``C`` is not modified.

    Returns:
        ``(C_next, W_next)``: ``(d_k, d_k)`` in ``C.dtype`` and ``(d_k, d_v)`` in ``W.dtype``.
        ``W``, ``K`` and ``V`` are not modified, nor is ``C`` unless ``inplace``.

    Raises:
        ValueError: inconsistent shapes, an empty batch, non-finite keys or values, or ``S`` not
            positive definite (``C`` has lost definiteness: re-invert it with :func:`reinvert`).
    """
    _check_batch(C, W, K, V)
    if out is not None:
        _check_out(C, out, inplace)
    dt = C.dtype
    Kc = K.to(dt)
    Wc = W.to(dt)
    F = C @ Kc  # (d_k, u): the only product with C
    S = Kc.mT @ F
    S = _symmetrise(S)
    S.diagonal().add_(1.0)
    R, info = torch.linalg.cholesky_ex(S, upper=True)
    if int(info) != 0:
        raise ValueError(
            "I + K^T C K is not positive definite: C has lost positive definiteness "
            "(numerical drift); re-invert it with reinvert(A)"
        )
    G = torch.linalg.solve_triangular(R, F, upper=True, left=False)  # F R^{-1}
    CK = torch.linalg.solve_triangular(R.mT, G, upper=False, left=False)  # G R^{-T} = C_next K
    innovation = V.to(dt) - Kc.mT @ Wc  # (u, d_v)
    W_next = W + (CK @ innovation).to(W.dtype)
    # last: C is intact on failure; a new C_next is row-major whatever C's layout (gemm kernels, hence the
    # last bits of every later step, depend on it: a state must compute the same before and after a save)
    if out is None:
        out = C if inplace else torch.empty(C.shape, dtype=C.dtype, device=C.device)
    C_next = _sym_rank_update(C, G, out)
    return C_next, W_next


def _check_out(C: Tensor, out: Tensor, inplace: bool) -> None:
    """``out`` must be a row-major ``C``-shaped buffer of ``C``'s dtype and device that shares no memory
    with ``C`` (``inplace`` is the way to overwrite ``C``)."""
    if inplace:
        raise ValueError("give either inplace=True or out=, not both")
    if not isinstance(out, Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != C.shape or out.dtype != C.dtype or out.device != C.device:
        raise ValueError(
            f"out must match C: shape {tuple(C.shape)}, {C.dtype} on {C.device}; got shape "
            f"{tuple(out.shape)}, {out.dtype} on {out.device}"
        )
    if not out.is_contiguous():
        raise ValueError("out must be contiguous (row-major)")
    lo, hi = C.data_ptr(), C.data_ptr() + C.numel() * C.element_size()
    olo, ohi = out.data_ptr(), out.data_ptr() + out.numel() * out.element_size()
    if olo < hi and lo < ohi:
        raise ValueError("out shares memory with C; use inplace=True to overwrite C")


def _default_retract_tol(dtype: torch.dtype) -> float:
    eps = torch.finfo(dtype).eps
    return max(1e-10, 1e3 * eps)


def _inherited_error(A: Tensor, C: Tensor, F: Tensor, K: Tensor) -> float:
    """``||F^T (A F - K)||_2`` for ``F = C K``: first-order error of ``K^T C K`` vs ``K^T A^{-1} K``."""
    hi = torch.promote_types(torch.promote_types(A.dtype, C.dtype), torch.float64)
    Fh = F.to(hi)
    E = A.to(hi) @ Fh - K.to(hi)  # (d_k, u) = (A C - I) K
    return float(torch.linalg.matrix_norm(Fh.mT @ E, ord=2))


def rls_retract(
    C: Tensor,
    W: Tensor,
    K: Tensor,
    V: Tensor,
    check: bool = True,
    *,
    tol: float | None = None,
    A: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Remove a recorded batch ``(K, V)`` from the objective, using the current ``W``.

    With ``F = C K``, ``T = I_u - K^T F = R^T R``, ``H = F R^{-1}``:
    ``C' = C + H H^T`` and ``W' = W - H R^{-T} (V - K^T W)``. If ``C = A^{-1}`` and ``W`` minimises the
    objective containing the batch, then ``C' = (A - K K^T)^{-1}`` and ``W'`` is the minimiser of the
    objective without it (not the weights as they were before the batch was applied). Any recorded
    batch can be retracted, as can a subset of its columns (e.g. a single request).

    ``T``'s eigenvalues lie in ``(0, 1]`` in exact arithmetic; an eigenvalue near zero means the batch
    is (almost) the only data in some direction and its removal would divide by ~0.

    Args:
        C: ``(d_k, d_k)`` current inverse; its dtype is the computation dtype.
        W: ``(d_k, d_v)`` current weights (any float dtype).
        K: ``(d_k, u)`` the recorded keys of the batch, ``u >= 1``.
        V: ``(u, d_v)`` the recorded target values of the batch.
        check: if true, compute the smallest eigenvalue of ``T`` (``u x u``, cheap) and refuse when it
            is below the threshold (see below). A failed factorisation of ``T`` is refused either way.
        tol: floor on ``lambda_min(T)`` (relative to ``T``'s identity part, i.e. to 1). Default:
            ``max(1e-10, 1e3 eps)`` of ``C``'s dtype (1e-10 for float64, ~1.2e-4 for float32).
        A: optional ``(d_k, d_k)`` accumulated ``lam^2 I + mu^2 Sigma + sum K K^T`` (the matrix ``C``
            approximates, float64). When given and ``check`` is true, the check also accounts for the
            error ``C`` has accumulated (one more ``d_k^2 u`` product). Recommended when ``A`` is
            ill-conditioned.

    The threshold actually applied to the computed ``lambda_min(T)`` is
    ``max(tol, rounding, 10 * inherited)``:

    * ``rounding = 10 eps ||s||^2`` with ``s_j = sum_l |K_lj| sqrt(C_ll)``, an ``O(d_k u)`` bound on the
      rounding error of ``K^T C K`` (a positive definite ``C`` has ``|C_lm| <= sqrt(C_ll C_mm)``).
      Without it, a batch alone in a direction where ``C`` is huge (tiny ``lam``, ``Sigma`` singular
      there) gives a computed ``lambda_min(T)`` of pure rounding noise (1e-5 for a true 1e-12).
    * ``inherited = ||F^T (A F - K)||_2`` (only with ``A``): the first-order error of ``K^T C K`` due to
      ``C != A^{-1}``. When ``A`` is ill-conditioned (condition 1e12), ``C``'s own error dominates and
      the computed ``lambda_min(T)`` can be 1e-3 for a true 2.5e-13; only this term sees it.

    Returns:
        ``(C_without, W_without)`` in ``C.dtype`` and ``W.dtype``. The inputs are not modified.

    Raises:
        ValueError: inconsistent shapes or an empty batch.
        RetractionError: ``T`` is near-singular or indefinite; nothing is changed.
    """
    _, _, u = _check_batch(C, W, K, V)
    if A is not None:
        _check_square("A", A)
        if A.shape != C.shape:
            raise ValueError(f"A must have the shape of C {tuple(C.shape)}, got {tuple(A.shape)}")
        _check_same_device(A=A, C=C)
    dt = C.dtype
    if tol is None:
        tol = _default_retract_tol(dt)
    tol = _check_scalar("tol", tol)
    Kc = K.to(dt)
    Wc = W.to(dt)
    F = C @ Kc
    T = -_symmetrise(Kc.mT @ F)
    T.diagonal().add_(1.0)
    if check:
        hi = torch.promote_types(dt, torch.float64)
        lam_min = float(torch.linalg.eigvalsh(T.to(hi))[0])
        scale = (Kc.abs() * torch.diagonal(C).clamp_min(0).sqrt()[:, None]).sum(0)  # (u,)
        rounding = 10.0 * torch.finfo(dt).eps * float(scale.square().sum())
        inherited = 0.0
        if A is not None:
            inherited = _inherited_error(A, C, F, K)
        threshold = max(tol, rounding, 10.0 * inherited)
        if not lam_min >= threshold:
            raise RetractionError(
                f"cannot retract this batch of {u} key(s): I - K^T C K has smallest eigenvalue "
                f"{lam_min:.3e} < {threshold:.1e} (tol {tol:.1e}, rounding {rounding:.1e}, error inherited "
                f"from C {inherited:.1e}); the batch dominates some directions of the objective "
                "(or was never applied), so removing it is numerically unstable"
            )
    R, info = torch.linalg.cholesky_ex(T, upper=True)
    if int(info) != 0:
        raise RetractionError(
            f"cannot retract this batch of {u} key(s): I - K^T C K is not positive definite "
            "(the batch dominates some directions of the objective, or was never applied)"
        )
    H = torch.linalg.solve_triangular(R, F, upper=True, left=False)  # F R^{-1}
    C_without = _sym_rank_update(C, H, torch.empty(C.shape, dtype=C.dtype, device=C.device), alpha=1.0)
    CK = torch.linalg.solve_triangular(R.mT, H, upper=False, left=False)  # H R^{-T} = C' K
    residual = V.to(dt) - Kc.mT @ Wc
    W_without = W - (CK @ residual).to(W.dtype)
    return C_without, W_without


def _check_inverse_pair(C: Tensor, A: Tensor) -> torch.dtype:
    """Validate ``C`` and ``A`` as same-shape square matrices on one device; return the float64-or-wider
    dtype the drift is computed in."""
    _check_square("C", C)
    _check_square("A", A)
    if C.shape != A.shape:
        raise ValueError(f"C and A must have the same shape, got {tuple(C.shape)} and {tuple(A.shape)}")
    _check_same_device(C=C, A=A)
    return torch.promote_types(torch.promote_types(C.dtype, A.dtype), torch.float64)


def drift(C: Tensor, A: Tensor) -> float:
    """Numerical drift of ``C`` as an inverse of ``A``: ``||A C - I||_F / sqrt(d)``.

    The Frobenius norm is divided by ``||I||_F = sqrt(d)``, so the figure is a root-mean-square over
    the ``d`` columns of ``A C - I`` (each column's residual norm), comparable across sizes. Computed in
    float64 (``O(d^3)``: call it periodically, not every step).

    Args:
        C: ``(d, d)`` the carried inverse.
        A: ``(d, d)`` the accumulated ``lam^2 I + mu^2 Sigma + sum K K^T``.

    Returns:
        The drift as a Python float (0 for an exact inverse).
    """
    dt = _check_inverse_pair(C, A)
    d = A.shape[0]
    R = A.to(dt) @ C.to(dt)
    R.diagonal().sub_(1.0)
    return float(torch.linalg.matrix_norm(R)) / math.sqrt(d)


def drift_estimate(C: Tensor, A: Tensor, probes: int = 32, seed: int = 0) -> float:
    """A randomised estimate of :func:`drift` in ``O(d^2 probes)`` instead of ``O(d^3)``.

    For ``x ~ N(0, I_d)``, ``E ||M x||^2 = ||M||_F^2``; with ``M = A C - I`` and ``probes`` independent
    columns ``X`` (``(d, probes)``, seeded), the estimate is ``sqrt(mean_j ||M x_j||^2 / d)``. Its relative
    spread is about ``1 / sqrt(2 probes)`` when ``M``'s mass is spread over many directions and at most
    ``sqrt(2 / probes)``: enough to compare the drift with a bound orders of magnitude away.

    Args:
        C: ``(d, d)`` the carried inverse. A: ``(d, d)`` the accumulated matrix it inverts.
        probes: number of random probe vectors (>= 1).
        seed: seeds the probes (the estimate is deterministic for a given seed).

    Returns:
        The estimated drift as a Python float.
    """
    dt = _check_inverse_pair(C, A)
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    d = A.shape[0]
    g = torch.Generator(device="cpu").manual_seed(seed)
    X = torch.randn(d, probes, generator=g, dtype=dt).to(A.device)
    R = A.to(dt) @ (C.to(dt) @ X) - X  # (d, probes)
    return math.sqrt(float(R.pow(2).sum()) / probes / d)


def reinvert(
    A: Tensor,
    dtype: torch.dtype = torch.float64,
    *,
    compute_dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Recompute ``C = A^{-1}`` from scratch by Cholesky (when :func:`drift` passes a bound).

    Args:
        A: ``(d, d)`` symmetric positive definite (symmetrised here).
        dtype: dtype of the returned ``C``.
        compute_dtype: dtype of the factorisation (float64 by default).

    Returns:
        ``(d, d)`` symmetric ``A^{-1}`` in ``dtype`` on ``A.device``.

    Raises:
        ValueError: ``A`` not square, or not numerically positive definite.
    """
    _check_square("A", A)
    _check_finite("A", A)
    L = _cholesky_pd(_symmetrise(A.to(compute_dtype)), "A")
    return _symmetrise(torch.cholesky_inverse(L)).to(dtype)
