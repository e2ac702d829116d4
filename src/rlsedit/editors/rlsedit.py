"""RLSEdit: soft recursive least squares over the stream of edits (arXiv 2601.15686).

Per edited layer the editor carries ``C_t = A_t^{-1}`` (``d_k x d_k``), where
``A_t = lambda^2 I + mu^2 Sigma + sum_s K_s K_s^T``, and updates ``W`` by the Woodbury recursion of
:func:`rlsedit.linalg.rls_step`, so that after every batch ``W_t`` minimises

    sum_s ||K_s^T W - V_s||^2 + lambda^2 ||W - W_0||^2 + mu^2 ||K_0^T (W - W_0)||^2

with a per-batch cost that does not grow with the number of edits. The recorded targets are
``V_t = K_t^T W_{t-1} + E_t`` (E_t: this layer's share of the residual). Recorded ``K_s`` and ``V_s`` are
written to the run directory, so any batch, or one request, can be retracted exactly later.

Layer state: ``C`` (``C_t``), ``A`` (``A_t``, float64) and the running sums over the active requests
``B = sum_s K_s V_s`` (``(d_k, d_v)``, float64) and ``vv = sum_s ||V_s||_F^2`` (``(1,)``, float64), so that
the objective's terms can be evaluated without reading the records (:mod:`rlsedit.eval.objective`), with
``sum_s K_s K_s^T = A_t - A_0`` (a run saved before ``B`` and ``vv`` existed is upgraded by
``scripts/migrate_runs.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from rlsedit.editors.base import EditorConfig, LayerUpdate, register_editor
from rlsedit.editors.loop import LocateThenEditEditor
from rlsedit.linalg import (
    RetractionError,
    anchor_matrix,
    drift,
    drift_estimate,
    initial_inverse,
    reinvert,
    rls_retract,
    rls_step,
)
from rlsedit.models.arch import add_delta_kv, get_module

__all__ = ["RLSEditConfig", "RLSEditor"]

log = logging.getLogger(__name__)

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass
class RLSEditConfig(EditorConfig):
    """RLSEdit settings.

    Attributes:
        lam: lambda, the pull toward ``W_0`` in every direction (keep > 0 so ``C_0`` is well conditioned).
        mu: the anchor: ``mu^2`` is the weight of the key second moment (the authors' ``mom2_update_weight``).
        state_dtype: dtype of ``C_t`` ("float64" or "float32").
        drift_check_every: check ``||A_t C_t - I||`` every this many batches (0: never).
        drift_bound: re-invert ``A_t`` when the drift passes this (default: 1e-6 in float64, 1e-3 in float32).
        drift_exact_max: layers with ``d_k`` up to this get the exact drift (``O(d_k^3)``); larger ones a
            randomised estimate with ``drift_probes`` probes (``O(d_k^2 probes)``, see
            :func:`rlsedit.linalg.drift_estimate`): at ``d_k = 14336`` the exact check costs more than ten
            updates.
        anchor_ref: 0 (default): a fixed anchor ``mu^2``. ``n_ref > 0``: the anchor keeps its share as
            edits accumulate, ``mu_t^2 = mu^2 * max(1, n_t / n_ref)`` (``n_t``: edits applied, this batch
            included), re-weighed every ``anchor_every`` batches. Each re-weighing re-inverts ``A_t``
            (``O(d_k^3)`` per layer) and moves ``W`` to the exact minimiser of the re-weighed objective over
            every recorded batch (``W_0 + C_t (B_t - G_t W_0)``, ``G_t = sum_s K_s K_s^T``); retraction stays
            exact. Between re-weighings ``mu_t`` stays where it was set.
        anchor_every: batches between re-weighings of a growing anchor.
        double_buffer: keep the ``C_t`` and ``A_t`` that a batch replaced and write the next batch's
            into them, instead of allocating two new ``(d_k, d_k)`` matrices per layer per batch (their
            page faults cost ~25% of an update at ``d_k = 14336``). The spares stay allocated between
            batches: the same peak memory as without, a higher resting one (two more ``d_k^2`` matrices
            per layer).
    """

    lam: float = 1.0
    mu: float = 31.6
    state_dtype: str = "float64"
    drift_check_every: int = 10
    drift_bound: float | None = None
    drift_exact_max: int = 4096
    drift_probes: int = 32
    double_buffer: bool = True
    anchor_ref: int = 0
    anchor_every: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lam < 0 or self.mu < 0:
            raise ValueError("lam and mu must be >= 0")
        if self.lam == 0 and self.mu == 0:
            raise ValueError("lam and mu cannot both be 0 (C_0 would not exist)")
        if self.state_dtype not in _DTYPES:
            raise ValueError(f"state_dtype must be one of {sorted(_DTYPES)}")
        if self.drift_check_every < 0:
            raise ValueError("drift_check_every must be >= 0")
        if self.drift_exact_max < 0 or self.drift_probes < 1:
            raise ValueError("drift_exact_max must be >= 0 and drift_probes >= 1")
        if self.anchor_ref < 0 or self.anchor_every < 1:
            raise ValueError("anchor_ref must be >= 0 (0: a fixed anchor) and anchor_every >= 1")

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.state_dtype]

    @property
    def bound(self) -> float:
        if self.drift_bound is not None:
            return self.drift_bound
        return 1e-6 if self.dtype == torch.float64 else 1e-3


@register_editor
class RLSEditor(LocateThenEditEditor):
    """The RLSEdit editor (see the module docstring)."""

    name: ClassVar[str] = "rlsedit"
    config_class: ClassVar[type[EditorConfig]] = RLSEditConfig
    config: RLSEditConfig

    def init_layer_state(
        self, layer: int, W0: torch.Tensor, sigma: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """``C_0 = (lam^2 I + mu^2 Sigma)^{-1}`` in ``state_dtype`` and ``A_0`` (float64), both ``(d_k, d_k)``
        on Sigma's device (the layer's), and the zero running sums ``B (d_k, d_v)`` and ``vv (1,)``."""
        cfg = self.config
        assert sigma is not None
        C0 = initial_inverse(sigma, cfg.lam, cfg.mu, dtype=cfg.dtype)
        # A_0 exactly as C_0 inverts it (initial_inverse symmetrises Sigma), in float64
        A0 = anchor_matrix(sigma, cfg.lam, cfg.mu)
        B = torch.zeros(tuple(W0.shape), dtype=torch.float64, device=A0.device)
        return {
            "C": C0,
            "A": A0,
            "B": B,
            "vv": torch.zeros(1, dtype=torch.float64, device=A0.device),
            "mu2": torch.full((1,), cfg.mu**2, dtype=torch.float64, device=A0.device),
        }

    def anchor_mu2(self, layer: int) -> float:
        """The anchor weight ``mu_t^2`` at ``layer`` (``mu^2`` unless a growing anchor raised it)."""
        st = self.layer_state[layer]
        return float(st["mu2"]) if "mu2" in st else self.config.mu**2

    def _anchor_target(self, batch_index: int, n_after: int) -> float | None:
        """The anchor weight a growing anchor sets at batch ``batch_index`` (``n_after`` edits applied with
        it), or None when it is fixed or not due at this batch."""
        cfg = self.config
        if not cfg.anchor_ref or batch_index % cfg.anchor_every:
            return None
        return cfg.mu**2 * max(1.0, n_after / cfg.anchor_ref)

    def _reanchor(
        self, layer: int, st: dict[str, torch.Tensor], mu2_new: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(C, A, W)`` with the anchor re-weighed to ``mu2_new``: ``A' = A + (mu2_new - mu_t^2) Sigma``,
        ``C' = A'^{-1}`` (fresh Cholesky) and the exact minimiser ``W' = W_0 + C' (B - G W_0)`` of the
        re-weighed objective over the recorded batches, ``G = A - lam^2 I - mu_t^2 Sigma`` (float64)."""
        import math

        cfg = self.config
        A = st["A"]
        dev = A.device
        sigma = self.sigma_on_device(layer, keep=False).to(torch.float64)
        mu2_old = self.anchor_mu2(layer)
        G = A - anchor_matrix(sigma, cfg.lam, math.sqrt(mu2_old))
        A_new = anchor_matrix(sigma, cfg.lam, math.sqrt(mu2_new)) + G
        A_new = 0.5 * (A_new + A_new.T)
        C_new = reinvert(A_new, cfg.dtype)
        W0 = self.W0[layer].to(device=dev, dtype=torch.float64)
        W_new = W0 + C_new.to(torch.float64) @ (st["B"] - G @ W0)
        log.info("layer %d: anchor re-weighed, mu_t^2 %.4g -> %.4g", layer, mu2_old, mu2_new)
        return C_new, A_new, W_new

    def solve(
        self,
        layer: int,
        K: torch.Tensor,
        E: torch.Tensor,
        W: torch.Tensor,
        *,
        K_prompt: torch.Tensor | None = None,
    ) -> LayerUpdate:
        """One RLS step for keys ``K (d_k, u)`` and residual share ``E (u, d_v)``.

        Runs on the device of the layer's state ``C`` (the layer's device), in ``C``'s dtype for ``C`` and
        float64 for ``W``; the delta ``(d_k, d_v)`` is cast to the weight's dtype when written. Records
        ``K`` and ``V = K^T W + E`` (float32, CPU) for retraction.
        """
        st = self.layer_state[layer]
        dev = st["C"].device
        W64 = W.to(device=dev, dtype=torch.float64)
        # The recorded K and V are float32; the update uses exactly the recorded values so that
        # retraction later removes exactly what was added.
        K32 = K.to(device=dev, dtype=torch.float32)
        V32 = (K32.to(torch.float64).T @ W64 + E.to(dev)).to(torch.float32)
        K64, V64 = K32.to(torch.float64), V32.to(torch.float64)
        C_prev, A_prev, W_prev = st["C"], st["A"], W64
        mu2 = self.anchor_mu2(layer)
        target = self._anchor_target(len(self.batches), self.n_applied + K.shape[1])
        if target is not None and target > mu2 * (1.0 + 1e-12):
            C_prev, A_prev, W_prev = self._reanchor(layer, st, target)
            mu2 = target
        C_next, W_next = rls_step(C_prev, W_prev, K64, V64, out=self._take_spare(layer, "C", st["C"]))
        delta = W_next - W64
        A_out = self._take_spare(layer, "A", st["A"])
        A_next = (
            torch.addmm(A_prev, K64, K64.T) if A_out is None else torch.addmm(A_prev, K64, K64.T, out=A_out)
        )
        state = {"C": C_next, "A": A_next}
        if "mu2" in st or mu2 != self.config.mu**2:
            state["mu2"] = torch.full((1,), mu2, dtype=torch.float64, device=dev)
        state["B"] = torch.addmm(st["B"], K64, V64)
        state["vv"] = st["vv"] + (V64 * V64).sum()
        return LayerUpdate(
            delta=delta,
            state=state,
            record={"K": K32.cpu().contiguous(), "V": V32.cpu().contiguous()},
        )

    def init_runtime(self) -> None:
        #: the kept state buffers, by ``(layer, state name)`` (empty until a batch commits)
        self._spare_buffers: dict[tuple[int, str], torch.Tensor] = {}

    def _spares(self) -> dict[tuple[int, str], torch.Tensor]:
        """The kept state buffers, by ``(layer, state name)`` (per editor; empty until a batch commits)."""
        return self._spare_buffers

    def _take_spare(self, layer: int, name: str, like: torch.Tensor) -> torch.Tensor | None:
        """A kept buffer for state ``name`` of ``layer`` shaped like ``like`` (removed from the spares: it is
        about to hold the next state), or None."""
        buf = self._spares().pop((layer, name), None)
        if buf is None or not self.config.double_buffer:
            return None
        if buf.shape != like.shape or buf.dtype != like.dtype or buf.device != like.device:
            return None
        if not buf.is_contiguous() or buf.data_ptr() == like.data_ptr():
            return None
        return buf

    def recycle_state(self, old: dict[int, dict[str, torch.Tensor]]) -> None:
        """Keep the replaced ``C`` and ``A`` of each layer as the next batch's output buffers (when no
        current state tensor shares their memory)."""
        spares = self._spares()
        spares.clear()
        if not self.config.double_buffer:
            return
        for layer, st in old.items():
            live = {
                t.data_ptr() for t in self.layer_state.get(layer, {}).values() if isinstance(t, torch.Tensor)
            }
            for name in ("C", "A"):
                t = st.get(name)
                if isinstance(t, torch.Tensor) and t.is_contiguous() and t.data_ptr() not in live:
                    spares[(layer, name)] = t

    def after_batch(self) -> None:
        every = self.config.drift_check_every
        if every and len(self.batches) % every == 0:
            self.check_drift()

    def check_drift(self) -> dict[int, float]:
        """``||A_t C_t - I||_F / sqrt(d_k)`` per layer (exact, or estimated above ``drift_exact_max``);
        re-inverts ``A_t`` where it passes the bound."""
        out = {}
        for layer, st in self.layer_state.items():
            C, A = st["C"], st["A"]
            if C.shape[0] <= self.config.drift_exact_max:
                d = drift(C, A)
            else:
                d = drift_estimate(C, A, self.config.drift_probes, seed=len(self.batches))
            out[layer] = d
            if d > self.config.bound:
                log.warning("layer %d: drift %.3g > %.3g; re-inverting A_t", layer, d, self.config.bound)
                st["C"] = reinvert(st["A"], self.config.dtype)
        return out

    # -- retraction -------------------------------------------------------------------------------------

    def supersede(self, items: list[tuple[int, int]]) -> None:
        """Retract the earlier requests that this batch re-edits (same subject and prompt)."""
        by_batch: dict[int, list[int]] = {}
        for b, j in items:
            by_batch.setdefault(b, []).append(j)
        for b, idx in by_batch.items():
            log.info("retracting %d superseded request(s) of batch %d", len(idx), b)
            self._retract(b, idx, commit=False)

    def objective_terms(self) -> dict[int, dict[str, Any]]:
        """The objective's terms per edited layer after the last applied batch
        (:func:`rlsedit.eval.objective.objective_terms`)."""
        from rlsedit.eval.objective import objective_terms

        return objective_terms(self)

    def retract(self, batch_id: int, index: int | None = None) -> dict[str, Any]:
        """Take back batch ``batch_id`` (or only its request ``index``), keeping every other edit.

        The result is the exact minimiser of the objective without that batch (or request). The later
        batches' keys and targets were computed with it applied, so this is not the model as it was
        before it: measure what it restores. Raises ``RetractionError`` (nothing changed) when the batch
        dominates its key directions so that the downdate is numerically unsafe.

        Returns:
            ``{"batch": id, "requests": [indices], "layers": {layer: ||dW||_F}}``.
        """
        idx = None if index is None else [int(index)]
        return self._retract(batch_id, idx, commit=True)

    def retract_request(self, subject: str, prompt: str) -> dict[str, Any]:
        """Retract the active request with this subject and prompt (``{}`` form or literal)."""
        from rlsedit.requests import EditRequest

        key = EditRequest(prompt=prompt, subject=subject, target_new="_").key
        for b in self.batches:
            for j, rd in enumerate(b["requests"]):
                if b["active"][j] and EditRequest.from_dict(rd).key == key:
                    return self.retract(b["id"], j)
        raise KeyError(f"no active request edits subject {subject!r} with prompt {prompt!r}")

    def _find_batch(self, batch_id: int) -> dict:
        for b in self.batches:
            if b["id"] == batch_id:
                return b
        raise KeyError(f"no batch {batch_id} in this run (batches: {[b['id'] for b in self.batches]})")

    def _retract(self, batch_id: int, indices: list[int] | None, commit: bool) -> dict[str, Any]:
        batch = self._find_batch(batch_id)
        active = [j for j, a in enumerate(batch["active"]) if a]
        if indices is None:
            cols = active
        else:
            for j in indices:
                if not 0 <= j < len(batch["active"]):
                    raise IndexError(f"batch {batch_id} has {len(batch['active'])} requests; no index {j}")
                if not batch["active"][j]:
                    raise ValueError(f"request {j} of batch {batch_id} is already retracted")
            cols = sorted(set(indices))
        if not cols:
            raise ValueError(f"batch {batch_id} has no active request left to retract")
        weights = self._weights()
        new: dict[int, tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = {}
        for layer in self.config.layers:  # compute everything first: all-or-nothing
            rec = self.load_record(batch, layer)
            st = self.layer_state[layer]
            dev = st["C"].device  # the layer's device
            K = rec["K"][:, cols].to(device=dev, dtype=torch.float64)
            V = rec["V"][cols].to(device=dev, dtype=torch.float64)
            W64 = weights[layer].detach().to(device=dev, dtype=torch.float64)
            # A lets the safety check account for the error C has accumulated as an inverse of A
            try:
                C_new, W_new = rls_retract(st["C"], W64, K, V, A=st["A"])
            except RetractionError as exc:
                what = f"batch {batch_id}" + ("" if indices is None else f", request(s) {cols}")
                raise RetractionError(f"{what}, layer {layer}: {exc}; nothing was changed") from exc
            state = {**st, "C": C_new, "A": st["A"] - K @ K.T}
            state["B"] = st["B"] - K @ V
            state["vv"] = st["vv"] - (V * V).sum()
            new[layer] = (C_new, W_new - W64, state)
        with self.transaction():
            for layer, (_, dW, state) in new.items():
                self._check_delta(layer, dW, weights[layer])
                add_delta_kv(get_module(self.model, self.modules[layer]), dW)
                self.layer_state[layer] = state
            for j in cols:
                batch["active"][j] = 0
            if commit:
                self.commit()
        return {
            "batch": batch_id,
            "requests": cols,
            "layers": {layer: float(v[1].norm()) for layer, v in new.items()},
        }
