"""Where a batch's targets come from: one provider, four sources.

- **optimise** (always the fallback): :func:`rlsedit.locate.targets.compute_targets` on the model as it is
  now (the *dynamic* protocol of the papers);
- **cache** (``cache_dir``): results kept under a hash of everything they depend on (the model state with
  the edited matrices hashed in full, the requests, the layer, the templates, the settings), so runs
  that reach the same state share them (the first batch of several methods on one stream);
- **recorded** (:meth:`TargetProvider.recorded`): the cache keys a recorded stream names, read in order
  (a replay on another machine, whose weights differ from the recorded ones in the last bits);
- **static** (``static``): a :class:`StaticTargetStore` of targets optimised once per request on the
  *unedited* model (``rlsedit targets``), read by request (the *static* protocol: a 10,000-edit stream then
  costs keys and updates only).

With a static store the provider also keeps the keys of the **first** edited layer beside it
(:meth:`TargetProvider.first_layer_keys`): an editor never edits anything below or beside that layer's
edited projection, and the store is only used on a model that was the store's unedited model before the
editor's first batch, so those keys are the same in every batch and every run of the same requests. A
single-layer static stream then runs no key forward after the first run of its stream.

The provider is a runtime object: it is not saved with the editor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlsedit.locate.keys import LowerBlocks, compute_hidden, compute_keys
from rlsedit.locate.targets import TargetConfig, TargetResult, compute_targets
from rlsedit.models.arch import get_arch, mlp_out_name
from rlsedit.requests import EditRequest

__all__ = [
    "STATIC_FORMAT",
    "StaticTargetStore",
    "TargetProvider",
    "fill_static_targets",
    "request_key",
    "store_meta",
    "target_settings",
]

log = logging.getLogger(__name__)

#: Version of a static target store's layout (``meta.json`` and its pieces).
STATIC_FORMAT = 1
#: TargetConfig fields that change how targets are computed, not what they are (left out of the checks).
_RUNTIME_FIELDS = ("chunk_rows", "fast", "skip_layers")
_PIECE = re.compile(r"targets-(\d{6})-(\d{6})\.safetensors$")


def request_key(req: EditRequest) -> str:
    """What a request's target depends on (its prompt, subject and new object), hashed: 24 hex digits."""
    payload = json.dumps([req.prompt, req.subject, req.target_new], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def target_settings(layer: int, templates: Sequence[str], config: TargetConfig) -> dict[str, Any]:
    """Everything besides the model and the request that a target depends on, as JSON."""
    targets = {k: v for k, v in asdict(config).items() if k not in _RUNTIME_FIELDS}
    return {"layer": int(layer), "templates": list(templates), "targets": targets}


def store_meta(model: nn.Module, name: str, settings: Mapping[str, Any], **where: Any) -> dict[str, Any]:
    """What a static store's ``meta.json`` says (beside its format): the unedited ``model`` (its load
    ``name`` and fingerprint), the target ``settings`` (:func:`target_settings`) and ``where`` its cases
    come from (e.g. ``dataset``, ``split``)."""
    from rlsedit.models.load import model_fingerprint

    return {
        "model": {"name": name, "fingerprint": model_fingerprint(model)},
        "settings": dict(settings),
        **where,
    }


def _block_name(model: nn.Module, layer: int) -> str:
    return f"{get_arch(model).blocks}.{layer}"


class StaticTargetStore:
    """A folder of targets optimised once per request on the unedited model.

    ``meta.json`` names the model (name and fingerprint), the settings (:func:`target_settings`) and the
    cases the store was made for; each piece ``targets-{start:06d}-{end:06d}.safetensors`` holds, for the
    requests ``start .. end - 1`` of that list, ``z``, ``h0`` and ``v0`` ``(n, d_model)``, ``nll_init``,
    ``nll_final`` ``(n,)`` and ``steps`` ``(n,)``, with the requests' keys (:func:`request_key`) in its
    metadata; positions count in the dataset split (so two processes may fill disjoint ranges of one
    store side by side). Pieces are written atomically, so a store being filled is always readable and
    resumes after the last complete piece. Requests are found by key, not position.
    """

    META = "meta.json"

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / self.META
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.directory} is not a static target store (no {self.META})")
        from rlsedit.store import load_json

        self.meta: dict[str, Any] = load_json(meta_path)
        if self.meta.get("format") != STATIC_FORMAT:
            raise ValueError(
                f"{self.directory}: static target store format {self.meta.get('format')}, this rlsedit reads "
                f"format {STATIC_FORMAT}; compute the targets again with rlsedit targets"
            )
        self._index: dict[str, tuple[Path, int]] | None = None
        self._loaded: dict[Path, dict[str, torch.Tensor]] = {}

    @classmethod
    def create(cls, directory: str | Path, meta: Mapping[str, Any]) -> StaticTargetStore:
        """Open the store in ``directory``, creating it with ``meta`` (plus the format) if it does not exist;
        an existing store made with other settings or for another model or cases is refused."""
        from rlsedit.store import load_json, save_json

        directory = Path(directory)
        full = {"format": STATIC_FORMAT, **meta}
        path = directory / cls.META
        if path.is_file():
            old = load_json(path)
            diff = sorted(k for k in set(old) | set(full) if old.get(k) != full.get(k))
            if diff:
                raise ValueError(
                    f"{directory} holds targets made differently ({', '.join(diff)} differ); use a new folder"
                )
        else:
            directory.mkdir(parents=True, exist_ok=True)
            save_json(path, full)
        return cls(directory)

    # -- pieces ---------------------------------------------------------------------------------------

    def pieces(self) -> list[tuple[int, int, Path]]:
        """``(start, end, path)`` of every complete piece, in order."""
        out = []
        for p in self.directory.glob("targets-*.safetensors"):
            m = _PIECE.match(p.name)
            if m:
                out.append((int(m.group(1)), int(m.group(2)), p))
        return sorted(out)

    def done(self) -> set[int]:
        """Positions (in the store's case list) with a target."""
        return {i for start, end, _ in self.pieces() for i in range(start, end)}

    def write_piece(self, start: int, requests: Sequence[EditRequest], result: TargetResult) -> Path:
        """Keep ``result`` (for ``requests``, the store's cases ``start .. start + len - 1``; its ``v0`` is
        required)."""
        if result.v0 is None:
            raise ValueError("a static target needs v0, the MLP output it was optimised from")
        from rlsedit.store import save_tensors

        end = start + len(requests)
        path = self.directory / f"targets-{start:06d}-{end:06d}.safetensors"
        tensors = {
            "z": result.z.detach().float().cpu().contiguous(),
            "h0": result.h0.detach().float().cpu().contiguous(),
            "v0": result.v0.detach().float().cpu().contiguous(),
            "nll_init": result.nll_init.float().contiguous(),
            "nll_final": result.nll_final.float().contiguous(),
            "steps": result.steps.contiguous(),
        }
        save_tensors(path, tensors, metadata={"requests": json.dumps([request_key(r) for r in requests])})
        self._index = None
        return path

    def _build_index(self) -> dict[str, tuple[Path, int]]:
        from rlsedit.store import load_tensors_metadata

        if self._index is None:
            index: dict[str, tuple[Path, int]] = {}
            for _, _, path in self.pieces():
                keys = json.loads(load_tensors_metadata(path, verify=False).get("requests", "[]"))
                for row, key in enumerate(keys):
                    index.setdefault(key, (path, row))
            self._index = index
        return self._index

    def missing(self, requests: Sequence[EditRequest]) -> list[EditRequest]:
        """The requests the store holds no target for."""
        index = self._build_index()
        return [r for r in requests if request_key(r) not in index]

    def check(
        self, model: nn.Module | None, settings: Mapping[str, Any], requests: Sequence[EditRequest]
    ) -> None:
        """Refuse (ValueError, naming what differs) a store made for another model (``model``, unedited;
        None: not checked) or with other settings (target settings, last layer, templates), or lacking a
        request of ``requests``."""
        from rlsedit.models.load import model_fingerprint

        problems = []
        fp = None if model is None else model_fingerprint(model)
        if fp is not None and self.meta.get("model", {}).get("fingerprint") != fp:
            problems.append(
                f"the model (store: {self.meta.get('model', {}).get('name')!r}, fingerprint "
                f"{self.meta.get('model', {}).get('fingerprint')}; this model's {fp})"
            )
        stored = self.meta.get("settings", {})
        if stored.get("layer") != settings["layer"]:
            problems.append(
                f"the last edited layer (store {stored.get('layer')}, editor {settings['layer']})"
            )
        if stored.get("templates") != settings["templates"]:
            problems.append("the context templates")
        # a target option added after the store was made is absent from its meta: the store was made
        # with the option's default (options are added with defaults that keep the earlier behaviour)
        added = {k: v for k, v in asdict(TargetConfig()).items() if k not in _RUNTIME_FIELDS}
        theirs, ours = {**added, **stored.get("targets", {})}, settings["targets"]
        for k in sorted(set(theirs) | set(ours)):
            if theirs.get(k) != ours.get(k):
                problems.append(f"target setting {k} (store {theirs.get(k)!r}, editor {ours.get(k)!r})")
        lacking = self.missing(requests)
        if lacking:
            first = ", ".join(f"{r.subject!r} -> {r.target_new!r}" for r in lacking[:3])
            problems.append(f"{len(lacking)} of the {len(requests)} requests have no target (e.g. {first})")
        if problems:
            raise ValueError(
                f"static targets in {self.directory} do not fit this run: " + "; ".join(problems)
            )

    def keys_path(
        self, requests: Sequence[EditRequest], module_name: str, templates: Sequence[str], weighting: str
    ) -> Path:
        """Where the first edited layer's keys of ``requests`` (one batch, in order) are kept:
        ``keys/keys-<hash>.safetensors``, the hash of the requests, the module, the templates and the key
        weighting (the model is the store's)."""
        payload = [module_name, list(templates), weighting, [request_key(r) for r in requests]]
        digest = hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()[:24]
        return self.directory / "keys" / f"keys-{digest}.safetensors"

    def read(self, requests: Sequence[EditRequest]) -> TargetResult:
        """The stored targets of ``requests`` (``extra["static"]``: True). KeyError for a missing one."""
        from rlsedit.store import load_tensors

        index = self._build_index()
        rows: dict[str, list[torch.Tensor]] = {
            k: [] for k in ("z", "h0", "v0", "nll_init", "nll_final", "steps")
        }
        for r in requests:
            key = request_key(r)
            if key not in index:
                raise KeyError(f"no static target for {r.subject!r} -> {r.target_new!r}")
            path, row = index[key]
            if path not in self._loaded:
                self._loaded = {path: load_tensors(path)}  # pieces are read in stream order: keep one
            t = self._loaded[path]
            for k in rows:
                rows[k].append(t[k][row])
        return TargetResult(
            z=torch.stack(rows["z"]),
            h0=torch.stack(rows["h0"]),
            nll_init=torch.stack(rows["nll_init"]),
            nll_final=torch.stack(rows["nll_final"]),
            steps=torch.stack(rows["steps"]),
            seconds=0.0,
            extra={"static": True, "cached": True},
            v0=torch.stack(rows["v0"]),
        )


class TargetProvider:
    """Targets for a batch from the sources in the module docstring (static store first, then the recorded
    keys, then the cache, then optimisation)."""

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        static: StaticTargetStore | str | Path | None = None,
        keep_keys: bool = True,
    ) -> None:
        """``keep_keys``: with a static store, keep and reuse the first edited layer's keys (see the module
        docstring); False computes them in every batch (the same values)."""
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.keep_keys = keep_keys
        self.static = static if static is None or isinstance(static, StaticTargetStore) else None
        if self.static is None and static is not None:
            self.static = StaticTargetStore(static)
        self._recorded: list[str] = []

    @property
    def protocol(self) -> str:
        """ "static" when targets come from a static store, else "dynamic"."""
        return "static" if self.static is not None else "dynamic"

    @contextmanager
    def recorded(self, keys: Sequence[str] | None) -> Iterator[None]:
        """Within the block, the next targets are read from the cache files ``keys`` names (in order) rather
        than the ones the current model state would name."""
        self._recorded = list(keys or [])
        try:
            yield
        finally:
            self._recorded = []

    def first_layer_keys(
        self,
        model: nn.Module,
        tokenizer: Any,
        requests: Sequence[EditRequest],
        module_name: str,
        templates: Sequence[str],
        weighting: str,
        lower: LowerBlocks | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys ``K`` and the bare prompt's keys ``K_prompt`` (both ``(d_k, u)``, float32) of the first
        edited projection ``module_name`` (:func:`rlsedit.locate.keys.compute_keys` with ``with_prompt``):
        read from the static store when it keeps them, else computed (and kept, with a static store and
        ``keep_keys``)."""
        from rlsedit.store import CorruptStateError, load_tensors, save_tensors

        def compute() -> tuple[torch.Tensor, torch.Tensor]:
            return compute_keys(  # type: ignore[return-value]  (with_prompt: a pair)
                model,
                tokenizer,
                requests,
                module_name,
                templates,
                weighting=weighting,
                with_prompt=True,
                lower=lower,
            )

        if self.static is None or not self.keep_keys:
            return compute()
        path = self.static.keys_path(requests, module_name, templates, weighting)
        if path.is_file():
            try:
                t = load_tensors(path)
                if t["K"].shape[1] != len(requests):
                    raise KeyError(f"{t['K'].shape[1]} keys for {len(requests)} requests")
                return t["K"], t["K_prompt"]
            except (CorruptStateError, KeyError) as exc:
                log.warning("ignoring a corrupt kept key file %s: %s", path, exc)
        K, K_prompt = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(path, {"K": K.detach().float().cpu(), "K_prompt": K_prompt.detach().float().cpu()})
        return K, K_prompt

    def state_key(
        self,
        model: nn.Module,
        weights: Mapping[int, torch.Tensor],
        requests: Sequence[EditRequest],
        layer: int,
        templates: Sequence[str],
        config: TargetConfig,
    ) -> str:
        """Everything the targets depend on: the model (architecture and all weights, with the edited
        matrices hashed in full), the requests, the layer, the templates and the target settings."""
        from rlsedit.models.load import model_fingerprint

        h = hashlib.sha256()
        h.update(model_fingerprint(model).encode())
        for w in weights.values():
            h.update(w.detach().to("cpu").contiguous().numpy().tobytes())
        payload = {
            "requests": [r.to_dict() for r in requests],
            "layer": layer,
            "templates": list(templates),
            "targets": asdict(config),
        }
        h.update(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode())
        return h.hexdigest()[:32]

    def targets(
        self,
        model: nn.Module,
        tokenizer: Any,
        requests: Sequence[EditRequest],
        layer: int,
        templates: Sequence[str],
        config: TargetConfig,
        weights: Mapping[int, torch.Tensor],
    ) -> TargetResult:
        """Target hidden states ``z (u, d_model)`` for ``requests`` at block ``layer``.

        ``extra``: ``"static"`` / ``"cached"`` say where they came from, ``"cache_key"`` names the cache file
        read or written.
        """
        from rlsedit.store import CorruptStateError, load_tensors, save_tensors

        if self.static is not None:
            return self.static.read(requests)
        path = key = None
        replayed = bool(self._recorded)
        if self.cache_dir is not None:
            if self._recorded:
                key = self._recorded.pop(0)
            else:
                key = self.state_key(model, weights, requests, layer, templates, config)
            path = self.cache_dir / f"targets-{key}.safetensors"
            if path.is_file():
                try:
                    t = load_tensors(path)
                    if t["z"].shape[0] != len(requests):
                        raise KeyError(f"{t['z'].shape[0]} targets for {len(requests)} requests")
                    log.info("targets read from the cache %s", path)
                    h0 = t.get("h0")
                    if h0 is None:  # cheap to recompute: one forward of the bare prompts
                        h0 = compute_hidden(model, tokenizer, requests, _block_name(model, layer))
                    return TargetResult(
                        z=t["z"],
                        h0=h0,
                        nll_init=t["nll_init"],
                        nll_final=t["nll_final"],
                        steps=t["steps"],
                        seconds=0.0,
                        extra={"cached": True, "cache_key": key},
                    )
                except (CorruptStateError, KeyError) as exc:
                    log.warning("ignoring a corrupt cached target file %s: %s", path, exc)
        tr = compute_targets(model, tokenizer, requests, layer, templates, config)
        if path is not None:  # (set only with a cache folder)
            if replayed:  # the recorded key's file is missing: keep the result under this state's key
                key = self.state_key(model, weights, requests, layer, templates, config)
                path = self.cache_dir / f"targets-{key}.safetensors"
            tr.extra["cache_key"] = key
            path.parent.mkdir(parents=True, exist_ok=True)
            save_tensors(
                path,
                {
                    "z": tr.z.detach().cpu().contiguous(),
                    "nll_init": tr.nll_init.contiguous(),
                    "nll_final": tr.nll_final.contiguous(),
                    "steps": tr.steps.contiguous(),
                },
            )
        return tr


def fill_static_targets(
    store: StaticTargetStore,
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    positions: Sequence[int],
    layer: int,
    templates: Sequence[str],
    config: TargetConfig,
    piece_size: int = 100,
    progress: bool = True,
) -> dict[str, Any]:
    """Optimise (on ``model`` as it is: the unedited model) and keep the targets of ``requests``, whose
    positions in the store's case list are ``positions`` (consecutive), in pieces of ``piece_size``;
    pieces already in the store are skipped, so an interrupted call resumes (the store is read again before
    each piece, so that processes filling overlapping ranges side by side skip each other's pieces).

    Returns ``{"computed": n, "skipped": n, "seconds": s}`` (the seconds of the pieces computed now).
    """
    import time

    from tqdm.auto import tqdm

    if len(requests) != len(positions):
        raise ValueError("one position per request is needed")
    if piece_size < 1:
        raise ValueError(f"piece_size must be >= 1, got {piece_size}")
    computed = skipped = 0
    seconds = 0.0
    starts = range(0, len(requests), piece_size)
    bar = tqdm(starts, desc="static targets", unit="piece", disable=not progress)
    for s in bar:
        reqs = list(requests[s : s + piece_size])
        pos = list(positions[s : s + piece_size])
        done = store.done()
        if all(p in done for p in pos):
            skipped += len(reqs)
            continue
        t0 = time.perf_counter()
        tr = compute_targets(model, tokenizer, reqs, layer, templates, config)
        tr.v0 = compute_hidden(model, tokenizer, reqs, mlp_out_name(model, layer))
        store.write_piece(pos[0], reqs, tr)
        seconds += time.perf_counter() - t0
        computed += len(reqs)
        bar.set_postfix(per_edit=f"{seconds / computed:.2f}s")
        log.info(
            "static targets %d-%d: %.1fs (mean steps %.1f, final NLL %.3f)",
            pos[0],
            pos[-1] + 1,
            time.perf_counter() - t0,
            float(tr.steps.float().mean()),
            float(tr.nll_final.mean()),
        )
    return {"computed": computed, "skipped": skipped, "seconds": seconds}
