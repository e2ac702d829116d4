"""The editor protocol, the registry, and the one locate-then-edit loop over layers.

Data flow of one batch (see docs/DESIGN.md)::

    requests -> validate -> targets z (at the last edited layer)
             -> for each edited layer, lowest first:
                  keys K (current model) -> residual share E -> editor.solve(layer, K, E) -> delta W -> write
             -> record the batch (K, V on disk) -> commit the run directory

A batch is all-or-nothing: any failure (bad request, non-finite or unbounded update, an exception)
restores the edited weights and the editor's state to what they were before the batch.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn
from tqdm.auto import tqdm

from rlsedit.configs import model_defaults
from rlsedit.locate import TargetConfig, compute_hidden, compute_keys, compute_targets
from rlsedit.locate.keys import KEY_WEIGHTINGS, LowerBlocks
from rlsedit.locate.provider import TargetProvider, target_settings
from rlsedit.locate.targets import TargetResult
from rlsedit.locate.templates import generate_context_templates
from rlsedit.models.arch import (
    add_delta_kv,
    block_name,
    get_arch,
    get_module,
    mlp_out_name,
    num_layers,
    weight_kv,
)
from rlsedit.requests import EditRequest, RequestError, validate_batch
from rlsedit.store import CorruptStateError, RunLockedError, RunStore

__all__ = [
    "BatchReport",
    "EditReport",
    "Editor",
    "EditorConfig",
    "HasObjective",
    "Retractable",
    "EditError",
    "LocateThenEditEditor",
    "register_editor",
    "make_editor",
    "load_editor",
    "list_editors",
    "editor_class",
    "norm_anchor_targets",
    "reference_value_norm",
]

log = logging.getLogger(__name__)

#: The ``kind`` of an editor's manifest in its run store (the store's own layout: ``store.RUN_FORMAT``).
EDITOR_KIND = "rlsedit-editor/1"


class EditError(RuntimeError):
    """A batch could not be applied; the model and the editor are unchanged."""


# ----------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class EditorConfig:
    """Settings shared by the locate-then-edit editors.

    Attributes:
        layers: edited blocks (their MLP output projections), e.g. ``(3, 4, 5, 6, 7)``; the target is
            optimised at the last one.
        targets: target optimisation settings.
        n_templates / template_length: generated context templates (plus the bare prompt).
        stats_samples / stats_max_len / stats_corpus: the second-moment statistics.
        max_delta_ratio: refuse a batch whose weight change has ``||dW||_F > max_delta_ratio * ||W||_F``.
        seed: seeds template generation.
        key_weighting: how keys are averaged over the templates: "reference" (1/2 the bare prompt, 1/2
            the mean of the generated contexts, as MEMIT / AlphaEdit / the RLSEdit release) or "uniform".
        norm_anchor: norm-anchored targets (NAS, arXiv 2602.02543), for every closed-form editor: each
            target's value vector ``v* = v0 + (z - h0)`` (``v0`` the last layer's MLP output) is rescaled
            to the reference norm ``norm_anchor_ref``, or, where ``||v*||`` exceeds twice it, left at
            ``v0`` (that request is skipped); the target becomes ``h0 - v0 + v*``.
        norm_anchor_ref: the reference norm: the mean ``||v*||`` of the unedited model's targets with the
            top 5% left out (NAS's trimmed mean); 0: measured when the editor is made, on
            ``norm_anchor_samples`` CounterFact tune cases (see :func:`reference_value_norm`).
        reuse_lower_blocks: within a batch, compute the output of the (unedited) blocks below the first
            edited one once per chunk of rows and run only the blocks above it for every later key and
            hidden-state read (self-checked; the same values, fewer block forwards).
    """

    layers: tuple[int, ...] = (3, 4, 5, 6, 7)
    targets: TargetConfig = field(default_factory=TargetConfig)
    n_templates: int = 5
    template_length: int = 10
    stats_samples: int = 1000
    stats_max_len: int = 128
    stats_corpus: str | None = None
    max_delta_ratio: float = 10.0
    seed: int = 0
    key_weighting: str = "reference"
    norm_anchor: bool = False
    norm_anchor_ref: float = 0.0
    norm_anchor_samples: int = 100
    reuse_lower_blocks: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.targets, dict):
            self.targets = TargetConfig(**self.targets)
        self.layers = tuple(int(x) for x in self.layers)
        if not self.layers:
            raise ValueError("layers must not be empty")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers has duplicates: {self.layers}")
        if list(self.layers) != sorted(self.layers):
            raise ValueError(f"layers must be increasing: {self.layers}")
        if self.n_templates < 0 or self.template_length < 1:
            raise ValueError("n_templates >= 0 and template_length >= 1 are required")
        if self.max_delta_ratio <= 0:
            raise ValueError("max_delta_ratio must be > 0")
        if self.norm_anchor_ref < 0 or self.norm_anchor_samples < 1:
            raise ValueError("norm_anchor_ref must be >= 0 (0: measure it) and norm_anchor_samples >= 1")
        if self.key_weighting not in KEY_WEIGHTINGS:
            raise ValueError(f"key_weighting must be one of {KEY_WEIGHTINGS}, got {self.key_weighting!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EditorConfig:
        return cls(**d)


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def build_config(
    config_cls: type[EditorConfig], base: dict[str, Any], overrides: dict[str, Any]
) -> EditorConfig:
    """Merge defaults ``base`` and ``overrides`` into ``config_cls``.

    Target-optimisation keys (``lr``, ``steps``...) may be given flat or under ``targets``. Unknown keys
    are refused with the closest valid names.
    """
    top = _field_names(config_cls)
    merged: dict[str, Any] = {}
    targets: dict[str, Any] = {}
    for source in (base, overrides):
        check_option_names(config_cls, source)
        for key, value in source.items():
            if key == "targets" and isinstance(value, dict):
                targets.update(value)
            elif key in top:
                merged[key] = value
            else:
                targets[key] = value
    merged["targets"] = TargetConfig(**targets)
    return config_cls(**merged)


def check_option_names(config_cls: type[EditorConfig], options: dict[str, Any]) -> None:
    """Refuse (ValueError, with the closest valid names) keys of ``options`` that are neither fields of
    ``config_cls`` nor target-optimisation options (flat or under ``targets``); values are not checked
    here but where the config is built."""
    top, tgt = _field_names(config_cls), _field_names(TargetConfig)
    for key, value in options.items():
        if key == "targets" and isinstance(value, dict):
            for k2 in value:
                if k2 not in tgt:
                    raise ValueError(_unknown(k2, tgt, "target option"))
        elif key not in top and key not in tgt:
            raise ValueError(_unknown(key, top | tgt, f"option of {config_cls.__name__}"))


def _unknown(key: str, valid: Iterable[str], what: str) -> str:
    close = difflib.get_close_matches(key, sorted(valid), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"unknown {what} {key!r}{hint}; valid: {', '.join(sorted(valid))}"


# ----------------------------------------------------------------------------------------------------------
# Reports


@dataclass
class BatchReport:
    """What one batch did.

    Attributes:
        batch_id: the batch's identifier in the run.
        n_requests: requests applied.
        superseded: ``(batch_id, index)`` of earlier requests retracted because this batch re-edits them.
        layers: per edited layer: ``residual_norm`` (mean ||E|| of the layer's share), ``delta_norm``
            (||dW||_F), ``weight_norm`` (||W||_F).
        residual_before / residual_after: mean ||z - h|| at the last edited layer before and after.
        target_nll_init / target_nll_final: mean NLL of the new targets during target optimisation.
        targets_cached: whether every target came from a ``--targets-cache``.
        targets_keys: with a targets cache, the cache key of each target result the batch used, in order
            (the file ``targets-<key>.safetensors``); a replay of the batch reads these back.
        timings: seconds for ``targets``, ``keys``, ``update``, ``save`` and ``total``.
    """

    batch_id: int
    n_requests: int
    superseded: list[tuple[int, int]] = field(default_factory=list)
    layers: dict[int, dict[str, float]] = field(default_factory=dict)
    residual_before: float = float("nan")
    residual_after: float = float("nan")
    target_nll_init: float = float("nan")
    target_nll_final: float = float("nan")
    targets_cached: bool = False
    targets_keys: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-native form; NaN/inf figures (not measured, e.g. FT has no residual) become None."""
        d = dataclasses.asdict(self)
        d["layers"] = {str(k): v for k, v in self.layers.items()}
        return _finite_or_none(d)


def _finite_or_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_none(v) for v in x]
    return x


@dataclass
class EditReport:
    """Reports of every batch applied by one ``edit`` call (``skipped``: batches already in the run)."""

    batches: list[BatchReport] = field(default_factory=list)
    skipped: int = 0

    @property
    def n_requests(self) -> int:
        return sum(b.n_requests for b in self.batches)

    def seconds(self, key: str = "total") -> float:
        return sum(b.timings.get(key, 0.0) for b in self.batches)

    def to_dict(self) -> dict[str, Any]:
        return {"batches": [b.to_dict() for b in self.batches], "skipped": self.skipped}


# ----------------------------------------------------------------------------------------------------------
# Protocol and registry


@runtime_checkable
class Editor(Protocol):
    """What every editor offers."""

    name: ClassVar[str]
    model: nn.Module
    tokenizer: Any
    config: Any

    def edit(self, requests: Sequence[EditRequest | dict], batch_size: int | None = None) -> EditReport: ...

    def save(self, directory: str | Path) -> None: ...

    def edited_modules(self) -> list[str]: ...


@runtime_checkable
class Retractable(Protocol):
    """An editor that can take back an applied batch, or one request of it, exactly."""

    def retract(self, batch_id: int, index: int | None = None) -> dict[str, Any]: ...


@runtime_checkable
class HasObjective(Protocol):
    """An editor whose edits minimise a stated objective it can evaluate (per edited layer)."""

    def objective_terms(self) -> dict[int, dict[str, Any]]: ...


_REGISTRY: dict[str, type] = {}


def register_editor(cls: type) -> type:
    """Class decorator: register an editor under ``cls.name`` (duplicates are refused)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a class attribute 'name'")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"an editor named {name!r} is already registered ({_REGISTRY[name].__name__})")
    _REGISTRY[name] = cls
    return cls


def _ensure_builtin_editors() -> None:
    import rlsedit.editors  # noqa: F401  (registers the built-in editors)


def list_editors() -> list[str]:
    """Names of the registered editors."""
    _ensure_builtin_editors()
    return sorted(_REGISTRY)


def editor_class(name: str) -> type:
    """The editor class registered under ``name`` (a typo gets the closest names)."""
    _ensure_builtin_editors()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(_unknown(name, _REGISTRY, "editor")) from None


def reference_value_norm(v0: torch.Tensor, z: torch.Tensor, h0: torch.Tensor, trim: float = 0.05) -> float:
    """NAS's reference norm: the mean of ``||v0 + z - h0||`` over the rows ``(n, d_model)`` with the
    largest ``floor(trim * n)`` left out."""
    norms = torch.sort((v0 + z - h0).double().norm(dim=1)).values
    drop = int(math.floor(trim * norms.numel()))
    kept = norms[: norms.numel() - drop] if drop else norms
    if not kept.numel():
        raise ValueError("no value vectors left to average")
    return float(kept.mean())


def norm_anchor_targets(
    z: torch.Tensor, h0: torch.Tensor, v0: torch.Tensor, ref: float
) -> tuple[torch.Tensor, int]:
    """NAS's norm-anchored targets: ``v* = v0 + z - h0`` rescaled to norm ``ref``, or ``v0`` where
    ``||v*|| > 2 ref``; returns ``(h0 - v0 + v*, number left at v0)``, ``(u, d_model)`` like ``z``."""
    if not ref > 0:
        raise ValueError(f"the reference norm must be > 0, got {ref}")
    dev = z.device
    h0, v0 = h0.to(device=dev, dtype=z.dtype), v0.to(device=dev, dtype=z.dtype)
    v_star = v0 + z - h0
    norms = v_star.norm(dim=1, keepdim=True).clamp_min(1e-12)
    skip = norms[:, 0] > 2.0 * ref
    scaled = torch.where(skip[:, None], v0, v_star * (ref / norms))
    return h0 - v0 + scaled, int(skip.sum())


def make_editor(
    name: str,
    model: nn.Module,
    tokenizer: Any,
    *,
    stats_dir: str | Path | None = None,
    sigmas: dict[int, torch.Tensor] | None = None,
    **overrides: Any,
) -> Any:
    """Build the editor ``name`` for ``model`` with its per-model defaults and ``overrides``.

    Args:
        stats_dir: cache folder of second-moment statistics (default: the user cache).
        sigmas: precomputed ``{layer: Sigma (d_k, d_k)}``; skips computing statistics.
        overrides: config fields (e.g. ``layers=[4, 5]``, ``mu=30.0``, ``lr=0.3``).
    """
    cls = editor_class(name)
    defaults = model_defaults(model, name)
    config = build_config(cls.config_class, defaults, overrides)
    return cls(model, tokenizer, config, stats_dir=stats_dir, sigmas=sigmas)


def check_layers(model: nn.Module, layers: Iterable[int]) -> None:
    """Refuse (ValueError) a layer index outside the model's ``0..n_layers - 1``."""
    n = num_layers(model)
    for layer in layers:
        if not 0 <= layer < n:
            raise ValueError(f"layer {layer} out of range: the model has {n} layers (0..{n - 1})")


def check_config(name: str, model: nn.Module, overrides: dict[str, Any]) -> EditorConfig:
    """The config :func:`make_editor` would build for ``model``, checked against the model (its layers in
    range) without building the editor or computing statistics: bad settings are refused at once."""
    config = build_config(editor_class(name).config_class, model_defaults(model, name), overrides)
    check_layers(model, config.layers)
    return config


def load_editor(
    directory: str | Path | RunStore, model: nn.Module, tokenizer: Any, *, attach: bool = True
) -> Any:
    """Resume an editor saved with ``editor.save(directory)`` (or a run of ``rlsedit edit``).

    ``directory`` may be an open :class:`RunStore`: a caller that holds its lock must pass it, since a
    second store object on the same directory would find the run locked when it commits.

    ``model`` must be the base (unedited) model or the model as last saved; the saved edited weights are
    written into it. With ``attach`` the editor keeps committing each later batch to ``directory``;
    without, ``directory`` is only read (its records are copied to the editor's scratch store).
    """
    store = directory if isinstance(directory, RunStore) else RunStore(directory, create=False)
    manifest = store.load_manifest()
    if manifest is None or manifest.get("kind") != EDITOR_KIND:
        raise FileNotFoundError(f"{directory} holds no saved editor (no committed manifest)")
    cls = editor_class(manifest["method"])
    config = build_config(cls.config_class, {}, manifest["config"])
    editor = cls(model, tokenizer, config, stats_dir=None, sigmas=None, _restore=(store, manifest))
    if not attach:  # _restore read from ``store``; detach it, keeping the records readable
        editor._store = None
        scratch = editor._record_store()
        refs = [ref for b in editor.batches for ref in b.get("records", {}).values()]
        for ref in [*refs, *editor._static_refs().values()]:
            scratch.put_blob(ref["path"], store.load_blob(ref))
    else:  # finish what a crash right after the last commit left undone (if no one else writes now)
        try:
            with store.lock():
                _reconcile_journal(store)
                store.tidy()
        except RunLockedError:
            log.debug("%s is locked by another process; its journal is left as it is", store.root)
    return editor


# ----------------------------------------------------------------------------------------------------------
# The locate-then-edit loop


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


def _journal_entry(generation: int, manifest: dict[str, Any]) -> dict[str, Any]:
    """The journal entry of a committed generation: a function of its manifest alone, so an entry lost to
    a crash between the commit and the append is rebuilt exactly."""
    batches = manifest.get("batches", [])
    last = batches[-1] if batches else None
    return {
        "generation": generation,
        "method": manifest.get("method"),
        "n_batches": len(batches),
        "last_batch": None if last is None else last["id"],
        "last_hash": None if last is None else last["hash"],
        "n_active": sum(sum(b["active"]) for b in batches),
    }


def _reconcile_journal(store: RunStore) -> None:
    """Before a commit: append the entry of the last committed generation if a crash lost it.

    The journal holds one entry per committed generation, appended right after the commit; it may lag
    the manifest by one entry (killed in between), never more (see :mod:`rlsedit.store`).
    """
    prev = store.load_manifest()
    if prev is None:
        return
    n = len(store.journal)
    if n == prev["journal_length"]:
        log.info(
            "%s: adding the journal entry of generation %d (interrupted)", store.root, prev["generation"]
        )
        store.journal.append(_journal_entry(prev["generation"], prev))
    elif n != prev["journal_length"] + 1:
        raise CorruptStateError(
            f"{store.journal.path}: {n} entries, but generation {prev['generation']} was committed with "
            f"{prev['journal_length']} (expected that many or one more)"
        )


def _hash_requests(requests: Sequence[EditRequest]) -> str:
    payload = json.dumps([r.to_dict() for r in requests], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


@dataclass
class _Pending:
    """A layer's solve result, applied only once every layer of the batch succeeded."""

    delta: torch.Tensor
    state: dict[str, torch.Tensor]
    record: dict[str, torch.Tensor]


class LocateThenEditEditor:
    """Base class of the closed-form editors (RLSEdit, MEMIT, AlphaEdit, ROME).

    Subclasses set ``name`` and ``config_class`` and implement :meth:`init_layer_state` and
    :meth:`solve`. Per-layer state is a dict of tensors (``self.layer_state[layer]``), saved as
    safetensors; per-batch records (e.g. RLSEdit's ``K`` and ``V``) are written to the run directory.
    FT, which has no closed-form solve, overrides :meth:`_locate_and_solve` and keeps the rest (batches,
    rollback, saving).
    """

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
        _restore: tuple[RunStore, dict] | None = None,
    ) -> None:
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
        self.layer_state: dict[int, dict[str, torch.Tensor]] = {}
        self.batches: list[dict[str, Any]] = []  # manifest entries of applied batches
        self._store: RunStore | None = None
        #: The name or path the model was loaded with (recorded in the run directory).
        self.load_name: str | None = None
        self._scratch: tempfile.TemporaryDirectory | None = None
        if _restore is not None:
            self._restore(*_restore)
            return
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
        else:
            self.sigmas = {}
        # Each layer's state lives on that layer's device (a model spread by device_map has several).
        for layer in config.layers:
            sigma = self.sigma_on_device(layer, keep=False) if layer in self.sigmas else None
            state = self.init_layer_state(layer, self.W0[layer], sigma)
            self.layer_state[layer] = self._on_layer_device(layer, state)
            del sigma  # a temporary copy on the layer's device unless an editor keeps one
        if config.norm_anchor and config.norm_anchor_ref <= 0 and self.uses_targets:
            config.norm_anchor_ref = self._measure_norm_anchor()
        self.prepare()

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
        cache: dict[int, torch.Tensor] = self.__dict__.setdefault("_sigma_on_device", {})
        if layer in cache and cache[layer].device == dev:
            return cache[layer]
        moved = sigma.to(dev)
        if keep:
            cache[layer] = moved
        return moved

    def _compute_sigmas(self) -> dict[int, torch.Tensor]:
        from rlsedit.stats import second_moments

        cfg = self.config
        names = [self.modules[layer] for layer in cfg.layers]
        if self.stats_dir is not None:
            self._check_stats_dir(names)
        s = second_moments(
            self.model,
            self.tokenizer,
            names,
            samples=cfg.stats_samples,
            corpus=cfg.stats_corpus,
            max_len=cfg.stats_max_len,
            cache_dir=self.stats_dir,
        )
        return {layer: s[self.modules[layer]] for layer in cfg.layers}

    def _check_stats_dir(self, names: list[str]) -> None:
        """Say whether ``stats_dir`` holds the statistics this editor asks for; warn, before they are
        computed anew, when it holds other statistics of this model or statistics of other models only."""
        from rlsedit.models.load import model_fingerprint
        from rlsedit.stats import available_stats, corpus_texts, stats_cache_dir, stats_key

        cfg = self.config
        sets = available_stats(self.stats_dir, self.model, names)
        want = stats_key(corpus_texts(cfg.stats_corpus)[1], cfg.stats_samples, cfg.stats_max_len)
        if any(x["key"] == want for x in sets):
            log.info("using the precomputed statistics in %s", stats_cache_dir(self.stats_dir))
            return
        if sets:
            found = "; ".join(
                f"stats_samples={x['samples']}, stats_max_len={x['max_len']}, corpus {x['corpus']}"
                for x in sets
            )
            log.warning(
                "%s holds statistics of this model with other settings (%s) than the editor's "
                "(stats_samples=%d, stats_max_len=%d, stats_corpus=%s): computing new ones. Set the "
                "editor's stats_* options (--set stats_samples=...) to use the precomputed ones.",
                self.stats_dir,
                found,
                cfg.stats_samples,
                cfg.stats_max_len,
                cfg.stats_corpus,
            )
            return
        root = stats_cache_dir(self.stats_dir)
        mine = model_fingerprint(self.model)
        others = [d.name for d in root.iterdir() if d.is_dir() and d.name != mine] if root.is_dir() else []
        if others:
            log.warning(
                "%s holds no statistics of this model (fingerprint %s) for %s, only of %d other model "
                "fingerprint(s): the fingerprint depends on the weights and their dtype, so load the model "
                "with the same --dtype as `rlsedit stats` did. Computing them now.",
                self.stats_dir,
                mine,
                ", ".join(names),
                len(others),
            )

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
    ) -> _Pending:
        """The weight change of one layer.

        Args:
            K: ``(d_k, u)`` keys (columns), float64. E: ``(u, d_v)`` this layer's share of the residual,
                float64. Both on the layer's device.
            W: ``(d_k, d_v)`` the current weight (the layer's dtype and device).
            K_prompt: ``(d_k, u)`` the bare prompts' keys alone (float64, same device; ``K`` averages them
                with the generated contexts'): ROME's reference uses them in its residual and
                denominator. None where a caller has none (then ``K`` stands in).
        Returns:
            a :class:`_Pending` with ``delta (d_k, d_v)`` (any device and dtype: it is cast to the
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
        known = self._applied_hashes()
        for chunk in tqdm(chunks, desc=f"{self.name} batches", unit="batch", disable=not progress):
            h = _hash_requests(chunk)
            if h in known:
                report.skipped += 1
                log.info("batch %s already applied; skipped", h[:8])
                continue
            report.batches.append(self._apply_batch(chunk, h))
            known.add(h)
        return report

    def _applied_hashes(self) -> set[str]:
        """Hashes of the batches a repeated ``edit`` call skips: every batch in the run whose inactive
        requests (if any) were all superseded by a later batch re-editing the same fact. A request
        superseded that way is still applied (and replaced); skipping such batches keeps a resumed or
        repeated run from applying them twice. One retracted by hand makes its batch applicable again."""
        known: set[str] = set()
        later: set[tuple[str, str]] = set()
        for b in reversed(self.batches):
            keys = [EditRequest.from_dict(rd).key for rd in b["requests"]]
            if all(active or key in later for active, key in zip(b["active"], keys, strict=True)):
                known.add(b["hash"])
            later.update(keys)
        return known

    def check_requests(self, requests: Sequence[EditRequest]) -> None:
        """Refuse requests too long for the model: the longest context template, the prompt and the new
        target must fit in its context window. Raises :class:`RequestError` naming the request's index."""
        limit = context_limit(self.model)
        if limit is None:
            return
        longest = max(self.templates, key=len) if self.templates else ""
        for index, r in enumerate(requests):
            n = len(self.tokenizer(longest + r.text + r.target_new_text)["input_ids"])
            if n > limit:
                raise RequestError(
                    f"with its subject, target_new and the longest context template it is {n} tokens long; "
                    f"the model takes at most {limit}",
                    record=index,
                    field="prompt",
                    unit="index",
                )

    def save(self, directory: str | Path | RunStore) -> None:
        """Write the editor (config, state, recorded batches) to ``directory`` (safetensors + JSON)."""
        target = directory if isinstance(directory, RunStore) else RunStore(directory)
        if self._store is not None and Path(self._store.root).resolve() == Path(target.root).resolve():
            self._commit(self._store)
            return
        with target.lock():
            fresh = target.load_manifest() is None  # no committed run there: its blobs are leftovers
            for b in self.batches:
                for ref in b.get("records", {}).values():
                    target.put_blob(ref["path"], self._record_store().load_blob(ref), replace=fresh)
            for ref in self._static_refs().values():
                target.put_blob(ref["path"], self._record_store().load_blob(ref), replace=fresh)
            self._commit(target)

    def attach(self, directory: str | Path | RunStore) -> None:
        """Save to ``directory`` (a folder or an open :class:`RunStore`) and from now on commit every
        applied batch there."""
        store = directory if isinstance(directory, RunStore) else RunStore(directory)
        self.save(store)
        self._store = store

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

    def _dedupe(self, reqs: list[EditRequest]) -> tuple[list[EditRequest], list[tuple[int, int]]]:
        """Drop earlier duplicates (same subject and prompt) inside the batch; find earlier batches'
        requests this batch supersedes."""
        last: dict[tuple[str, str], int] = {}
        for i, r in enumerate(reqs):
            last[r.key] = i
        kept = [r for i, r in enumerate(reqs) if last[r.key] == i]
        if len(kept) < len(reqs):
            log.warning("%d request(s) re-edited later in the same batch were dropped", len(reqs) - len(kept))
        keys = {r.key for r in kept}
        superseded = []
        for b in self.batches:
            for j, rd in enumerate(b["requests"]):
                if b["active"][j] and EditRequest.from_dict(rd).key in keys:
                    superseded.append((b["id"], j))
        return kept, superseded

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
        reqs, superseded = self._dedupe(reqs)
        batch_id = (self.batches[-1]["id"] + 1) if self.batches else 0
        report = BatchReport(batch_id=batch_id, n_requests=len(reqs), superseded=superseded)
        records: dict[str, dict] = {}
        committing = False

        def discard() -> None:
            if not committing:  # a commit that failed may have passed its commit point: keep its records
                self._discard_records(records)

        with self.transaction(on_failure=discard) as state_snapshot:
            if superseded:
                self.supersede(superseded)
            if self.one_request_at_a_time and len(reqs) > 1:
                pendings, timings = self._request_by_request(reqs, report)
            else:
                pendings, timings = self._locate_and_solve(reqs, report)
            report.timings.update(timings)
            self._check_state(pendings)
            records = self._write_records(batch_id, pendings)
            for layer, p in pendings.items():
                self.layer_state[layer] = p.state
            self.batches.append(
                {
                    "id": batch_id,
                    "hash": h,
                    "requests": [r.to_dict() for r in reqs],
                    "active": [1] * len(reqs),
                    "records": records,
                }
            )
            self.after_batch()
            t_save = time.perf_counter()
            if self._store is not None:
                committing = True
                self._commit(self._store)
            report.timings["save"] = time.perf_counter() - t_save
            self.recycle_state(state_snapshot)
        report.timings["total"] = time.perf_counter() - t_start
        return report

    def _request_by_request(
        self, reqs: list[EditRequest], report: BatchReport
    ) -> tuple[dict[int, _Pending], dict[str, float]]:
        """Locate and solve each request in turn (``one_request_at_a_time``), inside the same batch.

        Each request sees the model and the layer state as left by the requests before it; on failure
        :meth:`_apply_batch` restores both. The layers' deltas add up, the state is the last one, and
        the records are kept per request (keys prefixed ``"<index>."``).
        """
        merged: dict[int, _Pending] = {}
        timings: dict[str, float] = {}
        subs: list[BatchReport] = []
        # a batch of 100 takes minutes here: a bar on a terminal (none in a log file)
        bar = tqdm(
            reqs, desc=f"{self.name} batch {report.batch_id}", unit="request", leave=False, disable=None
        )
        for i, req in enumerate(bar):
            sub = BatchReport(batch_id=report.batch_id, n_requests=1)
            pendings, t = self._locate_and_solve([req], sub)
            subs.append(sub)
            for key, value in t.items():
                timings[key] = timings.get(key, 0.0) + value
            for layer, p in pendings.items():
                self.layer_state[layer] = p.state  # the next request builds on it
                record = {f"{i}.{k}": v for k, v in p.record.items()}
                prev = merged.get(layer)
                if prev is None:
                    merged[layer] = _Pending(p.delta, p.state, record)
                else:
                    merged[layer] = _Pending(prev.delta + p.delta, p.state, {**prev.record, **record})

        def mean(values: list[float]) -> float:
            return sum(values) / len(values)

        report.residual_before = mean([s.residual_before for s in subs])
        report.residual_after = mean([s.residual_after for s in subs])
        report.target_nll_init = mean([s.target_nll_init for s in subs])
        report.target_nll_final = mean([s.target_nll_final for s in subs])
        report.targets_cached = all(s.targets_cached for s in subs)
        report.targets_keys = [k for s in subs for k in s.targets_keys]
        for layer, p in merged.items():
            report.layers[layer] = {
                "residual_norm": mean([s.layers[layer]["residual_norm"] for s in subs]),
                "delta_norm": float(p.delta.norm()),
                "weight_norm": subs[0].layers[layer]["weight_norm"],
            }
        return merged, timings

    def _locate_and_solve(
        self, reqs: list[EditRequest], report: BatchReport
    ) -> tuple[dict[int, _Pending], dict[str, float]]:
        """Locate the batch and solve every edited layer, writing each layer's delta into the model.

        Fills ``report`` (residuals, target NLL, per-layer norms) and returns the pending results per
        layer and the timings. An editor that does not use the closed-form loop (FT) overrides this; it
        must write its weight changes into the model (the caller restores them on failure).
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
        pendings: dict[int, _Pending] = {}
        weights = self._weights()
        # the blocks below the first edited one do not change in this batch: their output is kept once
        lower = LowerBlocks(self.model, min(cfg.layers)) if cfg.reuse_lower_blocks else None
        for i, layer in enumerate(cfg.layers):
            t1 = time.perf_counter()
            if i == 0:  # nothing below or beside it is ever edited: a static store keeps these
                K, K_prompt = self.targets_provider.first_layer_keys(
                    self.model,
                    self.tokenizer,
                    reqs,
                    self.modules[layer],
                    self.templates,
                    cfg.key_weighting,
                    lower,
                )
            else:
                K, K_prompt = compute_keys(
                    self.model,
                    self.tokenizer,
                    reqs,
                    self.modules[layer],
                    self.templates,
                    weighting=cfg.key_weighting,
                    with_prompt=True,
                    lower=lower,
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

    @property
    def targets_provider(self) -> TargetProvider:
        """Where targets come from (:class:`rlsedit.locate.provider.TargetProvider`; a runtime setting, not
        saved): by default, optimised on the current model."""
        provider = self.__dict__.get("_targets_provider")
        if provider is None:
            provider = self._targets_provider = TargetProvider()
        return provider

    def use_targets(self, provider: TargetProvider) -> None:
        """Take targets from ``provider`` from now on (a cache folder, a recorded stream, a static store).

        A static store is checked at once against this editor's last layer, templates and target
        settings, and, before any batch is applied, against the model (a store is made on the unedited
        model; a resumed editor's model is edited already); the requests are checked when a stream is known
        (:meth:`check_static_targets`)."""
        if provider.static is not None:
            provider.static.check(self.model if not self.batches else None, self.target_settings(), [])
        self._targets_provider = provider

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

    def _measure_norm_anchor(self) -> float:
        """NAS's reference norm on the unedited model: :func:`reference_value_norm` of the targets of
        ``norm_anchor_samples`` CounterFact tune cases spread over the split (kept in the config, so a
        saved editor reuses it)."""
        from rlsedit.datasets import load_counterfact

        cfg = self.config
        tune = load_counterfact(split="tune")
        n = min(cfg.norm_anchor_samples, len(tune))
        reqs = [tune[i * len(tune) // n].request for i in range(n)]
        layer = cfg.layers[-1]
        tr = compute_targets(self.model, self.tokenizer, reqs, layer, self.templates, cfg.targets)
        v0 = compute_hidden(self.model, self.tokenizer, reqs, self.modules[layer])
        ref = reference_value_norm(v0, tr.z, tr.h0)
        log.info("norm anchor: reference value norm %.4g (layer %d, %d tune cases)", ref, layer, n)
        return ref

    def _norm_anchored(self, reqs: list[EditRequest], tr: TargetResult, layer: int) -> torch.Tensor:
        """The targets ``z`` of ``tr`` with their value vectors rescaled to ``norm_anchor_ref`` (see
        :class:`EditorConfig`); ``(u, d_model)``."""
        v0 = tr.v0
        if v0 is None:  # on the model as it is, like h0
            v0 = compute_hidden(self.model, self.tokenizer, reqs, self.modules[layer])
        z, n_skipped = norm_anchor_targets(tr.z, tr.h0, v0, self.config.norm_anchor_ref)
        if n_skipped:
            log.info(
                "norm anchor: %d of %d requests left at v0 (||v*|| > 2x the reference)", n_skipped, len(reqs)
            )
        return z

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

    def _check_state(self, pendings: dict[int, _Pending]) -> None:
        """Refuse a batch whose next layer state (e.g. RLSEdit's ``C``) is not finite."""
        for layer, p in pendings.items():
            for key, t in p.state.items():
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise EditError(
                        f"layer {layer}: the editor state {key!r} would not be finite; "
                        "the batch was rolled back"
                    )

    # -- persistence ------------------------------------------------------------------------------------

    def _record_store(self) -> RunStore:
        if self._store is not None:
            return self._store
        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="rlsedit-")
        return RunStore(self._scratch.name)

    def _static_refs(self) -> dict[str, dict]:
        return getattr(self, "_static", {})

    def _write_records(self, batch_id: int, pendings: dict[int, _Pending]) -> dict[str, dict]:
        # batch_id is new (one past the last committed batch), so a blob already at its path is a leftover
        # of an attempt that was killed or rolled back before its commit: replace it.
        refs: dict[str, dict] = {}
        store = self._record_store()
        try:
            for layer, p in pendings.items():
                if p.record:
                    refs[str(layer)] = store.put_blob(
                        f"batches/{batch_id:06d}-layer{layer}.safetensors", p.record, replace=True
                    )
        except BaseException:
            self._discard_records(refs)
            raise
        return refs

    def _discard_records(self, refs: dict[str, dict]) -> None:
        """Delete the record blobs of a batch that was not committed (best effort)."""
        if not refs:
            return
        store = self._record_store()
        for ref in refs.values():
            try:
                store.discard_blob(ref["path"])
            except (OSError, ValueError) as exc:  # it is replaced by the next attempt anyway
                log.warning("could not remove the uncommitted record %s: %s", ref["path"], exc)

    def _ensure_static(self, store: RunStore) -> dict[str, dict]:
        """W0, Sigma and the templates are written once per run directory, as immutable blobs."""
        static = self._static_refs()
        if not static:
            src = self._record_store()
            fresh = src.load_manifest() is None  # nothing committed: blobs there are leftovers of a crash
            static = {
                "W0": src.put_blob(
                    "static/W0.safetensors",
                    {str(k): v.contiguous() for k, v in self.W0.items()},
                    replace=fresh,
                )
            }
            if self.sigmas:
                static["sigma"] = src.put_blob(
                    "static/sigma.safetensors", {str(k): v for k, v in self.sigmas.items()}, replace=fresh
                )
            self._static = static
        if store is not self._record_store():
            fresh = store.load_manifest() is None
            for ref in static.values():
                store.put_blob(ref["path"], self._record_store().load_blob(ref), replace=fresh)
        return static

    def _commit(self, store: RunStore) -> None:
        static = self._ensure_static(store)
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
        with store.lock():
            _reconcile_journal(store)
            generation = store.commit(state, manifest)
            try:
                store.journal.append(_journal_entry(generation, manifest))
            except OSError as exc:  # committed already; the next commit adds the missing entry
                log.warning("%s: journal entry of generation %d not written: %s", store.root, generation, exc)

    def _restore(self, store: RunStore, manifest: dict) -> None:
        extra = len(store.journal) - manifest["journal_length"]  # CorruptStateError if garbled inside
        if extra not in (0, 1):
            raise CorruptStateError(
                f"{store.journal.path}: {extra + manifest['journal_length']} entries, but generation "
                f"{manifest['generation']} was committed with {manifest['journal_length']} (expected that "
                "many or one more)"
            )
        self._store = store
        self.load_name = manifest.get("model", {}).get("load_name")
        self.templates = list(manifest["templates"])
        self._static = manifest["static"]
        self.batches = manifest["batches"]
        w0 = store.load_blob(self._static["W0"])
        self.W0 = {layer: w0[str(layer)] for layer in self.config.layers}
        self.sigmas = {}
        if "sigma" in self._static:
            s = store.load_blob(self._static["sigma"])
            self.sigmas = {layer: s[str(layer)] for layer in self.config.layers}
        # Read and check everything before the model is touched: a damaged run leaves the model as it was.
        weights = store.load_state("weights")
        for layer in self.config.layers:
            try:
                self.layer_state[layer] = store.load_state(f"layer{layer}")
            except LookupError:  # no group: the editor keeps no state (MEMIT, ROME, FT)
                self.layer_state[layer] = {}
            self.layer_state[layer] = self._on_layer_device(layer, self.layer_state[layer])
        for layer, name in self.modules.items():
            w = weight_kv(get_module(self.model, name))
            saved = weights[str(layer)]
            if tuple(saved.shape) != tuple(w.shape):
                raise ValueError(
                    f"{name}: saved weight has shape {tuple(saved.shape)}, model has {tuple(w.shape)}"
                )
            base = self.W0[layer].to(w.dtype)
            if not (torch.equal(w.detach().cpu(), base) or torch.equal(w.detach().cpu(), saved.to(w.dtype))):
                raise ValueError(
                    f"{name}: the model is neither the base model of this run nor its edited state"
                )
        for layer, name in self.modules.items():
            w = weight_kv(get_module(self.model, name))
            with torch.no_grad():
                w.copy_(weights[str(layer)].to(device=w.device, dtype=w.dtype))

    def load_record(self, batch: dict, layer: int) -> dict[str, torch.Tensor]:
        """The recorded tensors of ``batch`` at ``layer`` (read from disk)."""
        return self._record_store().load_blob(batch["records"][str(layer)])

    def weight_deltas(self) -> dict[str, torch.Tensor]:
        """``{module_name: W - W0}`` of shape ``(d_k, d_v)`` for every edited module."""
        return {
            self.modules[layer]: (w.detach().cpu().to(torch.float32) - self.W0[layer].cpu().float())
            for layer, w in self._weights().items()
        }


Callback = Callable[[BatchReport], None]
