"""Target hidden states: the vector each request's subject should produce at the last edited layer.

For every request ``i`` a delta ``d_i`` (``d_model``) is added to the output of the last edited layer's
MLP at the subject's last token, in every context template. ``d_i`` is optimised (Adam) to minimise

    NLL(target_new | template + prompt)  averaged over templates and target tokens
    + kl_factor * KL(p_0 || p_delta) on "{subject} is a" (the next-token distribution stays put)
    + weight_decay * ||d_i||^2 / ||h_i||^2

with ``||d_i|| <= clamp_norm_factor * ||h_i||`` after every step, where ``h_i`` is the layer's hidden state
(block output) at the subject's last token of the bare prompt. The target is ``z_i = h_i + d_i``.

All requests of a batch are optimised together (one padded batch, gradients accumulated over chunks);
a request whose NLL falls below ``stop_nll`` is frozen and leaves the batch, so later steps only run the
requests still learning.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from rlsedit.hooks import add_at_positions, trace
from rlsedit.locate.tokens import encode_text_upto, pad_id_of, pad_rows, target_ids
from rlsedit.models.arch import get_arch, get_module
from rlsedit.requests import EditRequest

__all__ = ["TargetConfig", "TargetResult", "compute_targets", "frozen_params", "logits_from_hidden"]

log = logging.getLogger(__name__)


@dataclass
class TargetConfig:
    """Hyper-parameters of target optimisation (see the module docstring)."""

    lr: float = 0.5
    steps: int = 25
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    stop_nll: float = 0.05
    kl_prompt: str = "{} is a"
    chunk_rows: int = 48

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.steps < 1 or self.chunk_rows < 1:
            raise ValueError("lr must be > 0, steps >= 1 and chunk_rows >= 1")
        if self.kl_factor < 0 or self.weight_decay < 0 or self.clamp_norm_factor <= 0 or self.stop_nll < 0:
            raise ValueError("kl_factor, weight_decay, stop_nll must be >= 0 and clamp_norm_factor > 0")
        if self.kl_prompt.count("{}") != 1:
            raise ValueError("kl_prompt must hold exactly one '{}' for the subject")


@dataclass
class TargetResult:
    """Targets for one batch of ``u`` requests.

    Attributes:
        z: ``(u, d_model)`` target hidden states at the last edited layer (float32).
        h0: ``(u, d_model)`` the hidden states before optimisation.
        nll_init: ``(u,)`` mean per-token NLL of the new target before optimisation.
        nll_final: ``(u,)`` the NLL at the last evaluated step.
        steps: ``(u,)`` optimisation steps taken per request.
        seconds: wall time.
    """

    z: torch.Tensor
    h0: torch.Tensor
    nll_init: torch.Tensor
    nll_final: torch.Tensor
    steps: torch.Tensor
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


@contextmanager
def frozen_params(model: nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` on every parameter inside the block (restored on exit)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def logits_from_hidden(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the LM head (and any final logit soft-capping) to final-norm outputs ``(..., d_model)``."""
    head = get_module(model, get_arch(model).lm_head)
    logits = head(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@dataclass
class _Row:
    ids: list[int]
    subject_last: int
    req: int
    kind: str  # "nll" or "kl"
    target_pos: list[int]  # positions whose next-token prediction is a target token
    target_tok: list[int]


def _build_rows(
    tokenizer, requests: Sequence[EditRequest], contexts: Sequence[str], kl_prompt: str
) -> list[list[_Row]]:
    per_req: list[list[_Row]] = []
    for i, req in enumerate(requests):
        tgt = target_ids(tokenizer, req.target_new_text)
        rows: list[_Row] = []
        for ctx in contexts:
            ids, last = encode_text_upto(
                tokenizer, ctx + req.text, len(ctx) + len(req.prefix) + len(req.subject)
            )
            n = len(ids)
            rows.append(_Row(ids + tgt[:-1], last, i, "nll", list(range(n - 1, n - 1 + len(tgt))), tgt))
        pre, post = kl_prompt.split("{}", 1)
        kl_text = pre + req.subject + post
        ids, last = encode_text_upto(tokenizer, kl_text, len(pre) + len(req.subject))
        rows.append(_Row(ids, last, i, "kl", [len(ids) - 1], []))
        per_req.append(rows)
    return per_req


def compute_targets(
    model: nn.Module,
    tokenizer,
    requests: Sequence[EditRequest],
    layer: int,
    contexts: Sequence[str],
    config: TargetConfig | None = None,
    progress: bool = False,
) -> TargetResult:
    """Optimise target hidden states at block ``layer`` for all ``requests`` together.

    Args:
        layer: index of the last edited block; the delta is added to its MLP output projection's output.
        contexts: context templates (the first is normally ``""``).
    Returns:
        :class:`TargetResult` with ``z`` of shape ``(u, d_model)``.
    """
    cfg = config or TargetConfig()
    t0 = time.perf_counter()
    arch = get_arch(model)
    blocks = arch.blocks
    inject = f"{blocks}.{layer}.{arch.mlp_out}"
    read = f"{blocks}.{layer}"
    final_norm = arch.final_norm
    device = next(model.parameters()).device
    pad = pad_id_of(tokenizer)
    u = len(requests)
    if not contexts or contexts[0] != "":
        raise ValueError('contexts must start with "" (the bare prompt)')
    per_req = _build_rows(tokenizer, requests, contexts, cfg.kl_prompt)
    rows_per_req = len(per_req[0])
    req_per_chunk = max(1, cfg.chunk_rows // rows_per_req)

    d_model = int(model.config.hidden_size)
    delta = torch.zeros(u, d_model, device=device, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    h0 = torch.zeros(u, d_model, device=device)
    kl_init: list[torch.Tensor | None] = [None] * u
    nll_init = torch.full((u,), float("nan"))
    nll_last = torch.full((u,), float("nan"))
    steps_taken = torch.zeros(u, dtype=torch.long)
    active = list(range(u))

    with frozen_params(model):
        for step in range(cfg.steps + 1):
            if not active:
                break
            opt.zero_grad(set_to_none=False)
            still: list[int] = []
            for c0 in range(0, len(active), req_per_chunk):
                chunk = active[c0 : c0 + req_per_chunk]
                rows = [r for i in chunk for r in per_req[i]]
                ids, mask = pad_rows([r.ids for r in rows], pad)
                ids, mask = ids.to(device), mask.to(device)
                row_req = torch.tensor([r.req for r in rows], device=device)
                pos = torch.tensor([r.subject_last for r in rows], device=device)
                vec = delta[row_req].to(dtype=model.dtype)
                with (
                    add_at_positions(model, inject, vec, pos),
                    trace(model, [read, final_norm], capture_output=True, detach=False, stop=True) as tr,
                ):
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
                hidden = tr[final_norm].output
                if step == 0:  # row 0 of each request is its bare prompt (contexts[0] == "")
                    hb = tr[read].output.detach()
                    for k in range(0, len(rows), rows_per_req):
                        h0[rows[k].req] = hb[k, rows[k].subject_last].float()
                # Gather the needed positions, then the LM head on those only.
                sel_rows, sel_pos = [], []
                for k, r in enumerate(rows):
                    for p in r.target_pos:
                        sel_rows.append(k)
                        sel_pos.append(p)
                logits = logits_from_hidden(
                    model, hidden[torch.tensor(sel_rows, device=device), torch.tensor(sel_pos, device=device)]
                ).float()
                logp = torch.log_softmax(logits, -1)
                loss = logp.new_zeros(())
                cursor = 0
                nll_sum = {i: logp.new_zeros(()) for i in chunk}
                n_ctx = rows_per_req - 1
                for r in rows:
                    span = len(r.target_pos)
                    lp = logp[cursor : cursor + span]
                    cursor += span
                    if r.kind == "nll":
                        tok = torch.tensor(r.target_tok, device=device)
                        nll_sum[r.req] = nll_sum[r.req] + (-lp.gather(1, tok[:, None]).mean()) / n_ctx
                    else:
                        if kl_init[r.req] is None:
                            kl_init[r.req] = lp[0].detach()
                        ref = kl_init[r.req]
                        kl = F.kl_div(lp[0], ref, log_target=True, reduction="sum")
                        loss = loss + cfg.kl_factor * kl
                learning = False
                for i in chunk:
                    nll = float(nll_sum[i].detach())
                    nll_last[i] = nll
                    if step == 0:
                        nll_init[i] = nll
                    wd = cfg.weight_decay * delta[i].pow(2).sum() / h0[i].pow(2).sum().clamp_min(1e-12)
                    loss = loss + nll_sum[i] + wd
                    if nll >= cfg.stop_nll and step < cfg.steps:
                        still.append(i)
                        learning = True
                if learning:
                    loss.backward()
            if not still:
                active = []
                break
            frozen = torch.ones(u, dtype=torch.bool)
            frozen[still] = False
            keep = delta.detach()[frozen].clone()
            opt.step()
            with torch.no_grad():
                delta[frozen] = keep
                limit = cfg.clamp_norm_factor * h0.norm(dim=1)
                norms = delta.norm(dim=1).clamp_min(1e-12)
                scale = torch.where(norms > limit, limit / norms, torch.ones_like(norms))
                delta.mul_(scale[:, None])
            steps_taken[still] += 1
            active = still
            if progress:
                log.info("targets step %d: %d/%d requests still learning", step + 1, len(still), u)

    z = (h0 + delta.detach()).float()
    seconds = time.perf_counter() - t0
    log.debug("targets: %d requests, %.2fs, mean steps %.1f", u, seconds, steps_taken.float().mean())
    return TargetResult(z=z, h0=h0, nll_init=nll_init, nll_final=nll_last, steps=steps_taken, seconds=seconds)
