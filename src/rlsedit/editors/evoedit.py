"""EvoEdit (arXiv 2510.13851): sequential null-space alignment with a low-rank (Woodbury) solve.

Per edited layer the editor carries a projector ``P_t`` (``d_k x d_k``), initially AlphaEdit's projector
onto the null space of the preserved keys' second moment ``Sigma`` (eigenvalues below
``nullspace_threshold``). A batch with keys ``K`` (``d_k x u``) and residual share ``E`` (``u x d_v``) gets

    Delta = P K (K^T P K + alpha I_u)^{-1} E          (a u x u Cholesky solve: the Woodbury form of
                                                       (P K K^T + alpha I)^{-1} P K E)

and the projector then leaves out the directions the batch used, so later batches cannot overwrite them:
``P_{t+1} = P_t - Q Q^T`` with ``Q`` an orthonormal basis of the range of ``P_t K`` (its left singular
vectors above a rounding threshold). A batch whose projected keys are negligible (``||P K||_F < pk_eps``)
leaves the layer unchanged (the reference skips such an edit). This follows the RLSEdit authors' release
(``EvoEdit/EvoEdit_main.py``); its skip of a batch whose residual is already small is not reproduced (the
residual share is what this layer is asked to fit).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from rlsedit.editors.alphaedit import AlphaEditConfig, sigma_nullspace
from rlsedit.editors.base import EditorConfig, LayerUpdate, register_editor
from rlsedit.editors.loop import LocateThenEditEditor

__all__ = ["EvoEditConfig", "EvoEditEditor", "evoedit_delta", "shrink_projector"]

log = logging.getLogger(__name__)


def evoedit_delta(P: torch.Tensor, K: torch.Tensor, E: torch.Tensor, alpha: float) -> torch.Tensor:
    """``Delta = P K (K^T P K + alpha I)^{-1} E`` (``(d_k, d_v)``) for ``P (d_k, d_k)`` symmetric,
    ``K (d_k, u)``, ``E (u, d_v)``; float64 Cholesky of the ``u x u`` system."""
    Y = P @ K  # (d_k, u)
    S = K.mT @ Y
    S = 0.5 * (S + S.mT)
    S.diagonal().add_(alpha)
    L = torch.linalg.cholesky(S)
    return Y @ torch.cholesky_solve(E, L)


def shrink_projector(P: torch.Tensor, K: torch.Tensor, tol: float = 1e-10) -> tuple[torch.Tensor, int]:
    """``P - Q Q^T`` with ``Q`` the left singular vectors of ``P K`` whose singular value exceeds
    ``max(tol, max(shape) * eps * s_max)``; returns it and the rank removed."""
    R = P @ K
    if R.numel() == 0:
        return P, 0
    U, S, _ = torch.linalg.svd(R, full_matrices=False)
    eps = torch.finfo(S.dtype).eps
    thr = max(tol, max(R.shape) * eps * float(S[0])) if S.numel() else tol
    r = int((S > thr).sum())
    if r == 0:
        return P, 0
    Q = U[:, :r]
    P_new = P - Q @ Q.mT
    return 0.5 * (P_new + P_new.mT), r


@dataclass
class EvoEditConfig(AlphaEditConfig):
    """EvoEdit settings: AlphaEdit's (``alpha``, the authors' ``L2``; the initial projector's
    ``nullspace_threshold`` and ``nullspace_rule``), and

    Attributes:
        pk_eps: a batch with ``||P K||_F`` below this leaves the layer unchanged (the reference's 1e-3).
    """

    pk_eps: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pk_eps < 0:
            raise ValueError(f"pk_eps must be >= 0, got {self.pk_eps}")


@register_editor
class EvoEditEditor(LocateThenEditEditor):
    """The EvoEdit editor (see the module docstring)."""

    name: ClassVar[str] = "evoedit"
    config_class: ClassVar[type[EditorConfig]] = EvoEditConfig
    config: EvoEditConfig

    def init_layer_state(
        self, layer: int, W0: torch.Tensor, sigma: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """``{"P": the null-space projector of Sigma (d_k, d_k) float64}`` on the layer's device."""
        assert sigma is not None
        P, _ = sigma_nullspace(sigma, self.config, self.name, layer)
        return {"P": P.to(device=W0.device)}

    def solve(
        self,
        layer: int,
        K: torch.Tensor,
        E: torch.Tensor,
        W: torch.Tensor,
        *,
        K_prompt: torch.Tensor | None = None,
    ) -> LayerUpdate:
        """``Delta (d_k, d_v)`` for keys ``K (d_k, u)`` and residual ``E (u, d_v)``; the next state is the
        projector without the batch's projected key directions. Float64 on the layer's device."""
        P = self.layer_state[layer]["P"]
        K64 = K.to(device=P.device, dtype=torch.float64)
        E64 = E.to(device=P.device, dtype=torch.float64)
        if float(torch.linalg.norm(P @ K64)) < self.config.pk_eps:
            log.info(
                "evoedit layer %d: ||P K|| below %g, this batch leaves the layer", layer, self.config.pk_eps
            )
            zero = torch.zeros(tuple(W.shape), dtype=torch.float64, device=P.device)
            return LayerUpdate(delta=zero, state={"P": P}, record={})
        delta = evoedit_delta(P, K64, E64, self.config.alpha)
        P_next, rank = shrink_projector(P, K64)
        log.debug("evoedit layer %d: projector rank reduced by %d", layer, rank)
        return LayerUpdate(delta=delta, state={"P": P_next}, record={})
