"""AlphaEdit (Fang et al., 2025): MEMIT's update projected onto the null space of the preserved keys.

Per edited layer, ``P`` (``d_k x d_k``) projects onto the eigenvectors of ``Sigma`` whose eigenvalue is below
``nullspace_threshold`` (absolute, as the reference's ``get_project``; ``nullspace_rule="relative"``: times
the largest), the directions ordinary text hardly uses; the dimension is logged. ``K_p K_p^T``
accumulates the keys of every earlier batch. A batch with keys ``K`` (``d_k x u``) and residual share
``E`` (``u x d_v``) gets

    Delta = (P (K_p K_p^T + K K^T) + alpha I)^{-1} P K E

so the update acts (approximately) only in the null space of ordinary keys, while earlier edits' keys are
kept in the least-squares objective. The state per layer is ``K_p K_p^T`` (saved with the editor); ``P``
is recomputed from ``Sigma`` (saved with the run) when first needed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from rlsedit.editors.base import EditorConfig, LayerUpdate, register_editor
from rlsedit.editors.loop import LocateThenEditEditor
from rlsedit.linalg import alphaedit_delta, nullspace_projector

__all__ = ["AlphaEditConfig", "AlphaEditEditor", "sigma_nullspace"]

log = logging.getLogger(__name__)


@dataclass
class AlphaEditConfig(EditorConfig):
    """AlphaEdit settings.

    Attributes:
        alpha: ridge weight of the solve (the authors' ``L2``); must be > 0.
        nullspace_threshold: eigenvalues of ``Sigma`` below this span the null space the update is
            projected onto (the reference's 2e-2 on the per-token mean second moment).
        nullspace_rule: "absolute" (the reference: ``lambda < nullspace_threshold``) or "relative"
            (``lambda < nullspace_threshold * lambda_max``).
    """

    alpha: float = 10.0
    nullspace_threshold: float = 2e-2
    nullspace_rule: str = "absolute"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not self.nullspace_threshold > 0:
            raise ValueError(f"nullspace_threshold must be > 0, got {self.nullspace_threshold}")
        if self.nullspace_rule not in ("absolute", "relative"):
            raise ValueError(f"nullspace_rule must be 'absolute' or 'relative', got {self.nullspace_rule!r}")


def sigma_nullspace(
    sigma: torch.Tensor, cfg: AlphaEditConfig, editor: str, layer: int
) -> tuple[torch.Tensor, int]:
    """The projector onto the null space of ``Sigma`` (``(d_k, d_k)``, float64) by ``cfg``'s threshold and
    rule, and its dimension; logged, with a warning when it is empty (every update would be zero)."""
    P, dim = nullspace_projector(
        sigma.to(torch.float64), cfg.nullspace_threshold, relative=cfg.nullspace_rule == "relative"
    )
    log.info(
        "%s layer %d: null space of dimension %d of %d kept (threshold %g, %s)",
        editor,
        layer,
        dim,
        P.shape[0],
        cfg.nullspace_threshold,
        cfg.nullspace_rule,
    )
    if dim == 0:
        log.warning(
            "%s layer %d: the null space is empty, so every update is zero; raise nullspace_threshold",
            editor,
            layer,
        )
    return P, dim


@register_editor
class AlphaEditEditor(LocateThenEditEditor):
    """The AlphaEdit editor (see the module docstring)."""

    name: ClassVar[str] = "alphaedit"
    config_class: ClassVar[type[EditorConfig]] = AlphaEditConfig
    config: AlphaEditConfig

    def init_runtime(self) -> None:
        self._projectors: dict[int, torch.Tensor] = {}
        #: the null-space dimension per layer, once its projector is computed
        self.nullspace_dims: dict[int, int] = {}

    def init_layer_state(
        self, layer: int, W0: torch.Tensor, sigma: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """``{"KpKpT": zeros (d_k, d_k) float64}`` on the layer's device: no earlier keys yet."""
        d_k = W0.shape[0]
        return {"KpKpT": torch.zeros(d_k, d_k, dtype=torch.float64, device=W0.device)}

    def projector(self, layer: int) -> torch.Tensor:
        """The null-space projector ``P`` (``d_k x d_k``, float64, on the layer's device) of ``layer``,
        computed once."""
        cache = self._projectors
        if layer not in cache:
            sigma = self.sigma_on_device(layer, keep=False)
            cache[layer], self.nullspace_dims[layer] = sigma_nullspace(sigma, self.config, self.name, layer)
        return cache[layer]

    def solve(
        self,
        layer: int,
        K: torch.Tensor,
        E: torch.Tensor,
        W: torch.Tensor,
        *,
        K_prompt: torch.Tensor | None = None,
    ) -> LayerUpdate:
        """``Delta (d_k, d_v)`` for keys ``K (d_k, u)`` and residual ``E (u, d_v)``; the next state adds
        ``K K^T`` to ``K_p K_p^T``. Float64 on the layer's device; nothing recorded."""
        KpKpT = self.layer_state[layer]["KpKpT"]
        K64 = K.to(device=KpKpT.device, dtype=torch.float64)
        E64 = E.to(device=KpKpT.device, dtype=torch.float64)
        delta = alphaedit_delta(self.projector(layer), KpKpT, K64, E64, self.config.alpha)
        return LayerUpdate(delta=delta, state={"KpKpT": KpKpT + K64 @ K64.T}, record={})
