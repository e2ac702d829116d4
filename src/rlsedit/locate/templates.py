"""Context templates: short generated prefixes that make keys and targets robust to context.

A template is a text prefix; a prompt row is ``template + request.text``. The first template is always
the empty string (the bare prompt). Generated prefixes are sampled from the model itself with a fixed
seed (deterministic for a given model and seed) and end in ``". "``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from rlsedit.models.arch import input_device, model_devices

__all__ = ["generate_context_templates", "DEFAULT_STARTS"]

log = logging.getLogger(__name__)

DEFAULT_STARTS: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")


def _clean(text: str) -> str:
    text = " ".join(text.replace("{", " ").replace("}", " ").split())
    return text.rstrip(" .") + ". "


@torch.no_grad()
def generate_context_templates(
    model: nn.Module,
    tokenizer,
    n: int = 5,
    length: int = 10,
    seed: int = 0,
    starts: Sequence[str] = DEFAULT_STARTS,
) -> list[str]:
    """Return ``[""] + n`` generated prefixes of about ``length`` tokens each.

    Sampling (top-k 5) runs under a forked RNG seeded with ``seed``: the global RNG is untouched and the
    result repeats exactly for the same model and seed.
    """
    if n < 0 or length < 1:
        raise ValueError("n must be >= 0 and length >= 1")
    templates = [""]
    if n == 0:
        return templates
    device = input_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # sampling may draw on any GPU the model is spread over: fork the RNG of each
    gpus = [d for d in model_devices(model) if d.type == "cuda"]
    with torch.random.fork_rng(devices=gpus):
        torch.manual_seed(seed)
        for i in range(n):
            start = starts[i % len(starts)]
            enc = tokenizer(start, return_tensors="pt").to(device)
            out = model.generate(
                **enc,
                max_new_tokens=length,
                do_sample=True,
                top_k=5,
                pad_token_id=pad,
            )
            text = tokenizer.decode(out[0], skip_special_tokens=True)
            templates.append(_clean(text))
    log.debug("context templates: %s", templates)
    return templates
