"""The editor protocols, the registry, configuration and reports shared by every editor.

The locate-then-edit loop that the closed-form editors share is :mod:`rlsedit.editors.loop`; where an
editor's run directory is written and read, :mod:`rlsedit.recorder`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from rlsedit.configs import model_defaults
from rlsedit.locate import TargetConfig
from rlsedit.locate.keys import KEY_WEIGHTINGS
from rlsedit.models.arch import num_layers
from rlsedit.recorder import EDITOR_KIND, RunRecorder
from rlsedit.requests import EditRequest
from rlsedit.store import RunStore

__all__ = [
    "BatchReport",
    "EDITOR_KIND",
    "EditReport",
    "Editor",
    "EditorConfig",
    "HasObjective",
    "LayerUpdate",
    "Retractable",
    "EditError",
    "register_editor",
    "make_editor",
    "load_editor",
    "list_editors",
    "editor_class",
]


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
    manifest = RunRecorder.open(store)
    cls = editor_class(manifest["method"])
    editor = cls.restore(store, manifest, model, tokenizer)
    if attach:  # finish what a crash right after the last commit left undone (if no one else writes now)
        editor.recorder.finish_interrupted()
    else:
        editor.recorder.detach(editor.batches)
    return editor


@dataclass
class LayerUpdate:
    """One edited layer's solve result, applied only once every layer of the batch succeeded.

    Attributes:
        delta: ``(d_k, d_v)`` the weight change (any device and dtype: cast to the weight's when written).
        state: the layer's next state (tensors on the layer's device).
        record: tensors recorded for the batch (e.g. RLSEdit's ``K``, ``V``); empty: nothing recorded.
    """

    delta: torch.Tensor
    state: dict[str, torch.Tensor]
    record: dict[str, torch.Tensor]
