"""The one locate-then-edit loop the closed-form editors share (RLSEdit, MEMIT, AlphaEdit, ROME, EvoEdit).

Data flow of one batch (see docs/DESIGN.md)::

    requests -> validate -> targets z (at the last edited layer)
             -> for each edited layer, lowest first:
                  keys K (current model) -> residual share E -> editor.solve(layer, K, E) -> delta W -> write
             -> record the batch (K, V on disk) -> commit the run directory

A batch is all-or-nothing: any failure (bad request, non-finite or unbounded update, an exception)
restores the edited weights and the editor's state to what they were before the batch
(:meth:`LocateThenEditEditor.transaction`). An editor implements ``init_layer_state`` and ``solve``;
one whose update does not come from keys and targets (FT,
UltraEdit) implements ``locate_and_solve`` instead. Where records and commits go:
:class:`rlsedit.recorder.RunRecorder`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from rlsedit.editors.base import (
    BatchReport,
    EditError,
    EditorConfig,
    EditReport,
    LayerUpdate,
    build_config,
    check_layers,
)
from rlsedit.editors.batches import (
    BatchRecord,
    applied_hashes,
    check_fits_context,
    dedupe,
    hash_requests,
    one_at_a_time,
)
from rlsedit.locate import compute_hidden, compute_keys
from rlsedit.locate.keys import LowerBlocks
from rlsedit.locate.norm_anchor import anchored, measure_reference_norm
from rlsedit.locate.provider import TargetProvider, target_settings
from rlsedit.locate.targets import TargetResult
from rlsedit.locate.templates import generate_context_templates
from rlsedit.models.arch import (
    add_delta_kv,
    block_name,
    get_arch,
    get_module,
    mlp_out_name,
    weight_kv,
)
from rlsedit.recorder import EDITOR_KIND, RunRecorder, write_saved_weights
from rlsedit.requests import EditRequest, RequestError, validate_batch
from rlsedit.store import RunStore

__all__ = ["LocateThenEditEditor"]

log = logging.getLogger(__name__)


def _keys_with_prompt(
    model: nn.Module,
    tokenizer: Any,
    reqs: list[EditRequest],
    module: str,
    templates: list[str],
    weighting: str,
    lower: LowerBlocks | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``compute_keys`` with the bare prompts' keys: ``(K, K_prompt)``, each ``(d_k, u)``."""
    return compute_keys(
        model, tokenizer, reqs, module, templates, weighting=weighting, with_prompt=True, lower=lower
    )


class LocateThenEditEditor:
    """The editors' shared loop: subclasses set ``name`` and ``config_class`` and implement
    :meth:`init_layer_state` and :meth:`solve` (or :meth:`locate_and_solve`). Per-layer state is a dict of
    tensors (``self.layer_state[layer]``); per-batch records go to :attr:`recorder`."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[EditorConfig]] = EditorConfig
    #: Whether the editor needs the second-moment statistics.
    needs_stats: ClassVar[bool] = True
    #: Whether a batch is located and solved one request at a time (ROME): each request's targets and
    #: keys are computed on the model as edited by the requests before it, inside the same
    #: all-or-nothing batch, and solve() sees one key column at a time.
    one_request_at_a_time: ClassVar[bool] = False
    #: whether the editor optimises target hidden states (FT does not: it fine-tunes on the requests)
    uses_targets: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        config: EditorConfig,
        *,
        stats_dir: str | Path | None = None,
        sigmas: dict[int, torch.Tensor] | None = None,
    ) -> None:
        self._bind(model, tokenizer, config, stats_dir)
        self.templates = generate_context_templates(
            model, tokenizer, n=config.n_templates, length=config.template_length, seed=config.seed
        )
        self.W0 = {
            layer: weight_kv(get_module(model, name)).detach().clone() for layer, name in self.modules.items()
        }
        if self.needs_stats:
            if sigmas is None:
                sigmas = self._compute_sigmas()
            self.sigmas = {layer: sigmas[layer].to(torch.float64).cpu() for layer in config.layers}
        # Each layer's state lives on that layer's device (a model spread by device_map has several).
        for layer in config.layers:
            sigma = self.sigma_on_device(layer, keep=False) if layer in self.sigmas else None
            state = self.init_layer_state(layer, self.W0[layer], sigma)
            self.layer_state[layer] = self._on_layer_device(layer, state)
            del sigma  # a temporary copy on the layer's device unless an editor keeps one
        if config.norm_anchor and config.norm_anchor_ref <= 0 and self.uses_targets:
            last = config.layers[-1]
            args = (last, self.modules[last], self.templates, config.targets, config.norm_anchor_samples)
            config.norm_anchor_ref = measure_reference_norm(model, tokenizer, *args)
        self.prepare()

    def _bind(
        self, model: nn.Module, tokenizer: Any, config: EditorConfig, stats_dir: str | Path | None
    ) -> None:
        """What a new and a restored editor share: the model, the config (checked against the model) and
        empty state."""
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        arch = get_arch(model)
        if arch.norm_after_mlp:
            raise NotImplementedError(
                f"{model.config.model_type}: a normalisation follows the MLP output, so the hidden state is "
                "not linear in the edited matrix and the closed-form update would be wrong; rlsedit refuses "
                "to edit this architecture."
            )
        check_layers(model, config.layers)
        self.modules = {layer: self.module_name(layer) for layer in config.layers}
        for name in self.modules.values():
            if weight_kv(get_module(model, name)).is_meta:
                raise ValueError(
                    f"{name} is offloaded (its weight is on the meta device, loaded only during forwards): "
                    "an edited layer must live on a device; give the device_map enough GPU memory "
                    "(max_memory) to hold the model without offloading"
                )
        self.stats_dir = stats_dir
        self.templates: list[str] = []
        self.W0: dict[int, torch.Tensor] = {}
        self.sigmas: dict[int, torch.Tensor] = {}
        self.layer_state: dict[int, dict[str, torch.Tensor]] = {}
        self.batches: list[BatchRecord] = []  # manifest entries of applied batches
        self.recorder = RunRecorder()
        #: The name or path the model was loaded with (recorded in the run directory).
        self.load_name: str | None = None
        #: Where targets come from (a runtime setting, not saved): by default optimised on the current model.
        self.targets_provider = TargetProvider()
        self._sigma_copies: dict[int, torch.Tensor] = {}  # Sigma on another device than the CPU
        self.init_runtime()

    def init_runtime(self) -> None:
        """Called once for a new and for a restored editor, before any state exists: an editor creates
        its unsaved runtime caches here (never saved; rebuilt on demand)."""

    def prepare(self) -> None:
        """Called once when a new editor is made (not when one is loaded), after its state is initialised:
        an editor that measures something on the unedited model before the first batch does it here."""

    def module_name(self, layer: int) -> str:
        """Full path of the matrix this editor changes in block ``layer``: the MLP output projection (an
        editor that edits another matrix says which)."""
        return mlp_out_name(self.model, layer)

    def layer_device(self, layer: int) -> torch.device:
        """The device of edited layer ``layer``'s weight (where its state and solves live)."""
        return weight_kv(get_module(self.model, self.modules[layer])).device

    def _on_layer_device(self, layer: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dev = self.layer_device(layer)
        return {k: v.to(dev) for k, v in state.items()}

    def sigma_on_device(self, layer: int, keep: bool = True) -> torch.Tensor:
        """``Sigma`` (``(d_k, d_k)`` float64) of ``layer`` on the layer's device.

        ``self.sigmas`` stay on the CPU; with ``keep`` the copy on another device is kept for later calls
        (editors that use Sigma in every solve), without it it is made afresh.
        """
        dev = self.layer_device(layer)
        sigma = self.sigmas[layer]
        if sigma.device == dev:
            return sigma
        cache = self._sigma_copies
        if layer in cache and cache[layer].device == dev:
            return cache[layer]
        moved = sigma.to(dev)
        if keep:
            cache[layer] = moved
        return moved

    def _compute_sigmas(self) -> dict[int, torch.Tensor]:
        from rlsedit.stats import layer_sigmas

        cfg = self.config
        names = [self.modules[layer] for layer in cfg.layers]
        s = layer_sigmas(
            self.model,
            self.tokenizer,
            names,
            samples=cfg.stats_samples,
            corpus=cfg.stats_corpus,
            max_len=cfg.stats_max_len,
            stats_dir=self.stats_dir,
        )
        return {layer: s[self.modules[layer]] for layer in cfg.layers}

    # -- hooks for subclasses ---------------------------------------------------------------------------

    def init_layer_state(
        self, layer: int, W0: torch.Tensor, sigma: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """Initial per-layer state (tensors) from ``W0 (d_k, d_v)`` and ``Sigma (d_k, d_k)`` (both on the
        layer's device; Sigma float64). The state is moved to the layer's device if it is not there."""
        return {}

    def solve(
        self,
        layer: int,
        K: torch.Tensor,
        E: torch.Tensor,
        W: torch.Tensor,
        *,
        K_prompt: torch.Tensor | None = None,
    ) -> LayerUpdate:
        """The weight change of one layer (the solver protocol of a closed-form editor: with
        :meth:`init_layer_state`, all an editor implements).

        Args:
            K: ``(d_k, u)`` keys (columns), float64. E: ``(u, d_v)`` this layer's share of the residual,
                float64. Both on the layer's device.
            W: ``(d_k, d_v)`` the current weight (the layer's dtype and device).
            K_prompt: ``(d_k, u)`` the bare prompts' keys alone (float64, same device; ``K`` averages them
                with the generated contexts'): ROME's reference uses them in its residual and
                denominator. None where a caller has none (then ``K`` stands in).
        Returns:
            a :class:`LayerUpdate` with ``delta (d_k, d_v)`` (any device and dtype: it is cast to the
            weight's when written), the layer's next state (on the layer's device) and what to record.
        """
        raise NotImplementedError

    def after_batch(self) -> None:
        """Called after a batch is applied (e.g. drift checks)."""

    # -- public API -------------------------------------------------------------------------------------

    def edited_modules(self) -> list[str]:
        """Full names of the modules this editor changes."""
        return list(self.modules.values())

    @property
    def n_applied(self) -> int:
        """Number of requests applied and not retracted."""
        return sum(sum(b["active"]) for b in self.batches)

    def edit(
        self, requests: Sequence[EditRequest | dict], batch_size: int | None = None, progress: bool = False
    ) -> EditReport:
        """Apply ``requests`` in batches of ``batch_size`` (default: all at once), editing the model in place.

        Every request is validated first: one bad request refuses the whole call, changing nothing.
        Each batch is all-or-nothing; with a run directory attached each applied batch is committed
        before the next one starts. A batch identical to one already in the run is skipped (resuming a
        run), unless some of its requests were since retracted by hand: then it is applied again.
        """
        reqs = validate_batch(requests)
        if not reqs:
            raise RequestError("no requests to apply", record=None, field=None)
        self.check_requests(reqs)
        size = len(reqs) if batch_size is None else int(batch_size)
        if size < 1:
            raise ValueError("batch_size must be >= 1")
        report = EditReport()
        chunks = [reqs[i : i + size] for i in range(0, len(reqs), size)]
        known = applied_hashes(self.batches)
        for chunk in tqdm(chunks, desc=f"{self.name} batches", unit="batch", disable=not progress):
            h = hash_requests(chunk)
            if h in known:
                report.skipped += 1
                log.info("batch %s already applied; skipped", h[:8])
                continue
            report.batches.append(self._apply_batch(chunk, h))
            known.add(h)
        return report

    def check_requests(self, requests: Sequence[EditRequest]) -> None:
        """Refuse requests too long for the model (see :func:`rlsedit.editors.batches.check_fits_context`)."""
        check_fits_context(self.model, self.tokenizer, requests, self.templates)

    def save(self, directory: str | Path | RunStore) -> None:
        """Write the editor (config, state, recorded batches) to ``directory`` (safetensors + JSON)."""
        target = directory if isinstance(directory, RunStore) else RunStore(directory)
        if self.recorder.is_attached_to(target):
            self.commit()
            return
        with target.lock():
            self.recorder.copy_records(target, self.batches)
            self._commit_to(target)

    def attach(self, directory: str | Path | RunStore) -> None:
        """Save to ``directory`` (a folder or an open :class:`RunStore`) and from now on commit every
        applied batch there."""
        store = directory if isinstance(directory, RunStore) else RunStore(directory)
        self.save(store)
        self.recorder.attached = store

    def commit(self) -> None:
        """Commit the editor as it is to its run directory (nothing without one)."""
        if self.recorder.attached is not None:
            self._commit_to(self.recorder.attached)

    @classmethod
    def restore(cls, store: RunStore, manifest: dict[str, Any], model: nn.Module, tokenizer: Any) -> Any:
        """The editor committed to ``store`` with ``manifest`` (see :func:`rlsedit.editors.load_editor`),
        attached to ``store``; its saved weights are written into ``model``.

        Everything is read and checked before the model is touched: a damaged run leaves it as it was.
        """
        editor = cls.__new__(cls)
        editor._bind(model, tokenizer, build_config(cls.config_class, {}, manifest["config"]), None)
        editor.recorder = RunRecorder.restored(store, manifest)
        editor.load_name = manifest.get("model", {}).get("load_name")
        editor.templates = list(manifest["templates"])
        editor.batches = manifest["batches"]
        static = editor.recorder.static
        w0 = store.load_blob(static["W0"])
        editor.W0 = {layer: w0[str(layer)] for layer in editor.config.layers}
        if "sigma" in static:
            s = store.load_blob(static["sigma"])
            editor.sigmas = {layer: s[str(layer)] for layer in editor.config.layers}
        weights = store.load_state("weights")
        for layer in editor.config.layers:
            try:
                state = store.load_state(f"layer{layer}")
            except LookupError:  # no group: the editor keeps no state (MEMIT, ROME, FT)
                state = {}
            editor.layer_state[layer] = editor._on_layer_device(layer, state)
        write_saved_weights(editor.model, editor.modules, editor.W0, weights)
        return editor

    # -- the loop ---------------------------------------------------------------------------------------

    def _weights(self) -> dict[int, torch.Tensor]:
        return {layer: weight_kv(get_module(self.model, name)) for layer, name in self.modules.items()}

    @contextmanager
    def transaction(self, on_failure: Callable[[], None] | None = None) -> Iterator[dict[int, dict]]:
        """All or nothing: the edited weights, the layers' states and the batch list are snapshot on
        entry; any exception inside restores them (then calls ``on_failure``) and propagates. Yields the
        layers' states as they were (a batch that commits hands them to :meth:`recycle_state`)."""
        weights = self._weights()
        snapshot = {layer: w.detach().clone() for layer, w in weights.items()}
        state_snapshot = {layer: dict(st) for layer, st in self.layer_state.items()}
        batches_snapshot = [dict(b, active=list(b["active"])) for b in self.batches]
        try:
            yield state_snapshot
        except BaseException:
            with torch.no_grad():
                for layer, w in weights.items():
                    w.copy_(snapshot[layer])
            self.layer_state = state_snapshot
            self.batches = batches_snapshot
            if on_failure is not None:
                on_failure()
            raise

    def recycle_state(self, old: dict[int, dict[str, torch.Tensor]]) -> None:
        """Called after a batch has committed with the layer states it replaced (``old[layer]``); an
        editor may keep their memory for the next batch (double buffering). The default drops them."""

    def supersede(self, items: list[tuple[int, int]]) -> None:
        """Called before a batch that re-edits earlier requests ``(batch_id, index)``; the default
        keeps them (editors without retraction simply overwrite)."""
        if items:
            log.info(
                "%d earlier request(s) are re-edited; %s cannot retract them first", len(items), self.name
            )

    def _apply_batch(self, reqs: list[EditRequest], h: str) -> BatchReport:
        t_start = time.perf_counter()
        reqs, superseded = dedupe(reqs, self.batches)
        batch_id = (self.batches[-1]["id"] + 1) if self.batches else 0
        report = BatchReport(batch_id=batch_id, n_requests=len(reqs), superseded=superseded)
        records: dict[str, dict] = {}
        committing = False

        def discard() -> None:
            if not committing:  # a commit that failed may have passed its commit point: keep its records
                self.recorder.discard(records)

        with self.transaction(on_failure=discard) as state_snapshot:
            if superseded:
                self.supersede(superseded)
            if self.one_request_at_a_time and len(reqs) > 1:
                pendings, timings = one_at_a_time(self, reqs, report)
            else:
                pendings, timings = self.locate_and_solve(reqs, report)
            report.timings.update(timings)
            self._check_state(pendings)
            records = self.recorder.write_records(
                batch_id, {layer: p.record for layer, p in pendings.items()}
            )
            for layer, p in pendings.items():
                self.layer_state[layer] = p.state
            self.batches.append(
                BatchRecord(
                    id=batch_id,
                    hash=h,
                    requests=[r.to_dict() for r in reqs],
                    active=[1] * len(reqs),
                    records=records,
                )
            )
            self.after_batch()
            t_save = time.perf_counter()
            if self.recorder.attached is not None:
                committing = True
                self.commit()
            report.timings["save"] = time.perf_counter() - t_save
            self.recycle_state(state_snapshot)
        report.timings["total"] = time.perf_counter() - t_start
        return report

    def locate_and_solve(
        self, reqs: list[EditRequest], report: BatchReport
    ) -> tuple[dict[int, LayerUpdate], dict[str, float]]:
        """Locate the batch and solve every edited layer, writing each layer's delta into the model.

        Fills ``report`` (residuals, target NLL, per-layer norms) and returns the pending results per
        layer and the timings. An editor that does not use the closed-form loop (FT) overrides this; it
        must write its weight changes into the model (the caller restores them on failure): FT and
        UltraEdit, whose updates come from gradients rather than keys and targets, implement this instead of
        :meth:`solve`.
        """
        cfg = self.config
        last_layer = cfg.layers[-1]
        read = block_name(self.model, last_layer)
        t0 = time.perf_counter()
        tr = self._targets(reqs, last_layer)
        z = self._norm_anchored(reqs, tr, last_layer) if cfg.norm_anchor else tr.z
        report.target_nll_init = float(tr.nll_init.mean())
        report.target_nll_final = float(tr.nll_final.mean())
        report.targets_cached = bool(tr.extra.get("cached", False))
        if "cache_key" in tr.extra:
            report.targets_keys = [tr.extra["cache_key"]]
        timings = {"targets": time.perf_counter() - t0, "keys": 0.0, "update": 0.0}
        pendings: dict[int, LayerUpdate] = {}
        weights = self._weights()
        # the blocks below the first edited one do not change in this batch: their output is kept once
        lower = LowerBlocks(self.model, min(cfg.layers)) if cfg.reuse_lower_blocks else None
        for i, layer in enumerate(cfg.layers):
            t1 = time.perf_counter()
            # nothing below or beside the first edited layer is ever edited: a static store keeps its keys
            keys = self.targets_provider.first_layer_keys if i == 0 else _keys_with_prompt
            K, K_prompt = keys(
                self.model,
                self.tokenizer,
                reqs,
                self.modules[layer],
                self.templates,
                cfg.key_weighting,
                lower,
            )
            cur = compute_hidden(self.model, self.tokenizer, reqs, read, lower=lower)
            timings["keys"] += time.perf_counter() - t1
            t2 = time.perf_counter()
            W = weights[layer]
            dev = W.device  # keys, residual and the solve follow the edited layer's device
            resid = (z.to(cur.device) - cur).to(device=dev, dtype=torch.float64)
            if i == 0:
                report.residual_before = float(resid.norm(dim=1).mean())
            E = resid / (len(cfg.layers) - i)
            p = self.solve(
                layer,
                K.to(device=dev, dtype=torch.float64),
                E,
                W.detach(),
                K_prompt=K_prompt.to(device=dev, dtype=torch.float64),
            )
            self._check_delta(layer, p.delta, W)
            add_delta_kv(get_module(self.model, self.modules[layer]), p.delta)
            pendings[layer] = p
            report.layers[layer] = {
                "residual_norm": float(E.norm(dim=1).mean()),
                "delta_norm": float(p.delta.norm()),
                "weight_norm": float(W.detach().norm()),
            }
            timings["update"] += time.perf_counter() - t2
        cur = compute_hidden(self.model, self.tokenizer, reqs, read, lower=lower)
        report.residual_after = float((z.to(cur.device) - cur).norm(dim=1).mean())
        return pendings, timings

    def use_targets(self, provider: TargetProvider) -> None:
        """Take targets from ``provider`` from now on (a cache folder, a recorded stream, a static store).

        A static store is checked at once against this editor's last layer, templates and target
        settings, and, before any batch is applied, against the model (a store is made on the unedited
        model; a resumed editor's model is edited already); the requests are checked when a stream is known
        (:meth:`check_static_targets`)."""
        if provider.static is not None:
            provider.static.check(self.model if not self.batches else None, self.target_settings(), [])
        self.targets_provider = provider

    def target_settings(self) -> dict[str, Any]:
        """What this editor's targets depend on besides the model and the requests (the last layer, the
        templates, the target settings)."""
        return target_settings(self.config.layers[-1], self.templates, self.config.targets)

    def check_static_targets(self, requests: Sequence[EditRequest]) -> None:
        """Refuse (ValueError, naming what differs) a static target store that does not fit this editor
        or lacks one of ``requests``; nothing when targets are not static."""
        static = self.targets_provider.static
        if static is not None:
            static.check(self.model if not self.batches else None, self.target_settings(), requests)

    def _norm_anchored(self, reqs: list[EditRequest], tr: TargetResult, layer: int) -> torch.Tensor:
        """The targets ``z`` of ``tr`` with their value vectors rescaled to ``norm_anchor_ref`` (see
        :class:`EditorConfig`); ``(u, d_model)``."""
        v0 = tr.v0
        if v0 is None:  # on the model as it is, like h0
            v0 = compute_hidden(self.model, self.tokenizer, reqs, self.modules[layer])
        return anchored(tr.z, tr.h0, v0, self.config.norm_anchor_ref)

    def _targets(self, reqs: list[EditRequest], layer: int) -> TargetResult:
        """Target hidden states for ``reqs`` at ``layer`` (:class:`TargetResult`, ``z``: ``(u, d_model)``),
        from :attr:`targets_provider`."""
        return self.targets_provider.targets(
            self.model, self.tokenizer, reqs, layer, self.templates, self.config.targets, self._weights()
        )

    def _check_delta(self, layer: int, delta: torch.Tensor, W: torch.Tensor) -> None:
        if not torch.isfinite(delta).all():
            raise EditError(f"layer {layer}: the update is not finite; the batch was rolled back")
        ratio = float(delta.detach().norm()) / max(float(W.detach().norm()), 1e-12)  # devices may differ
        if ratio > self.config.max_delta_ratio:
            raise EditError(
                f"layer {layer}: the update's norm is {ratio:.3g} x the weight's (bound "
                f"max_delta_ratio={self.config.max_delta_ratio}); the batch was rolled back"
            )

    def _check_state(self, pendings: dict[int, LayerUpdate]) -> None:
        """Refuse a batch whose next layer state (e.g. RLSEdit's ``C``) is not finite."""
        for layer, p in pendings.items():
            for key, t in p.state.items():
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise EditError(
                        f"layer {layer}: the editor state {key!r} would not be finite; "
                        "the batch was rolled back"
                    )

    # -- persistence ------------------------------------------------------------------------------------

    def _commit_to(self, store: RunStore) -> None:
        static = self.recorder.ensure_static(store, self.W0, self.sigmas)
        state: dict[str, dict[str, torch.Tensor]] = {}
        for layer, st in self.layer_state.items():
            if st:
                state[f"layer{layer}"] = st
        state["weights"] = {str(layer): w.detach().contiguous() for layer, w in self._weights().items()}
        manifest = {
            "kind": EDITOR_KIND,
            "method": self.name,
            "config": self.config.to_dict(),
            "modules": {str(k): v for k, v in self.modules.items()},
            "templates": self.templates,
            "static": static,
            "batches": self.batches,
            "model": {"model_type": self.model.config.model_type, "load_name": self.load_name},
        }
        self.recorder.commit(store, state, manifest)

    def load_record(self, batch: dict, layer: int) -> dict[str, torch.Tensor]:
        """The recorded tensors of ``batch`` at ``layer`` (read from disk)."""
        return self.recorder.load(batch["records"][str(layer)])

    def weight_deltas(self) -> dict[str, torch.Tensor]:
        """``{module_name: W - W0}`` of shape ``(d_k, d_v)`` for every edited module."""
        return {
            self.modules[layer]: (w.detach().cpu().to(torch.float32) - self.W0[layer].cpu().float())
            for layer, w in self._weights().items()
        }
