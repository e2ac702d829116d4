"""Exporting an edited model: a Hugging Face checkpoint, and the weight changes alone.

The deltas file (``deltas.safetensors`` + ``deltas.json``) holds ``W - W0`` of each edited module as
``(d_k, d_v)`` (keys as rows), so it can be added to the base model and removed again with
:func:`apply_deltas`. Beside it, ``weight_deltas.safetensors`` holds the same changes keyed by parameter
name (``<module>.weight``) in each parameter's own shape, for use without rlsedit:

    from safetensors.torch import load_file
    for name, delta in load_file("export/deltas/weight_deltas.safetensors").items():
        model.get_parameter(name).data += delta.to(model.get_parameter(name).dtype)
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


def save_deltas(
    directory: str | Path,
    deltas: dict[str, torch.Tensor],
    info: dict[str, Any],
    model: nn.Module | None = None,
) -> Path:
    """Write ``{module_name: dW (d_k, d_v)}`` as ``deltas.safetensors`` plus ``deltas.json``; with ``model``
    (the model the deltas were made on), also ``weight_deltas.safetensors``: ``{parameter name: dW in the
    parameter's shape}``, which plain safetensors and torch apply (see the module docstring)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    sha = save_tensors(out / "deltas.safetensors", {k: v.contiguous() for k, v in deltas.items()})
    if model is not None:
        from safetensors.torch import save_file

        plain = {}
        for name, d in deltas.items():
            module = get_module(model, name)
            w = module.weight
            # nn.Linear keeps W as weight.T; Conv1D as weight (see rlsedit.models.arch.weight_kv)
            p = (d.T if isinstance(module, nn.Linear) else d).contiguous()
            if tuple(p.shape) != tuple(w.shape):
                raise ValueError(
                    f"{name}: the delta {tuple(d.shape)} does not fit its weight {tuple(w.shape)}"
                )
            plain[f"{name}.weight"] = p
        save_file(plain, str(out / "weight_deltas.safetensors"))
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
