"""ROME (Meng et al., 2022): a rank-one update of one layer, one request at a time.

For the single edited layer, a request's key ``k`` (``d_k``, averaged over context templates), its bare
prompt's key ``k_p`` and the residual ``e`` (``d_v``: the gap between the optimised and the current hidden
state at the bare prompt) give, as the reference ``compute_v`` / ``apply_rome_to_model`` do,

    Delta = (C^{-1} k) e^T / (k_p^T C^{-1} k),     C^{-1} = (lam^2 I + mu^2 Sigma)^{-1}

so that ``k_p^T (W + Delta) = W^T k_p + e`` exactly: the bare prompt's output moves onto the target
(``lam`` is a small ridge that keeps ``C`` invertible; only the ratio ``lam / mu`` matters). A batch is
applied request by request: each request's target and key are computed on the model as edited by the
requests before it, all inside one all-or-nothing batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from rlsedit.editors.base import EditError, EditorConfig, LayerUpdate, register_editor
from rlsedit.editors.loop import LocateThenEditEditor
from rlsedit.linalg import initial_inverse, rome_rank_one

__all__ = ["ROMEConfig", "ROMEEditor"]

log = logging.getLogger(__name__)


@dataclass
class ROMEConfig(EditorConfig):
    """ROME settings.

    Attributes:
        layers: exactly one edited layer, e.g. ``(5,)``.
        lam / mu: the key metric is ``(lam^2 I + mu^2 Sigma)^{-1}`` (RLSEdit's ``C_0``); only ``lam / mu``
            matters, as a ridge on ``Sigma``.
    """

    layers: tuple[int, ...] = (5,)
    lam: float = 1.0
    mu: float = 31.6

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.layers) != 1:
            raise ValueError(
                f"rome edits exactly one layer, got layers={list(self.layers)}; pass a single layer, "
                f"e.g. layers=[{self.layers[len(self.layers) // 2]}]"
            )
        if self.lam < 0 or not self.mu > 0:
            raise ValueError(f"rome needs lam >= 0 and mu > 0, got lam={self.lam}, mu={self.mu}")


@register_editor
class ROMEEditor(LocateThenEditEditor):
    """The ROME editor (see the module docstring)."""

    name: ClassVar[str] = "rome"
    config_class: ClassVar[type[EditorConfig]] = ROMEConfig
    one_request_at_a_time: ClassVar[bool] = True
    config: ROMEConfig

    def init_runtime(self) -> None:
        self._metrics: dict[int, torch.Tensor] = {}

    def key_metric(self, layer: int) -> torch.Tensor:
        """``C^{-1} = (lam^2 I + mu^2 Sigma)^{-1}`` (``d_k x d_k``, float64, on the layer's device), computed
        once."""
        cache = self._metrics
        if layer not in cache:
            cache[layer] = initial_inverse(
                self.sigma_on_device(layer, keep=False), self.config.lam, self.config.mu
            )
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
        """Rank-one ``Delta (d_k, d_v)`` for one key ``K (d_k, 1)`` (its bare prompt's ``K_prompt``) and
        residual ``E (1, d_v)``.

        Given several columns (``u > 1``), applies one rank-one update per column in turn, each on the
        weight left by the previous one. Float64 on the layer's device; no state, nothing recorded.
        """
        C_inv = self.key_metric(layer)
        dev = C_inv.device
        K64 = K.to(device=dev, dtype=torch.float64)
        KP64 = K64 if K_prompt is None else K_prompt.to(device=dev, dtype=torch.float64)
        E64 = E.to(device=dev, dtype=torch.float64)
        W64 = W.to(device=dev, dtype=torch.float64)
        delta = torch.zeros_like(W64)
        for j in range(K64.shape[1]):
            kp = KP64[:, j]
            v = W64.T @ kp + E64[j]  # the value the original weight must map the prompt's key to
            try:
                delta = delta + rome_rank_one(C_inv, W64 + delta, K64[:, j], v, k_prompt=kp)
            except ValueError as exc:
                raise EditError(f"rome layer {layer}: {exc}; the batch was rolled back") from exc
        return LayerUpdate(delta=delta, state={}, record={})
