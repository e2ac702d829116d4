"""Scoring continuations: mean per-token NLL of a target after a prompt, and greedy generation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rlsedit.locate.tokens import pad_id_of, pad_rows

__all__ = ["target_nll", "greedy_continuations"]


@torch.no_grad()
def target_nll(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 32,
) -> torch.Tensor:
    """Mean per-token negative log-likelihood of ``targets[i]`` as the continuation of ``prompts[i]``.

    Targets are stripped and scored with one leading space (``" " + target``).

    Returns:
        ``(n,)`` float32 tensor on CPU.
    """
    if len(prompts) != len(targets):
        raise ValueError("prompts and targets must have the same length")
    device = next(model.parameters()).device
    rows, spans = [], []
    for p, t in zip(prompts, targets, strict=True):
        p_ids = list(tokenizer(p, add_special_tokens=True)["input_ids"])
        t_ids = list(tokenizer(" " + t.strip(), add_special_tokens=False)["input_ids"])
        rows.append(p_ids + t_ids)
        spans.append((len(p_ids), t_ids))
    out = torch.empty(len(rows))
    pad = pad_id_of(tokenizer)
    for s in range(0, len(rows), batch_size):
        ids, mask = pad_rows(rows[s : s + batch_size], pad)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        logp = torch.log_softmax(logits.float(), -1)
        for k, (start, t_ids) in enumerate(spans[s : s + batch_size]):
            pos = torch.arange(start - 1, start - 1 + len(t_ids), device=device)
            tok = torch.tensor(t_ids, device=device)
            out[s + k] = -logp[k, pos, tok].mean().cpu()
    return out


@torch.no_grad()
def greedy_continuations(
    model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 8
) -> list[str]:
    """Greedy continuation text of each prompt (one at a time: no padding effects)."""
    device = next(model.parameters()).device
    pad = pad_id_of(tokenizer)
    out = []
    for p in prompts:
        enc = tokenizer(p, return_tensors="pt").to(device)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        out.append(tokenizer.decode(gen[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    return out
