"""Scoring continuations: per-token log-probabilities of a target after a prompt under teacher forcing,
their mean NLL and top-1 flags, and greedy generation."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from rlsedit.locate.tokens import pad_id_of, pad_rows
from rlsedit.models.arch import input_device

__all__ = [
    "continuation_logprobs",
    "greedy_continuations",
    "pair_rows",
    "target_nll",
    "target_scores",
    "target_token_top1",
]


def _target_ids(tokenizer, target: str) -> list[int]:
    """Token ids of ``" " + target.strip()`` (no special tokens)."""
    return list(tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"])


def pair_rows(
    tokenizer, prompts: Sequence[str], targets: Sequence[str]
) -> tuple[list[list[int]], list[tuple[int, list[int]]]]:
    """Token rows of (prompt, target) pairs as they are scored: ``rows[i]`` = the prompt's ids (with the
    tokenizer's special tokens) followed by ``" " + target``'s (without), ``spans[i] = (prompt length,
    target ids)``."""
    if len(prompts) != len(targets):
        raise ValueError("prompts and targets must have the same length")
    rows, spans = [], []
    for p, t in zip(prompts, targets, strict=True):
        p_ids = list(tokenizer(p, add_special_tokens=True)["input_ids"])
        t_ids = _target_ids(tokenizer, t)
        if not t_ids:
            raise ValueError(f"target {t!r} tokenises to nothing")
        rows.append(p_ids + t_ids)
        spans.append((len(p_ids), t_ids))
    return rows, spans


def _keeps_logits(model: nn.Module) -> bool:
    """Whether ``model``'s forward takes ``logits_to_keep`` (the LM head then runs only where asked)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
        return False


@torch.no_grad()
def _teacher_forced(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 32,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """For each pair in order: ``(logp (m,), hit (m,))`` over the ``m`` tokens of ``" " + target``:
    the log-probability of each target token after ``prompt`` and the target tokens before it, and
    whether it is the model's top-1 prediction there (float32 and bool, on CPU).

    The prompt is tokenised with the tokenizer's special tokens (e.g. BOS), the target without. Rows are
    sorted by length and right-padded into batches of ``batch_size`` (rows of similar length together:
    little padding), and where the model takes ``logits_to_keep`` the LM head runs only at the positions
    that predict a target token; the results are the same as one row at a time up to float rounding.
    """
    device = input_device(model)
    rows, spans = pair_rows(tokenizer, prompts, targets)
    pad = pad_id_of(tokenizer)
    keep = _keeps_logits(model)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(rows)  # type: ignore[list-item]
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        ids, mask = pad_rows([rows[i] for i in idx], pad)
        # the positions whose logits predict a target token: position j predicts token j + 1
        need = sorted({j for i in idx for j in range(spans[i][0] - 1, len(rows[i]) - 1)})
        # (a CPU index: it selects on whichever device the last hidden state sits, as with a device map)
        kwargs = {"logits_to_keep": torch.tensor(need)} if keep else {}
        logits = model(
            input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **kwargs
        ).logits
        logits = logits.to(device)  # the LM head may sit on another device
        column = {j: c for c, j in enumerate(need)} if keep else None
        for k, i in enumerate(idx):
            start, t_ids = spans[i]
            at = range(start - 1, start - 1 + len(t_ids))
            pos = torch.tensor([column[j] for j in at] if column else list(at), device=device)
            tok = torch.tensor(t_ids, device=device)
            logp = torch.log_softmax(logits[k, pos].float(), -1)
            picked = logp[torch.arange(len(t_ids), device=device), tok]
            out[i] = (picked.cpu(), (logp.argmax(-1) == tok).cpu())
    yield from out


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
    nll = torch.empty(len(prompts))
    top1 = torch.zeros(len(prompts), dtype=torch.bool)
    for i, (logp, hit) in enumerate(_teacher_forced(model, tokenizer, prompts, targets, batch_size)):
        nll[i] = -logp.mean()
        top1[i] = bool(hit.all())
    return nll, top1


def target_token_top1(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 32,
) -> list[torch.Tensor]:
    """Per-token top-1 flags of ``" " + targets[i].strip()`` after ``prompts[i]`` under teacher forcing:
    one bool tensor ``(m_i,)`` per pair (MEMIT's zsRE token accuracy)."""
    return [hit for _, hit in _teacher_forced(model, tokenizer, prompts, targets, batch_size)]


def continuation_logprobs(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 32,
) -> torch.Tensor:
    """Total log-probability ``(n,)`` (float32, CPU) of ``" " + targets[i].strip()`` after ``prompts[i]``."""
    out = [logp.sum() for logp, _ in _teacher_forced(model, tokenizer, prompts, targets, batch_size)]
    return torch.stack(out) if out else torch.empty(0)


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
    device = input_device(model)
    pad = pad_id_of(tokenizer)
    out = []
    for p in prompts:
        enc = tokenizer(p, return_tensors="pt").to(device)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        out.append(tokenizer.decode(gen[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    return out
