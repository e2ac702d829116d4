"""UltraEdit (arXiv 2505.14679): one-step, training-free lifelong editing by normalised least squares.

Per batch, one forward and backward pass of every request's ``prompt + target_new[:-1]`` (the mean
cross-entropy over the target tokens, as the reference's ``cross_entropy``) gives, at each position that
predicts a target token and for each edited matrix (the MLP's input projection by default: ``up_proj``),
its input ``k`` (``d_in``) and the gradient ``g`` of the loss with respect to its output (``d_out``). A
running mean and standard deviation over the whole stream of ``[k, g]`` features (the reference's
``RunningMeanStd``, one per matrix shape, shared by the edited matrices, updated with every matrix's
features of the batch before any is used) normalises them to ``[k^, g^]``; each position's pseudo-value is

    v = -lr * ||k^||^2 * g^

and the edited matrix moves by the ridge least-squares map of the raw keys onto the pseudo-values,

    Delta = (K^T K + ridge I)^{-1} K^T V       (K: n_positions x d_in, V: n_positions x d_out)

all matrices from the gradients of the same (unedited-in-this-batch) model, as the reference's
``ULTRAEDIT.predict_param_shifts``. No target optimisation and no key statistics: the fastest editor
here. The normaliser's state (count, mean, accumulated variance) is the editor's state, saved with it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from rlsedit.editors.base import BatchReport, EditorConfig, LayerUpdate, register_editor
from rlsedit.editors.ft import _encode, _Rows
from rlsedit.editors.loop import LocateThenEditEditor
from rlsedit.locate.targets import frozen_params
from rlsedit.models.arch import add_delta_kv, block_name, get_arch, get_module, input_device
from rlsedit.requests import EditRequest

__all__ = ["UltraEditConfig", "UltraEditEditor", "running_update", "ultraedit_delta"]

log = logging.getLogger(__name__)

_EPS32 = float(torch.finfo(torch.float32).eps)


def running_update(
    n: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference ``RunningMeanStd.update`` with rows ``x (m, d)``: ``n' = n + m``,
    ``delta = mean(x) - mean``, ``mean' = mean + m delta / n'``,
    ``var' = var + m var(x) + n m delta^2 / n'`` (``var(x)`` unbiased; 0 for one row)."""
    m = x.shape[0]
    n_new = n + m
    delta = x.mean(0) - mean
    xv = x.var(0) if m > 1 else torch.zeros_like(mean)
    return n_new, mean + m * delta / n_new, var + m * xv + n * m * delta.pow(2) / n_new


def normalise(x: torch.Tensor, n: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """The reference ``RunningMeanStd.forward``: ``(x - mean) / (std + eps)``, ``std = sqrt(var / (n - 1 +
    eps))`` (``eps`` float32's)."""
    std = (var / (n - 1 + _EPS32)).sqrt()
    return (x - mean) / (std + _EPS32)


def ultraedit_delta(
    K: torch.Tensor,
    G: torch.Tensor,
    n: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    lr: float,
    ridge: float,
) -> torch.Tensor:
    """``Delta (d_in, d_out) = (K^T K + ridge I)^{-1} K^T V`` with ``V = -lr ||k^||^2 g^`` per row,
    ``[k^, g^]`` the rows ``[K, G]`` (``(n, d_in)``, ``(n, d_out)``) normalised by the running statistics."""
    d_in = K.shape[1]
    z = normalise(torch.cat([K, G], 1), n, mean, var)
    k_hat, g_hat = z[:, :d_in], z[:, d_in:]
    V = -lr * (k_hat * k_hat).sum(1, keepdim=True) * g_hat
    A = K.mT @ K
    A.diagonal().add_(ridge)
    return torch.linalg.solve(A, K.mT @ V)


@dataclass
class UltraEditConfig(EditorConfig):
    """UltraEdit settings (the inherited target-optimisation settings are not used).

    Attributes:
        layers: blocks whose matrix is edited.
        module: the edited matrix in each block: ``"mlp_in"`` (the architecture's MLP input projection,
            ``up_proj`` / ``c_fc`` ...) or a path relative to the block, e.g. ``"mlp.gate_proj"``.
        lr: the pseudo-value step (the reference's ``editor.lr``).
        ridge: the ridge of the least-squares map (the reference's identity: 1).
        warmup: 0 (the reference): the normaliser starts empty, so the first batch's features are
            normalised by their own statistics (with few rows, e.g. two single-token edits, that keeps
            little more than signs). ``N > 0``: before the first batch, the features of ``N`` CounterFact
            tune requests (spread over the split; nothing is edited) prime the statistics.
    """

    layers: tuple[int, ...] = (17, 18, 19, 20, 21, 22, 23)
    module: str = "mlp_in"
    lr: float = 1e-6
    ridge: float = 1.0
    warmup: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.lr > 0 or not self.ridge > 0:
            raise ValueError(f"ultraedit needs lr > 0 and ridge > 0, got lr={self.lr}, ridge={self.ridge}")
        if not self.module:
            raise ValueError("module must name the edited matrix ('mlp_in' or a path inside a block)")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")


@contextmanager
def _captured(module: nn.Module, leaf: list[torch.Tensor], inputs: list[torch.Tensor]) -> Iterator[None]:
    """While in the block, ``module``'s input is kept in ``inputs`` and its output gets a zero tensor added
    that requires grad (kept in ``leaf``: its gradient is the output's)."""

    def hook(mod: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        inputs.append(args[0].detach())
        zero = torch.zeros_like(output, requires_grad=True)
        leaf.append(zero)
        return output + zero

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@register_editor
class UltraEditEditor(LocateThenEditEditor):
    """The UltraEdit editor (see the module docstring)."""

    name: ClassVar[str] = "ultraedit"
    config_class: ClassVar[type[EditorConfig]] = UltraEditConfig
    needs_stats: ClassVar[bool] = False
    uses_targets: ClassVar[bool] = False
    config: UltraEditConfig

    def module_name(self, layer: int) -> str:
        rel = get_arch(self.model).mlp_in if self.config.module == "mlp_in" else self.config.module
        return f"{block_name(self.model, layer)}.{rel}"

    def init_layer_state(
        self, layer: int, W0: torch.Tensor, sigma: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """The running statistics of ``[k, g]`` (``d_in + d_out``), float64, kept with the lowest edited
        layer (one normaliser for the edited matrices, which share a shape)."""
        if layer != self.config.layers[0]:
            return {}
        d = W0.shape[0] + W0.shape[1]
        z = torch.zeros(d, dtype=torch.float64, device=W0.device)
        return {"n": torch.zeros(1, dtype=torch.float64, device=W0.device), "mean": z, "var": z.clone()}

    def prepare(self) -> None:
        """With ``warmup``, prime the normaliser with the features of tune requests (nothing edited)."""
        cfg = self.config
        if not cfg.warmup:
            return
        from rlsedit.datasets import load_counterfact

        tune = load_counterfact(split="tune")
        n_req = min(cfg.warmup, len(tune))
        reqs = [tune[i * len(tune) // n_req].request for i in range(n_req)]
        st = self.layer_state[cfg.layers[0]]
        n, mean, var = st["n"], st["mean"], st["var"]
        for s in range(0, len(reqs), 32):
            feats, _ = self._features(reqs[s : s + 32])
            for layer in cfg.layers:
                K, G = feats[layer]
                n, mean, var = running_update(n, mean, var, torch.cat([K, G], 1).to(mean.device))
        self.layer_state[cfg.layers[0]] = {"n": n, "mean": mean, "var": var}
        log.info("ultraedit: normaliser primed with %d rows of %d tune requests", int(n.item()), n_req)

    def _features(
        self, reqs: list[EditRequest]
    ) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], float]:
        """``{layer: (K (n, d_in), G (n, d_out))}`` at the positions predicting target tokens, float64, and
        the loss (mean cross-entropy over the batch's target tokens)."""
        batch = _encode(self.tokenizer, reqs, input_device(self.model))
        leaves: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.modules}
        inputs: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.modules}
        with ExitStack() as stack:
            stack.enter_context(frozen_params(self.model))
            for layer, name in self.modules.items():
                stack.enter_context(_captured(get_module(self.model, name), leaves[layer], inputs[layer]))
            loss = self._target_loss(batch)
            loss.backward()
        out = {}
        for layer in self.modules:
            x, leaf = inputs[layer][0], leaves[layer][0]
            r, p = batch.rows.to(x.device), batch.pos.to(x.device)
            assert leaf.grad is not None
            out[layer] = (x[r, p].to(torch.float64), leaf.grad[r, p].to(torch.float64))
        return out, float(loss.detach())

    def locate_and_solve(
        self, reqs: list[EditRequest], report: BatchReport
    ) -> tuple[dict[int, LayerUpdate], dict[str, float]]:
        """Keys and output gradients in one pass, the normaliser updated with every edited matrix's
        features, then each matrix's ``Delta`` written (checked like every update)."""
        cfg = self.config
        t0 = time.perf_counter()
        feats, loss = self._features(reqs)
        t1 = time.perf_counter()
        first = cfg.layers[0]
        st = self.layer_state[first]
        n, mean, var = st["n"], st["mean"], st["var"]
        for layer in cfg.layers:  # the reference updates with every module's features before predicting
            K, G = feats[layer]
            n, mean, var = running_update(n, mean, var, torch.cat([K, G], 1).to(mean.device))
        weights = self._weights()
        pendings: dict[int, LayerUpdate] = {}
        for layer in cfg.layers:
            K, G = (t.to(mean.device) for t in feats[layer])
            delta = ultraedit_delta(K, G, n, mean, var, cfg.lr, cfg.ridge)
            W = weights[layer]
            self._check_delta(layer, delta, W)
            add_delta_kv(get_module(self.model, self.modules[layer]), delta)
            state = {"n": n, "mean": mean, "var": var} if layer == first else {}
            pendings[layer] = LayerUpdate(delta=delta, state=state, record={})
            report.layers[layer] = {
                "residual_norm": float("nan"),
                "delta_norm": float(delta.norm()),
                "weight_norm": float(W.detach().norm()),
            }
        report.target_nll_init = loss
        with torch.no_grad():  # on the model as edited now
            report.target_nll_final = float(
                self._target_loss(_encode(self.tokenizer, reqs, input_device(self.model)))
            )
        # no target optimisation: the pass that gives keys and gradients is timed as "keys"
        return pendings, {"targets": 0.0, "keys": t1 - t0, "update": time.perf_counter() - t1}

    def _target_loss(self, batch: _Rows) -> torch.Tensor:
        """The mean cross-entropy over ``batch``'s target tokens (a scalar; differentiable)."""
        logits = self.model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False).logits
        dev = logits.device
        picked = logits[batch.rows.to(dev), batch.pos.to(dev)].float()
        return torch.nn.functional.cross_entropy(picked, batch.tok.to(dev))
