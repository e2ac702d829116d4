"""MEMIT (Meng et al., 2023): a closed-form least-squares edit per layer, spread over the edited layers.

For each edited layer, lowest first, with this layer's keys ``K`` (``d_k x u``) and its share ``E``
(``u x d_v``) of the gap between the optimised and the current hidden state,

    Delta = (mu^2 Sigma + K K^T)^{-1} K E

the minimiser of ``||K^T (W + Delta) - V||^2 + mu^2 ||K_0^T Delta||^2`` with ``V = K^T W + E`` and
``K_0 K_0^T = Sigma``. MEMIT keeps no memory across batches except the weights themselves: every batch
is anchored to the current weights, not to ``W_0`` or to earlier edits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from rlsedit.editors.base import EditorConfig, LayerUpdate, register_editor
from rlsedit.editors.loop import LocateThenEditEditor
from rlsedit.linalg import memit_delta

__all__ = ["MEMITConfig", "MEMITEditor"]

log = logging.getLogger(__name__)


@dataclass
class MEMITConfig(EditorConfig):
    """MEMIT settings.

    Attributes:
        mu: the anchor: ``mu^2`` weighs the key second moment (the authors' ``mom2_update_weight``).
    """

    mu: float = 31.6

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.mu > 0:
            raise ValueError(f"mu must be > 0, got {self.mu}")


@register_editor
class MEMITEditor(LocateThenEditEditor):
    """The MEMIT editor (see the module docstring)."""

    name: ClassVar[str] = "memit"
    config_class: ClassVar[type[EditorConfig]] = MEMITConfig
    config: MEMITConfig

    def solve(
        self,
        layer: int,
        K: torch.Tensor,
        E: torch.Tensor,
        W: torch.Tensor,
        *,
        K_prompt: torch.Tensor | None = None,
    ) -> LayerUpdate:
        """``Delta (d_k, d_v) = (mu^2 Sigma + K K^T)^{-1} K E`` for keys ``K (d_k, u)``, residual
        ``E (u, d_v)``; float64, on the layer's device. No state, nothing recorded."""
        sigma = self.sigma_on_device(layer)
        dev = sigma.device
        K64 = K.to(device=dev, dtype=torch.float64)
        E64 = E.to(device=dev, dtype=torch.float64)
        delta = memit_delta(sigma, K64, E64, self.config.mu)
        return LayerUpdate(delta=delta, state={}, record={})
