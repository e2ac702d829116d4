"""Pure tensor linear algebra for closed-form knowledge editing.

Notation (one edited layer, see ``ARCHITECTURE.md``):

* ``W``  -- ``(d_k, d_v)``: a key row ``k^T`` maps to the value ``k^T W``.
* ``K``  -- ``(d_k, u)``: the keys of one edit batch, one column per fact.
* ``V``  -- ``(u, d_v)``: the *target* values of the batch (not the innovation).
* ``Sigma`` -- ``(d_k, d_k)``: uncentred second moment of the layer's keys, ``K_0 K_0^T := Sigma``.

RLSEdit minimises, after ``t`` batches,

    J_t(W) = sum_s ||K_s^T W - V_s||_F^2 + lam^2 ||W - W_0||_F^2 + mu^2 ||K_0^T (W - W_0)||_F^2

whose minimiser is ``W_t = A_t^{-1} ((lam^2 I + mu^2 Sigma) W_0 + sum_s K_s V_s)`` with
``A_t = lam^2 I + mu^2 Sigma + sum_s K_s K_s^T``. The recursion carries ``C_t = A_t^{-1}`` and updates
it (:func:`rls_step`) or downdates it (:func:`rls_retract`) at a cost of ``O(d_k^2 u)`` per batch.

The MEMIT, AlphaEdit and ROME solves are written in the same notation.

Every function here is pure: inputs are never modified, results are new tensors on the inputs'
device. Nothing here knows about models.
"""

from __future__ import annotations

import logging
import math

import torch

__all__ = [
    "RetractionError",
    "alphaedit_delta",
    "drift",
    "drift_estimate",
    "initial_inverse",
    "memit_delta",
    "nullspace_projector",
    "reinvert",
    "rls_retract",
    "rls_step",
    "rome_rank_one",
    "solve_spd",
]

logger = logging.getLogger(__name__)

Tensor = torch.Tensor


class RetractionError(ValueError):
    """A batch cannot be retracted stably: it dominates some directions of the objective.

    Raised by :func:`rls_retract` before anything is computed that a caller could mistake for a
    result; the inputs are left untouched.
    """


# --------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------


def _check_tensor(name: str, x: object, ndim: int) -> Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {tuple(x.shape)}")
    if not (x.is_floating_point()):
        raise ValueError(f"{name} must have a real floating dtype, got {x.dtype}")
    return x


def _check_square(name: str, x: object) -> Tensor:
    x = _check_tensor(name, x, 2)
    if x.shape[0] != x.shape[1]:
        raise ValueError(f"{name} must be square, got shape {tuple(x.shape)}")
    return x


def _check_finite(name: str, x: Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite entries")


def _check_scalar(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a real number, got {value!r}") from exc
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _check_same_device(**tensors: Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on the same device, got {listing}")


def _check_batch(C: Tensor, W: Tensor, K: Tensor, V: Tensor) -> tuple[int, int, int]:
    """Validate the ``(C, W, K, V)`` quadruple of an RLS update; return ``(d_k, d_v, u)``."""
    _check_square("C", C)
    _check_tensor("W", W, 2)
    _check_tensor("K", K, 2)
    _check_tensor("V", V, 2)
    d_k = C.shape[0]
    if W.shape[0] != d_k:
        raise ValueError(f"W must have d_k = {d_k} rows to match C {tuple(C.shape)}, got {tuple(W.shape)}")
    d_v = W.shape[1]
    if K.shape[0] != d_k:
        raise ValueError(
            f"K must be (d_k, u) with d_k = {d_k} to match C {tuple(C.shape)}, got {tuple(K.shape)}"
        )
    u = K.shape[1]
    if u == 0:
        raise ValueError("empty batch: K has no columns (u = 0)")
    if V.shape != (u, d_v):
        raise ValueError(
            f"V must be (u, d_v) = ({u}, {d_v}) to match K {tuple(K.shape)} and W {tuple(W.shape)}, "
            f"got {tuple(V.shape)}"
        )
    _check_same_device(C=C, W=W, K=K, V=V)
    _check_finite("K", K)
    _check_finite("V", V)
    return d_k, d_v, u


def _symmetrise(x: Tensor) -> Tensor:
    """``(x + x^T) / 2``, row-major (contiguous) whatever ``x``'s layout."""
    return (0.5 * (x + x.mT)).contiguous()


def _cholesky_pd(M: Tensor, what: str) -> Tensor:
    """Lower Cholesky factor of a symmetric ``M`` that must be numerically positive definite.

    Besides a failed factorisation, a pivot ``L_ii^2`` at rounding level relative to the largest
    diagonal entry counts as singular (a pivot is never smaller than the smallest eigenvalue, so such a
    pivot proves a condition number of at least ``1 / (n eps)``).
    """
    n = M.shape[0]
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) != 0:
        raise ValueError(f"{what} is not positive definite (Cholesky failed at column {int(info)} of {n})")
    pivots = torch.diagonal(L).square()
    scale = torch.diagonal(M).abs().max()
    eps = torch.finfo(M.dtype).eps
    if bool(pivots.min() <= n * eps * scale):
        raise ValueError(
            f"{what} is numerically singular (smallest Cholesky pivot {float(pivots.min()):.3e} "
            f"vs largest diagonal entry {float(scale):.3e})"
        )
    return L


# --------------------------------------------------------------------------------------------------
# RLSEdit: initial inverse, update, downdate, drift control
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# solves shared with the baselines
# --------------------------------------------------------------------------------------------------


def solve_spd(A: Tensor, B: Tensor, *, max_rel_jitter: float | None = None) -> Tensor:
    """Solve ``A X = B`` for a symmetric positive (semi-)definite ``A``.

    ``A`` is symmetrised and Cholesky-factorised. If the factorisation fails, a jitter
    ``delta * mean(diag(A))`` is added to the diagonal, with ``delta`` growing from ``10 eps`` by
    factors of 100 up to ``max_rel_jitter`` (default ``sqrt(eps)``); each retry is logged as a warning.

    Args:
        A: ``(d, d)`` symmetric positive definite.
        B: ``(d,)`` or ``(d, m)`` right-hand side.
        max_rel_jitter: largest jitter, relative to the mean diagonal of ``A``.

    Returns:
        ``X`` with the shape of ``B``, in the promoted dtype of ``A`` and ``B``.

    Raises:
        ValueError: bad shapes, non-finite input, or no jitter up to the bound makes ``A`` factorisable.
    """
    _check_square("A", A)
    if not isinstance(B, torch.Tensor) or B.ndim not in (1, 2):
        shape = tuple(B.shape) if isinstance(B, torch.Tensor) else type(B).__name__
        raise ValueError(f"B must be a 1- or 2-dimensional tensor, got {shape}")
    if not B.is_floating_point():
        raise ValueError(f"B must have a real floating dtype, got {B.dtype}")
    d = A.shape[0]
    if B.shape[0] != d:
        raise ValueError(f"B must have {d} rows to match A {tuple(A.shape)}, got {tuple(B.shape)}")
    _check_same_device(A=A, B=B)
    _check_finite("A", A)
    _check_finite("B", B)
    dt = torch.promote_types(A.dtype, B.dtype)
    M = _symmetrise(A.to(dt))
    rhs = B.to(dt)
    vector = rhs.ndim == 1
    if vector:
        rhs = rhs.unsqueeze(1)
    eps = torch.finfo(dt).eps
    if max_rel_jitter is None:
        max_rel_jitter = math.sqrt(eps)
    max_rel_jitter = _check_scalar("max_rel_jitter", max_rel_jitter)
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) != 0:
        scale = float(torch.diagonal(M).abs().mean())
        if scale == 0.0:
            scale = 1.0
        delta = 10 * eps
        while int(info) != 0 and delta <= max_rel_jitter:
            logger.warning(
                "solve_spd: matrix (d=%d) not positive definite, retrying with jitter %.2e x mean diag",
                d,
                delta,
            )
            Mj = M.clone()
            Mj.diagonal().add_(delta * scale)
            L, info = torch.linalg.cholesky_ex(Mj)
            delta *= 100
        if int(info) != 0:
            raise ValueError(
                f"solve_spd: A (d={d}) is not positive definite, even with a jitter of up to "
                f"{max_rel_jitter:.1e} x its mean diagonal"
            )
    X = torch.cholesky_solve(rhs, L)
    return X.squeeze(1) if vector else X


def memit_delta(sigma: Tensor, K: Tensor, E: Tensor, mu: float) -> Tensor:
    """MEMIT's per-layer solve: ``Delta = (mu^2 Sigma + K K^T)^{-1} K E``.

    Args:
        sigma: ``(d_k, d_k)`` key second moment.
        K: ``(d_k, u)`` keys of the batch.
        E: ``(u, d_v)`` this layer's share of the residual (innovation).
        mu: anchor weight (the objective uses ``mu^2``).

    Returns:
        ``(d_k, d_v)`` update in the promoted dtype of the inputs.
    """
    _check_square("sigma", sigma)
    _check_tensor("K", K, 2)
    _check_tensor("E", E, 2)
    mu = _check_scalar("mu", mu)
    d_k = sigma.shape[0]
    if K.shape[0] != d_k:
        raise ValueError(f"K must be (d_k, u) with d_k = {d_k} to match sigma, got {tuple(K.shape)}")
    if E.shape[0] != K.shape[1]:
        raise ValueError(f"E must be (u, d_v) with u = {K.shape[1]} to match K, got {tuple(E.shape)}")
    _check_same_device(sigma=sigma, K=K, E=E)
    dt = torch.promote_types(torch.promote_types(sigma.dtype, K.dtype), E.dtype)
    Kc = K.to(dt)
    A = _symmetrise(sigma.to(dt)) * (mu * mu) + Kc @ Kc.mT
    return solve_spd(A, Kc @ E.to(dt))


def nullspace_projector(sigma: Tensor, threshold: float = 2e-2, relative: bool = False) -> tuple[Tensor, int]:
    """AlphaEdit's projector onto the (approximate) null space of ``Sigma``.

    ``P = U U^T`` where the columns of ``U`` are the eigenvectors of ``Sigma`` whose eigenvalue is below
    ``threshold`` (absolute, as AlphaEdit's reference ``get_project``: singular values of the per-token
    mean second moment below ``nullspace_threshold = 2e-2``), or, with ``relative``, below
    ``threshold * lambda_max(Sigma)``. The eigen-decomposition is done in float64.

    Args:
        sigma: ``(d_k, d_k)`` symmetric positive semi-definite.
        threshold: eigenvalue threshold, ``>= 0``.
        relative: scale ``threshold`` by the largest eigenvalue.

    Returns:
        ``(P, dim)``: ``(d_k, d_k)`` symmetric idempotent projector in ``sigma.dtype`` and the
        null-space dimension (the rank of ``P``). A zero ``Sigma`` gives ``P = I``.
    """
    _check_square("sigma", sigma)
    threshold = _check_scalar("threshold", threshold)
    _check_finite("sigma", sigma)
    d_k = sigma.shape[0]
    dt = torch.promote_types(sigma.dtype, torch.float64)
    evals, evecs = torch.linalg.eigh(_symmetrise(sigma.to(dt)))
    top = float(evals[-1])
    if top <= 0.0:
        mask = torch.ones_like(evals, dtype=torch.bool)
    else:
        mask = evals < (threshold * top if relative else threshold)
    U = evecs[:, mask]
    dim = int(U.shape[1])
    P = _symmetrise(U @ U.mT)
    logger.info(
        "null-space projector: dimension %d of %d (eigenvalues below %.3e%s)",
        dim,
        d_k,
        threshold * top if relative else threshold,
        f" = {threshold:.1e} x lambda_max" if relative else "",
    )
    return P.to(sigma.dtype), dim


def alphaedit_delta(P: Tensor, KpKpT: Tensor, K: Tensor, E: Tensor, alpha: float) -> Tensor:
    """AlphaEdit's solve: ``Delta = (P (K_p K_p^T + K K^T) + alpha I)^{-1} P K E``.

    The system matrix is not symmetric, so it is solved by LU (``torch.linalg.solve``).

    Args:
        P: ``(d_k, d_k)`` null-space projector (:func:`nullspace_projector`).
        KpKpT: ``(d_k, d_k)`` accumulated ``sum K_p K_p^T`` of earlier batches (zeros at first).
        K: ``(d_k, u)`` keys of the batch.
        E: ``(u, d_v)`` this layer's residual share.
        alpha: ridge weight ``alpha >= 0`` (AlphaEdit's ``L2``).

    Returns:
        ``(d_k, d_v)`` update in the promoted dtype of the inputs.

    Raises:
        ValueError: bad shapes, or a singular system (e.g. ``alpha = 0``).
    """
    _check_square("P", P)
    _check_square("KpKpT", KpKpT)
    _check_tensor("K", K, 2)
    _check_tensor("E", E, 2)
    alpha = _check_scalar("alpha", alpha)
    d_k = P.shape[0]
    if KpKpT.shape != P.shape:
        raise ValueError(f"KpKpT must be ({d_k}, {d_k}) to match P, got {tuple(KpKpT.shape)}")
    if K.shape[0] != d_k:
        raise ValueError(f"K must be (d_k, u) with d_k = {d_k} to match P, got {tuple(K.shape)}")
    if E.shape[0] != K.shape[1]:
        raise ValueError(f"E must be (u, d_v) with u = {K.shape[1]} to match K, got {tuple(E.shape)}")
    _check_same_device(P=P, KpKpT=KpKpT, K=K, E=E)
    dt = P.dtype
    for t in (KpKpT, K, E):
        dt = torch.promote_types(dt, t.dtype)
    Pc = P.to(dt)
    Kc = K.to(dt)
    M = Pc @ (KpKpT.to(dt) + Kc @ Kc.mT)
    M.diagonal().add_(alpha)
    rhs = Pc @ (Kc @ E.to(dt))
    X, info = torch.linalg.solve_ex(M, rhs)
    if int(info) != 0:
        raise ValueError(f"AlphaEdit system is singular (alpha={alpha:g}); use alpha > 0")
    return X


def rome_rank_one(C_inv: Tensor, W: Tensor, k: Tensor, v: Tensor, k_prompt: Tensor | None = None) -> Tensor:
    """ROME's rank-one update with ``C_inv`` (``Sigma^{-1}`` or a regularised inverse) as key metric.

    ``Delta = (C_inv k) (v - W^T k_p)^T / (k_p^T C_inv k)`` with ``k_p = k_prompt`` (the bare prompt's
    key; ROME's reference ``compute_v``: ``(v - W k) / (k^T C^{-1} k_avg)`` with its ``cur_input``), so
    that ``k_p^T (W + Delta) = v`` exactly; the update's direction is ``C_inv k`` (``k`` the key averaged
    over context templates). Without ``k_prompt``, ``k_p = k``: then ``Delta`` has minimal
    ``Sigma``-weighted norm among updates mapping ``k`` to ``v``.

    Args:
        C_inv: ``(d_k, d_k)`` symmetric positive definite key metric.
        W: ``(d_k, d_v)`` current weights.
        k: ``(d_k,)`` the (averaged) key.
        v: ``(d_v,)`` the target value of ``k_p``.
        k_prompt: ``(d_k,)`` the bare prompt's key, or None.

    Returns:
        ``(d_k, d_v)`` update in the promoted dtype of the inputs.

    Raises:
        ValueError: bad shapes, or ``k_p^T C_inv k <= 0``.
    """
    _check_square("C_inv", C_inv)
    _check_tensor("W", W, 2)
    _check_tensor("k", k, 1)
    _check_tensor("v", v, 1)
    d_k = C_inv.shape[0]
    if W.shape[0] != d_k:
        raise ValueError(f"W must have d_k = {d_k} rows to match C_inv, got {tuple(W.shape)}")
    if k.shape != (d_k,):
        raise ValueError(f"k must have shape ({d_k},), got {tuple(k.shape)}")
    if v.shape != (W.shape[1],):
        raise ValueError(f"v must have shape ({W.shape[1]},) to match W, got {tuple(v.shape)}")
    if k_prompt is None:
        k_prompt = k
    elif k_prompt.shape != (d_k,):
        raise ValueError(f"k_prompt must have shape ({d_k},), got {tuple(k_prompt.shape)}")
    _check_same_device(C_inv=C_inv, W=W, k=k, v=v, k_prompt=k_prompt)
    dt = C_inv.dtype
    for t in (W, k, v, k_prompt):
        dt = torch.promote_types(dt, t.dtype)
    kc = k.to(dt)
    kp = k_prompt.to(dt)
    left = C_inv.to(dt) @ kc  # (d_k,)
    denom = float(kp @ left)
    if not denom > 0.0:
        raise ValueError(
            f"k_p^T C_inv k = {denom:.3e} is not positive: C_inv must be positive definite and the prompt's "
            "key must not point away from the averaged one"
        )
    residual = v.to(dt) - W.to(dt).mT @ kp  # (d_v,)
    return torch.outer(left, residual) / denom
