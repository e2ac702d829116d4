"""Per-architecture facts as data.

Each supported ``config.model_type`` maps to an :class:`ArchSpec` that says where the transformer blocks
live, the path (relative to a block) of the MLP output projection that editors rewrite, the final norm,
the LM head and the token embedding, and whether a normalisation follows the MLP output inside the block
(Gemma 2/3), in which case the residual stream is not linear in the edited matrix.

The orientation of the edited weight is decided by module type, never by model name:
``nn.Linear`` stores ``weight`` as ``d_v x d_k`` (so ``W = weight.T``), GPT-2's ``Conv1D`` stores it as
``d_k x d_v`` already.

To add an architecture, add one :class:`ArchSpec` entry to ``ARCHITECTURES`` (and a tiny-config test in
``tests/test_arch.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "ArchSpec",
    "ARCHITECTURES",
    "UnsupportedArchitectureError",
    "get_arch",
    "get_module",
    "num_layers",
    "block_name",
    "input_device",
    "model_devices",
    "mlp_out_name",
    "mlp_out_module",
    "kv_dims",
    "weight_kv",
    "add_delta_kv",
]


class UnsupportedArchitectureError(ValueError):
    """The model's architecture is not in :data:`ARCHITECTURES`."""


@dataclass(frozen=True)
class ArchSpec:
    """Where one model family keeps the parts an editor needs (dotted module paths).

    Attributes:
        blocks: path of the ``nn.ModuleList`` of transformer blocks, e.g. ``"model.layers"``.
        mlp_out: path of the MLP output projection relative to a block, e.g. ``"mlp.down_proj"``.
        final_norm: path of the final normalisation before the LM head.
        lm_head: path of the output projection to the vocabulary.
        embed: path of the token embedding.
        norm_after_mlp: True when a normalisation is applied to the MLP output before it is added to the
            residual stream (Gemma 2/3's ``post_feedforward_layernorm``).
        mlp_in: path of the MLP's (up) input projection relative to a block, e.g. ``"mlp.up_proj"`` (the
            matrices UltraEdit edits).
    """

    blocks: str
    mlp_out: str
    final_norm: str
    lm_head: str
    embed: str
    norm_after_mlp: bool = False
    mlp_in: str = "mlp.up_proj"


_LLAMA_LIKE = ArchSpec(
    blocks="model.layers",
    mlp_out="mlp.down_proj",
    final_norm="model.norm",
    lm_head="lm_head",
    embed="model.embed_tokens",
)
_POSTNORM = ArchSpec(
    blocks="model.layers",
    mlp_out="mlp.down_proj",
    final_norm="model.norm",
    lm_head="lm_head",
    embed="model.embed_tokens",
    norm_after_mlp=True,
)

#: ``config.model_type`` -> facts. Data, not code: add a line to support a new family.
#: Module paths are those of transformers 5 (in transformers 4, GPT-NeoX's LM head was ``embed_out``).
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "smollm3": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "phi3": ArchSpec(  # fused gate_up_proj in, down_proj out
        blocks="model.layers",
        mlp_out="mlp.down_proj",
        final_norm="model.norm",
        lm_head="lm_head",
        embed="model.embed_tokens",
        mlp_in="mlp.gate_up_proj",
    ),
    # post_feedforward_layernorm normalises the MLP output before the residual add
    "gemma2": _POSTNORM,
    "gemma3_text": _POSTNORM,
    "olmo2": _POSTNORM,
    # Gemma 3 checkpoints with a vision tower: AutoModelForCausalLM gives Gemma3ForConditionalGeneration,
    # whose text decoder sits under model.language_model
    "gemma3": ArchSpec(
        blocks="model.language_model.layers",
        mlp_out="mlp.down_proj",
        final_norm="model.language_model.norm",
        lm_head="lm_head",
        embed="model.language_model.embed_tokens",
        norm_after_mlp=True,
    ),
    "gpt2": ArchSpec(
        blocks="transformer.h",
        mlp_out="mlp.c_proj",  # Conv1D: weight is already (d_k, d_v)
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        embed="transformer.wte",
        mlp_in="mlp.c_fc",
    ),
    "gptj": ArchSpec(
        blocks="transformer.h",
        mlp_out="mlp.fc_out",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        embed="transformer.wte",
        mlp_in="mlp.fc_in",
    ),
    "gpt_neox": ArchSpec(
        blocks="gpt_neox.layers",
        mlp_out="mlp.dense_4h_to_h",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head",
        embed="gpt_neox.embed_in",
        mlp_in="mlp.dense_h_to_4h",
    ),
    "phi": ArchSpec(
        blocks="model.layers",
        mlp_out="mlp.fc2",
        final_norm="model.final_layernorm",
        lm_head="lm_head",
        embed="model.embed_tokens",
        mlp_in="mlp.fc1",
    ),
}


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no config.model_type; rlsedit needs a Hugging Face causal LM."
        )
    return str(model_type)


def get_arch(model: nn.Module) -> ArchSpec:
    """Return the :class:`ArchSpec` of ``model`` (looked up by ``model.config.model_type``)."""
    model_type = _model_type(model)
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported (supported: {supported}). To add one, add an "
            "ArchSpec entry for it to rlsedit.models.arch.ARCHITECTURES giving the block list, the MLP "
            "output projection, the final norm, the LM head and the embedding."
        ) from None


def get_module(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule at dotted path ``name``, with a clear error when it does not exist."""
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise AttributeError(f"{type(model).__name__} has no submodule {name!r}") from exc


def input_device(model: nn.Module) -> torch.device:
    """The device token ids must be on: the input embedding's.

    With ``device_map="auto"`` (accelerate) the layers are spread over several devices and the first
    parameter is not necessarily the embedding; input ids go to the embedding's device and accelerate's
    hooks move hidden states between devices from there.
    """
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    return next(model.parameters()).device


def model_devices(model: nn.Module) -> list[torch.device]:
    """The distinct devices holding ``model``'s parameters, in order of first appearance."""
    seen: dict[torch.device, None] = {}
    for p in model.parameters():
        seen.setdefault(p.device, None)
    return list(seen)


def num_layers(model: nn.Module) -> int:
    """Number of transformer blocks."""
    return len(get_module(model, get_arch(model).blocks))


def block_name(model: nn.Module, layer: int) -> str:
    """Full path of block ``layer`` (negative indices count from the end)."""
    n = num_layers(model)
    if not -n <= layer < n:
        raise IndexError(f"layer {layer} out of range for a model with {n} layers")
    return f"{get_arch(model).blocks}.{layer % n}"


def mlp_out_name(model: nn.Module, layer: int) -> str:
    """Full path of the MLP output projection (the edited matrix) of block ``layer``."""
    return f"{block_name(model, layer)}.{get_arch(model).mlp_out}"


def mlp_out_module(model: nn.Module, layer: int) -> nn.Module:
    """The MLP output projection (``nn.Linear`` or ``Conv1D``) of block ``layer``."""
    return get_module(model, mlp_out_name(model, layer))


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2): weight is (in_features, out_features). Imported lazily.
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        return False
    return isinstance(module, Conv1D)


def kv_dims(module: nn.Module) -> tuple[int, int]:
    """``(d_k, d_v)`` of an edited projection: keys of size d_k in (the MLP's intermediate size), values of
    size d_v out (the model's hidden size)."""
    w = weight_kv(module)
    return int(w.shape[0]), int(w.shape[1])


def weight_kv(module: nn.Module) -> torch.Tensor:
    """The module's weight as ``W`` of shape ``(d_k, d_v)`` (a view, not a copy).

    With keys ``k`` of shape ``(..., d_k)`` the module computes ``k @ W + bias``, shape ``(..., d_v)``.
    ``nn.Linear`` -> ``weight.T``; ``Conv1D`` -> ``weight``. Any other module type is refused.
    """
    if isinstance(module, nn.Linear):
        return module.weight.T
    if _is_conv1d(module):
        return module.weight
    raise TypeError(
        f"cannot edit a {type(module).__name__}: rlsedit edits nn.Linear or transformers' Conv1D projections"
    )


@torch.no_grad()
def add_delta_kv(module: nn.Module, delta: torch.Tensor) -> None:
    """Add ``delta`` of shape ``(d_k, d_v)`` to the module's ``W`` in place, in the weight's dtype/device.

    Afterwards the module maps a key ``k`` of shape ``(d_k,)`` to ``k @ (W + delta) + bias``.
    """
    w = weight_kv(module)
    if tuple(delta.shape) != tuple(w.shape):
        raise ValueError(f"delta has shape {tuple(delta.shape)}, expected {tuple(w.shape)} (d_k, d_v)")
    w.add_(delta.to(device=w.device, dtype=w.dtype))


def context_limit(model: nn.Module) -> int | None:
    """The longest token sequence ``model`` was built for (its position limit), or None if unknown."""
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
