"""Per-model defaults as data files.

Each ``*.json`` file here has a ``match`` object (fields of the model's Hugging Face config that must all
be equal, e.g. ``model_type``, ``hidden_size``, ``num_hidden_layers``) and ``methods``: ``common`` settings
plus one section per editor. A model that matches no file gets generic defaults (edited layers in the
lower quarter of the network).
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from typing import Any

from torch import nn

__all__ = ["model_defaults", "find_model_config", "generic_layers"]

log = logging.getLogger(__name__)


def _files() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for entry in sorted(resources.files(__name__).iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            out.append((entry.name, json.loads(entry.read_text(encoding="utf-8"))))
    return out


def find_model_config(model: nn.Module) -> tuple[str, dict[str, Any]] | None:
    """The config file whose ``match`` fields all equal the model's config, if any."""
    cfg = model.config
    for name, data in _files():
        match = data.get("match", {})
        if match and all(getattr(cfg, k, None) == v for k, v in match.items()):
            return name, data
    return None


def generic_layers(n_layers: int) -> list[int]:
    """Up to five consecutive layers ending at about a quarter of the depth."""
    if n_layers <= 1:
        return [0]
    last = max(1, round(n_layers * 0.25))
    first = max(0, last - 4)
    return list(range(first, last + 1))


def model_defaults(model: nn.Module, method: str) -> dict[str, Any]:
    """Defaults for ``method`` on ``model``: the matching file's ``common`` then ``method`` sections."""
    found = find_model_config(model)
    if found is None:
        from rlsedit.models.arch import num_layers

        log.info("no per-model defaults for this model; using generic ones")
        return {"layers": generic_layers(num_layers(model))}
    name, data = found
    methods = data.get("methods", {})
    out: dict[str, Any] = {}
    for section in ("common", method):
        for k, v in methods.get(section, {}).items():
            if k == "targets" and isinstance(v, dict):
                out.setdefault("targets", {}).update(v)
            else:
                out[k] = v
    log.debug("defaults for %s from %s: %s", method, name, out)
    return out
