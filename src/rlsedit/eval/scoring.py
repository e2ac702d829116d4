"""Scoring continuations: mean per-token NLL of a target after a prompt, and greedy generation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rlsedit.locate.tokens import pad_id_of, pad_rows

__all__ = ["target_nll", "target_scores", "greedy_continuations"]


@torch.no_grad()
def target_scores(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per-token NLL of ``targets[i]`` after ``prompts[i]``, and whether every target token is the
    model's top-1 prediction under teacher forcing.

    Targets are stripped and scored with one leading space (``" " + target``).

    Returns:
        ``(nll (n,) float32, top1 (n,) bool)`` on CPU.
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
    nll = torch.empty(len(rows))
    top1 = torch.zeros(len(rows), dtype=torch.bool)
    pad = pad_id_of(tokenizer)
    for s in range(0, len(rows), batch_size):
        ids, mask = pad_rows(rows[s : s + batch_size], pad)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        for k, (start, t_ids) in enumerate(spans[s : s + batch_size]):
            pos = torch.arange(start - 1, start - 1 + len(t_ids), device=device)
            tok = torch.tensor(t_ids, device=device)
            logp = torch.log_softmax(logits[k, pos].float(), -1)
            nll[s + k] = -logp[torch.arange(len(t_ids), device=device), tok].mean().cpu()
            top1[s + k] = bool((logp.argmax(-1) == tok).all())
    return nll, top1


def target_nll(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 32,
) -> torch.Tensor:
    """Mean per-token NLL ``(n,)`` of ``targets[i]`` as the continuation of ``prompts[i]`` (see
    :func:`target_scores`)."""
    return target_scores(model, tokenizer, prompts, targets, batch_size)[0]


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
