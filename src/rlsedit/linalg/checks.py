"""Argument checks and small numerical helpers shared by the solvers of :mod:`rlsedit.linalg`."""

from __future__ import annotations

import logging
import math

import torch

logger = logging.getLogger(__name__)

Tensor = torch.Tensor


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
