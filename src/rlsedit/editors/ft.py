"""FT-L: constrained fine-tuning of MLP output weights (the ROME paper's FT baseline).

The edited layers' MLP output weights ``W`` (``d_k x d_v`` each) get ``steps`` Adam steps on the mean
per-token negative log-likelihood of each request's ``target_new`` after its prompt (averaged over the
requests of the batch). After every step the change is clamped elementwise (an L-infinity bound):

* ``clamp_to="batch"`` (default, as in the ROME and EasyEdit code): ``|W - W_before| <= norm_constraint``,
  with ``W_before`` the weight before this batch;
* ``clamp_to="base"``: ``|W - W_0| <= norm_constraint`` over the whole run (the total change is bounded).

The optimised variable is a float32 change ``D`` added to the layer's output as ``x @ D`` (``x`` the
layer's input), which has exactly the gradient of fine-tuning ``W`` itself, keeps full precision for
half-precision models and leaves the model untouched until the batch's result is written. FT uses no
targets, keys or statistics; it shares the batch machinery of :class:`LocateThenEditEditor` (all-or-nothing
batches, the update bound, records, saving and loading).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from rlsedit.editors.base import BatchReport, EditorConfig, LayerUpdate, register_editor
from rlsedit.editors.loop import LocateThenEditEditor
from rlsedit.locate.targets import frozen_params
from rlsedit.locate.tokens import encode_text_upto, pad_id_of, pad_rows, target_ids
from rlsedit.models.arch import add_delta_kv, get_module, input_device
from rlsedit.requests import EditRequest

__all__ = ["FTConfig", "FTEditor"]

log = logging.getLogger(__name__)

_CLAMP_TO = ("batch", "base")


@dataclass
class FTConfig(EditorConfig):
    """FT-L settings (the inherited target-optimisation settings are not used).

    Attributes:
        layers: the fine-tuned layers (their MLP output projections); FT-L uses one, e.g. ``(5,)``.
        lr: Adam learning rate.
        steps: at most this many optimisation steps per batch.
        norm_constraint: the L-infinity bound on the weight change (``> 0``).
        clamp_to: ``"batch"`` bounds each batch's change, ``"base"`` the change from ``W_0`` (see module).
        stop_loss: stop early once the mean target NLL is below this (``0``: never).
    """

    layers: tuple[int, ...] = (5,)
    lr: float = 5e-4
    steps: int = 25
    norm_constraint: float = 5e-4
    clamp_to: str = "batch"
    stop_loss: float = 1e-2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.lr > 0 or self.steps < 1:
            raise ValueError(f"ft needs lr > 0 and steps >= 1, got lr={self.lr}, steps={self.steps}")
        if not self.norm_constraint > 0:
            raise ValueError(f"norm_constraint must be > 0, got {self.norm_constraint}")
        if self.clamp_to not in _CLAMP_TO:
            raise ValueError(f"clamp_to must be one of {list(_CLAMP_TO)}, got {self.clamp_to!r}")
        if self.stop_loss < 0:
            raise ValueError(f"stop_loss must be >= 0, got {self.stop_loss}")


@contextmanager
def _added_product(module: nn.Module, D: torch.Tensor) -> Iterator[None]:
    """While in the block, ``module``'s output ``y`` (``(..., d_v)``) becomes ``y + x @ D`` with ``x``
    (``(..., d_k)``) its input and ``D`` of shape ``(d_k, d_v)`` (differentiably)."""

    def hook(mod: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        return output + (x.to(D.dtype) @ D).to(output.dtype)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class _Rows:
    ids: torch.Tensor  # (n, T)
    mask: torch.Tensor  # (n, T)
    rows: torch.Tensor  # (m,) row of each target token
    pos: torch.Tensor  # (m,) position whose next-token prediction is the target token
    tok: torch.Tensor  # (m,) the target token
    weight: torch.Tensor  # (m,) 1 / (n * len(target)): the loss is the mean over requests of per-token means


def _encode(tokenizer: Any, requests: list[EditRequest], device: torch.device) -> _Rows:
    """Rows ``prompt + target_new[:-1]`` and the target positions (one row per request)."""
    seqs, rows, pos, tok, weight = [], [], [], [], []
    n = len(requests)
    for i, req in enumerate(requests):
        ids, _ = encode_text_upto(tokenizer, req.text, len(req.prefix) + len(req.subject))
        tgt = target_ids(tokenizer, req.target_new_text)
        seqs.append(ids + tgt[:-1])
        for j, token in enumerate(tgt):
            rows.append(i)
            pos.append(len(ids) - 1 + j)
            tok.append(token)
            weight.append(1.0 / (n * len(tgt)))
    ids, mask = pad_rows(seqs, pad_id_of(tokenizer))

    def tensor(x: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(x, dtype=dtype, device=device)

    return _Rows(
        ids.to(device),
        mask.to(device),
        tensor(rows, torch.long),
        tensor(pos, torch.long),
        tensor(tok, torch.long),
        tensor(weight, torch.float32),
    )


@register_editor
class FTEditor(LocateThenEditEditor):
    """The FT-L editor (see the module docstring)."""

    name: ClassVar[str] = "ft"
    config_class: ClassVar[type[EditorConfig]] = FTConfig
    needs_stats: ClassVar[bool] = False
    uses_targets: ClassVar[bool] = False
    config: FTConfig

    def _loss(self, batch: _Rows) -> torch.Tensor:
        """Mean over requests of the mean per-token NLL of ``target_new`` (a scalar)."""
        logits = self.model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False).logits
        dev = logits.device  # the LM head's device (not the input's when the model is spread)
        logp = torch.log_softmax(logits[batch.rows.to(dev), batch.pos.to(dev)].float(), -1)
        nll = -logp.gather(1, batch.tok.to(dev)[:, None])[:, 0]
        return (nll * batch.weight.to(dev)).sum()

    def locate_and_solve(
        self, reqs: list[EditRequest], report: BatchReport
    ) -> tuple[dict[int, LayerUpdate], dict[str, float]]:
        """Fine-tune the changes ``D`` (``d_k x d_v`` per layer) under the L-infinity bound, then write
        them into the model (checked like every update). No state, nothing recorded."""
        cfg = self.config
        t0 = time.perf_counter()
        batch = _encode(self.tokenizer, reqs, input_device(self.model))
        weights = self._weights()
        eps = cfg.norm_constraint
        D: dict[int, torch.Tensor] = {}
        room: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # clamp_to="base": bounds of D
        for layer, W in weights.items():  # each D on its layer's device
            D[layer] = torch.zeros(W.shape, device=W.device, dtype=torch.float32, requires_grad=True)
            if cfg.clamp_to == "base":  # the room between W and W0 +- eps (W is already within the bound)
                offset = self.W0[layer].to(device=W.device, dtype=torch.float32) - W.detach().float()
                room[layer] = ((offset - eps).clamp_max(0.0), (offset + eps).clamp_min(0.0))
        opt = torch.optim.Adam(list(D.values()), lr=cfg.lr)
        losses: list[float] = []
        with ExitStack() as stack:
            stack.enter_context(frozen_params(self.model))
            for layer, name in self.modules.items():
                stack.enter_context(_added_product(get_module(self.model, name), D[layer]))
            for step in range(cfg.steps + 1):
                final = step == cfg.steps
                opt.zero_grad(set_to_none=True)
                with torch.set_grad_enabled(not final):
                    loss = self._loss(batch)
                losses.append(float(loss.detach()))
                if final or losses[-1] < cfg.stop_loss:
                    break
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for layer, d in D.items():
                        if cfg.clamp_to == "base":
                            d.copy_(torch.minimum(torch.maximum(d, room[layer][0]), room[layer][1]))
                        else:
                            d.clamp_(-eps, eps)
        report.target_nll_init = losses[0]
        report.target_nll_final = losses[-1]
        log.debug(
            "ft: %d requests, %d steps, NLL %.3f -> %.3f", len(reqs), len(losses) - 1, losses[0], losses[-1]
        )
        t1 = time.perf_counter()
        pendings: dict[int, LayerUpdate] = {}
        for layer, W in weights.items():
            delta = D[layer].detach().to(torch.float64)
            self._check_delta(layer, delta, W)
            add_delta_kv(get_module(self.model, self.modules[layer]), delta)
            pendings[layer] = LayerUpdate(delta=delta.cpu(), state={}, record={})
            report.layers[layer] = {
                "residual_norm": float("nan"),
                "delta_norm": float(delta.norm()),
                "weight_norm": float(W.detach().norm()),
            }
        # FT has no target optimisation: its fine-tuning loop is timed under its own name
        timings = {"finetune": t1 - t0, "keys": 0.0, "update": time.perf_counter() - t1}
        return pendings, timings
