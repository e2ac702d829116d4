"""Exporting an edited model: a Hugging Face checkpoint, and the weight changes alone.

The deltas file (``deltas.safetensors`` + ``deltas.json``) holds ``W - W0`` of each edited module in the
module's own weight orientation, so it can be added to the base model and removed again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlsedit.models.arch import add_delta_kv, get_module
from rlsedit.store import load_json, load_tensors, save_json, save_tensors

__all__ = ["save_deltas", "apply_deltas", "export_model"]

log = logging.getLogger(__name__)

DELTAS_FORMAT = "rlsedit-deltas/1"


def save_deltas(directory: str | Path, deltas: dict[str, torch.Tensor], info: dict[str, Any]) -> Path:
    """Write ``{module_name: dW (d_k, d_v)}`` as ``deltas.safetensors`` plus ``deltas.json``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    sha = save_tensors(out / "deltas.safetensors", {k: v.contiguous() for k, v in deltas.items()})
    save_json(
        out / "deltas.json",
        {
            "format": DELTAS_FORMAT,
            "orientation": "(d_k, d_v): keys as rows",
            "modules": sorted(deltas),
            "sha256": sha,
            **info,
        },
    )
    return out


def apply_deltas(model: nn.Module, directory: str | Path, sign: float = 1.0) -> list[str]:
    """Add (``sign=1``) or remove (``sign=-1``) the weight changes saved in ``directory``.

    Returns the names of the changed modules. Shapes are checked before anything is changed.
    """
    d = Path(directory)
    meta = load_json(d / "deltas.json")
    if meta.get("format") != DELTAS_FORMAT:
        raise ValueError(f"{d} does not hold rlsedit deltas (format {meta.get('format')!r})")
    tensors = load_tensors(d / "deltas.safetensors", expected_sha256=meta["sha256"])
    from rlsedit.models.arch import weight_kv

    modules = {name: get_module(model, name) for name in tensors}
    for name, t in tensors.items():
        shape = tuple(weight_kv(modules[name]).shape)
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: delta shape {tuple(t.shape)} does not fit the weight {shape}")
    for name, t in tensors.items():
        add_delta_kv(modules[name], sign * t)
    return sorted(tensors)


def export_model(model: nn.Module, tokenizer: Any, directory: str | Path) -> Path:
    """``save_pretrained`` of the (edited) model and its tokenizer into ``directory`` (safetensors)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / "rlsedit.json").write_text(json.dumps({"note": "exported by rlsedit"}, indent=1))
    return out
