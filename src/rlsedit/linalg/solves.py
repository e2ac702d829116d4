"""The closed-form solves of the baselines (MEMIT, AlphaEdit, ROME) and the SPD solve they share
(notation: :mod:`rlsedit.linalg`)."""

from __future__ import annotations

import logging
import math

import torch

from rlsedit.linalg.checks import (
    _check_finite,
    _check_same_device,
    _check_scalar,
    _check_square,
    _check_tensor,
    _symmetrise,
)

logger = logging.getLogger(__name__)

Tensor = torch.Tensor


__all__ = ["alphaedit_delta", "memit_delta", "nullspace_projector", "rome_rank_one", "solve_spd"]


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
