"""Norm-anchored targets (NAS, arXiv 2602.02543): a plug-in for every closed-form editor.

Each target's value vector ``v* = v0 + (z - h0)`` (``v0`` the last edited layer's MLP output, ``h0`` the
hidden state there, ``z`` the optimised target) is rescaled to a reference norm measured once on the
unedited model, or, where ``||v*||`` exceeds twice it, left at ``v0``; the target becomes ``h0 - v0 + v*``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from rlsedit.locate import TargetConfig, compute_hidden, compute_targets

__all__ = ["anchored", "measure_reference_norm", "norm_anchor_targets", "reference_value_norm"]

log = logging.getLogger(__name__)


def reference_value_norm(v0: torch.Tensor, z: torch.Tensor, h0: torch.Tensor, trim: float = 0.05) -> float:
    """NAS's reference norm: the mean of ``||v0 + z - h0||`` over the rows ``(n, d_model)`` with the
    largest ``floor(trim * n)`` left out."""
    norms = torch.sort((v0 + z - h0).double().norm(dim=1)).values
    drop = int(math.floor(trim * norms.numel()))
    kept = norms[: norms.numel() - drop] if drop else norms
    if not kept.numel():
        raise ValueError("no value vectors left to average")
    return float(kept.mean())


def norm_anchor_targets(
    z: torch.Tensor, h0: torch.Tensor, v0: torch.Tensor, ref: float
) -> tuple[torch.Tensor, int]:
    """NAS's norm-anchored targets: ``v* = v0 + z - h0`` rescaled to norm ``ref``, or ``v0`` where
    ``||v*|| > 2 ref``; returns ``(h0 - v0 + v*, number left at v0)``, ``(u, d_model)`` like ``z``."""
    if not ref > 0:
        raise ValueError(f"the reference norm must be > 0, got {ref}")
    dev = z.device
    h0, v0 = h0.to(device=dev, dtype=z.dtype), v0.to(device=dev, dtype=z.dtype)
    v_star = v0 + z - h0
    norms = v_star.norm(dim=1, keepdim=True).clamp_min(1e-12)
    skip = norms[:, 0] > 2.0 * ref
    scaled = torch.where(skip[:, None], v0, v_star * (ref / norms))
    return h0 - v0 + scaled, int(skip.sum())


def measure_reference_norm(
    model: nn.Module,
    tokenizer: Any,
    layer: int,
    module: str,
    templates: list[str],
    config: TargetConfig,
    samples: int,
) -> float:
    """NAS's reference norm on the unedited ``model``: :func:`reference_value_norm` of the targets at
    ``layer`` (value vectors read at ``module``, its MLP output) of ``samples`` CounterFact tune cases
    spread over the split."""
    from rlsedit.datasets import load_counterfact

    tune = load_counterfact(split="tune")
    n = min(samples, len(tune))
    reqs = [tune[i * len(tune) // n].request for i in range(n)]
    tr = compute_targets(model, tokenizer, reqs, layer, templates, config)
    v0 = compute_hidden(model, tokenizer, reqs, module)
    ref = reference_value_norm(v0, tr.z, tr.h0)
    log.info("norm anchor: reference value norm %.4g (layer %d, %d tune cases)", ref, layer, n)
    return ref


def anchored(z: torch.Tensor, h0: torch.Tensor, v0: torch.Tensor, ref: float) -> torch.Tensor:
    """:func:`norm_anchor_targets`, logging how many requests were left at ``v0``."""
    out, n_skipped = norm_anchor_targets(z, h0, v0, ref)
    if n_skipped:
        log.info("norm anchor: %d of %d requests left at v0 (||v*|| > 2x the reference)", n_skipped, len(z))
    return out
