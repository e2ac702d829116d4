"""The forward of a chunk of target-optimisation rows with the delta added at the subject's last token.

Two implementations share one interface (``forward(idx, delta_rows) -> _ChunkOutput``): the straightforward
one runs every row in full (:class:`_FullForward`); the fast one (:class:`_PrefixCachedForward`) computes
the key/value cache of every row's prefix (the tokens before the subject's last one, independent of the
delta) once and runs only the suffix at each step. :func:`_make_forward` picks one for a model
(see :mod:`rlsedit.locate.targets` for the optimisation around it).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from rlsedit.hooks import add_at_positions, trace
from rlsedit.locate.tokens import pad_rows
from rlsedit.models.arch import get_arch, get_module, input_device


class ForwardSettings(Protocol):
    """What :func:`_make_forward` reads of a ``TargetConfig``."""

    fast: bool
    chunk_rows: int
    skip_layers: bool


log = logging.getLogger(__name__)

#: A chunk forward: ``(row indices, delta per row (n, d_model)) -> _ChunkOutput``.
_ChunkForward = Callable[[Sequence[int], torch.Tensor], "_ChunkOutput"]


@dataclass
class _Row:
    """One optimisation row of a request: an NLL row (context + prompt + target) or its KL row."""

    ids: list[int]
    subject_last: int  # index of the subject's last token: the delta is added there
    req: int
    kind: str  # "nll" or "kl"
    target_pos: list[int]  # positions whose next-token prediction is a target token
    target_tok: list[int]
    ctx: int = -1  # index of the row's context template (-1: the KL row)


@dataclass
class _ChunkOutput:
    """The forward of a chunk of ``n`` rows; column ``c`` of row ``k`` holds the row's token ``start[k] + c``.

    Attributes:
        hidden: ``(n, T, d_model)`` final-norm outputs, differentiable w.r.t. the delta.
        block: ``(n, T, d_model)`` outputs of block ``layer`` (detached; the delta is in them).
        start: per row, the index (in the row's tokens) of the token in column 0: 0 for a full forward,
            the subject's last token for the prefix-cached one.
    """

    hidden: torch.Tensor
    block: torch.Tensor
    start: list[int]


@dataclass(frozen=True)
class _Sites:
    """Module paths: where the delta goes in, where ``h`` is read, and the final norm."""

    inject: str
    read: str
    final_norm: str
    layer: int = 0  # index of the block that gets the delta


def _run_chunk(
    model: nn.Module,
    sites: _Sites,
    vec: torch.Tensor,
    cols: torch.Tensor,
    block_only: bool = False,
    **inputs: object,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One forward with ``vec[k]`` (``(n, d_model)``) added at column ``cols[k]`` (``(n,)``) of row ``k``.

    Returns ``(final-norm output, block output)``, both ``(n, T, d_model)``; the forward stops at the final
    norm (no LM head), or, with ``block_only``, right after the block that is read (the final-norm output is
    then None).
    """
    names = [sites.read] if block_only else [sites.read, sites.final_norm]
    with (
        add_at_positions(model, sites.inject, vec, cols),
        trace(model, names, capture_output=True, detach=False, stop=True) as tr,
    ):
        model(**inputs)
    hidden = None if block_only else tr[sites.final_norm].output
    return hidden, tr[sites.read].output.detach()


class _FullForward:
    """The straightforward forward: every row in full (right-padded); the delta at the subject's last
    token."""

    def __init__(self, model: nn.Module, sites: _Sites, rows: Sequence[_Row], pad: int) -> None:
        self.model, self.sites, self.rows, self.pad = model, sites, rows, pad
        self.device = input_device(model)

    def __call__(self, idx: Sequence[int], vec: torch.Tensor) -> _ChunkOutput:
        rows = [self.rows[k] for k in idx]
        ids, mask = pad_rows([r.ids for r in rows], self.pad)
        cols = torch.tensor([r.subject_last for r in rows])  # moved to the injection's device there
        hidden, block = _run_chunk(
            self.model,
            self.sites,
            vec,
            cols,
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            use_cache=False,
        )
        return _ChunkOutput(hidden, block, [0] * len(rows))


def _cache_kwarg(model: nn.Module) -> str | None:
    """The name under which the model's forward takes a KV cache (``cache`` in transformers >= 5.x,
    ``past_key_values`` before), or None when it takes none."""
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def _fast_unsupported(model: nn.Module) -> str | None:
    """Why the prefix-cache path cannot run on ``model`` (None when it can)."""
    if getattr(model.config, "is_encoder_decoder", False):
        return "encoder-decoder model"
    params = inspect.signature(model.forward).parameters
    if "position_ids" not in params:
        return "its forward takes no position_ids"
    if _cache_kwarg(model) is None:
        return "its forward takes no KV cache"
    try:
        from transformers import DynamicCache  # noqa: F401
    except ImportError:
        return "transformers has no DynamicCache"
    return None


def _cache_layers(cache: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(keys, values)]`` per layer of a filled ``DynamicCache``; each is ``(batch, kv_heads, seq,
    head_dim)``."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))  # transformers 4.x


def _d_model(model: nn.Module) -> int:
    """The width of the residual stream (the text config's ``hidden_size``)."""
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(text.hidden_size)


class _SkippedBlock(nn.Module):
    """Stands in for a block whose output at the suffix tokens is known: returns ``output`` (or, when it is
    None, its input unchanged) without computing anything. Copies the block's plain attributes (e.g.
    ``attention_type``, ``layer_idx``), which some models read from their blocks inside the layer loop."""

    def __init__(self, block: nn.Module, output: torch.Tensor | None = None) -> None:
        super().__init__()
        for name, value in vars(block).items():
            if not name.startswith("_") and not isinstance(value, nn.Module | torch.Tensor):
                object.__setattr__(self, name, value)
        self.output = output

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return hidden_states if self.output is None else self.output


@contextmanager
def _blocks_replaced(blocks: nn.ModuleList, stubs: Sequence[nn.Module]) -> Iterator[None]:
    """Temporarily put ``stubs[j]`` in place of ``blocks[j]`` (j < len(stubs))."""
    saved = [blocks[j] for j in range(len(stubs))]
    try:
        for j, stub in enumerate(stubs):
            blocks[j] = stub
        yield
    finally:
        for j, block in enumerate(saved):
            blocks[j] = block


class _PrefixCachedForward:
    """The fast forward: the prefix (tokens before the subject's last token) of every row is encoded once,
    then each call runs only the rows' suffixes (the subject's last token onwards) on that cache.

    Prefix keys/values are stored per layer as ``(n_rows, kv_heads, P, head_dim)`` (``P`` = the longest
    prefix), left-padded so that every prefix ends in column ``P - 1``; pad entries are zero and masked. A
    call gathers its rows into a fresh ``DynamicCache`` (the stored tensors are never mutated: the cache's
    updates concatenate into new tensors), right-pads the suffixes, and passes the attention mask
    ``[prefix mask | suffix mask]`` and the position ids of the unpadded rows.

    Layer skip (``layer`` given): the suffix tokens' states up to block ``layer`` do not depend on the delta
    either (the delta enters at that block's MLP output, at the suffix's first token, and a block's
    attention reads the keys and values of its own input), so block ``layer``'s output at the suffix is
    computed once too, and each call replaces blocks ``0..layer`` by stubs returning it (plus the delta at
    the suffix's first token): only the blocks above ``layer`` run. This assumes the delta adds to the
    block's output, which a self-check at construction verifies on a few rows with a random delta (against the
    forward with the delta injected at the MLP output); where it fails (e.g. a norm after the MLP) the
    skip is turned off and every block runs.
    """

    def __init__(
        self,
        model: nn.Module,
        sites: _Sites,
        rows: Sequence[_Row],
        pad: int,
        chunk_rows: int,
        layer: int | None = None,
    ) -> None:
        from transformers import DynamicCache

        self.model, self.sites, self.rows, self.pad = model, sites, rows, pad
        self.device = input_device(model)
        self._cache_cls = DynamicCache
        kwarg = _cache_kwarg(model)
        if kwarg is None:
            raise TypeError("the model's forward takes no KV cache")
        self.cache_kwarg = kwarg
        n_blocks = len(get_module(model, get_arch(model).blocks))
        self.width = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.pmask = torch.zeros(len(rows), 0, dtype=torch.long)
        self.stems: list[int] = []  # lengths of the shared stems (one per context with one)
        self.layer: int | None = None
        self.skip_reason: str | None = "not requested" if layer is None else None
        self.suffix_out: torch.Tensor | None = None
        if max(r.subject_last for r in rows) > 0:
            self._build_prefix_cache(chunk_rows, n_blocks)
        if layer is not None:
            self._prepare_skip(layer, chunk_rows)

    def _stems(self) -> tuple[list[int], list[int]]:
        """The token stems rows share: the rows of one context template (one per request) begin with the
        same tokens (the template's, up to where the prompt's first word merges with them), whose keys
        and values are therefore the same in every such row (causal attention, same positions).

        Returns ``(stem length per stem, stem index per row (-1: none))``; a stem is kept when at least two
        rows share at least two tokens, and never reaches a row's subject's last token.
        """
        groups: dict[int, list[int]] = {}
        for k, r in enumerate(self.rows):
            if r.kind == "nll" and r.ctx >= 0:
                groups.setdefault(r.ctx, []).append(k)
        lengths: list[int] = []
        row_stem = [-1] * len(self.rows)
        for members in groups.values():
            if len(members) < 2:
                continue
            first = self.rows[members[0]].ids
            m = min(self.rows[k].subject_last for k in members)
            for k in members[1:]:
                ids = self.rows[k].ids
                c = 0
                while c < m and ids[c] == first[c]:
                    c += 1
                m = c
            if m >= 2:
                for k in members:
                    row_stem[k] = len(lengths)
                lengths.append(m)
        return lengths, row_stem

    def _encode(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        pos: torch.Tensor,
        past: list[tuple[torch.Tensor, torch.Tensor]] | None,
        past_mask: torch.Tensor | None,
        n_blocks: int,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One no-grad forward of ``ids`` (``(n, T)``; ``mask`` and ``pos`` alike) on top of ``past``
        (``[(keys, values)]`` per block, ``(n, kv_heads, P, head_dim)``, with ``past_mask`` ``(n, P)``; or
        None); returns the ``(keys, values)`` of the new tokens per block, ``(n, kv_heads, T, head_dim)``."""
        cache = self._cache_cls()
        p = 0
        if past is not None:
            assert past_mask is not None and past_mask.shape == (ids.shape[0], past[0][0].shape[-2])
            p = past_mask.shape[1]
            for layer, (k, v) in enumerate(past):
                cache.update(k, v, layer)
            mask = torch.cat([past_mask, mask], 1)
        with trace(self.model, [self.sites.final_norm], stop=True):
            self.model(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=pos.to(self.device),
                use_cache=True,
                **{self.cache_kwarg: cache},
            )
        kv = _cache_layers(cache)
        if len(kv) != n_blocks or any(
            t.dim() != 4 or t.shape[0] != ids.shape[0] or t.shape[-2] != p + ids.shape[1]
            for pair in kv
            for t in pair
        ):
            raise ValueError("the model did not fill a (batch, heads, seq, head_dim) cache per block")
        return [(k[:, :, p:], v[:, :, p:]) for k, v in kv]

    def _allocate(self, like: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Zero storage ``(n_rows, kv_heads, width, head_dim)`` per block, shaped, typed and placed like
        ``like``'s ``(keys, values)``; nothing when it exists already."""
        if self.keys:
            return
        n = len(self.rows)
        for k, v in like:
            self.keys.append(k.new_zeros(n, k.shape[1], self.width, k.shape[3]))
            self.values.append(v.new_zeros(n, v.shape[1], self.width, v.shape[3]))

    def _build_prefix_cache(self, chunk_rows: int, n_blocks: int) -> None:
        """Encode every row's prefix once (no grad) into ``self.keys`` / ``self.values`` / ``self.pmask``.

        Layout per row: ``[stem (Ms columns) | rest (R columns)]``, each part left-padded (pads are zero
        and masked), where the stem is the token prefix the row shares with the other rows of its context
        template (:meth:`_stems`; encoded once per template) and the rest is the remainder of the prefix,
        encoded on top of the row's stem. Rows are encoded in order of their rest's length, so that a
        chunk's padding is small.
        """
        rows, pad = self.rows, self.pad
        stem_len, row_stem = self._stems()
        self.stems = stem_len
        n_stems, Ms = len(stem_len), max(stem_len, default=0)
        start = [stem_len[g] if g >= 0 else 0 for g in row_stem]
        rest = [r.subject_last - m for r, m in zip(rows, start, strict=True)]
        R = max(rest)
        self.width = Ms + R

        def left_padded(seqs: list[list[int]], width: int, offsets: list[int]) -> tuple[torch.Tensor, ...]:
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for k, seq in enumerate(seqs):
                if seq:
                    ids[k, width - len(seq) :] = torch.tensor(seq)
                    mask[k, width - len(seq) :] = 1
            pos = (mask.cumsum(1) - 1).clamp_min(0) + torch.tensor(offsets)[:, None]
            return ids, mask, pos

        with torch.no_grad():
            stem_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
            stem_mask = torch.zeros(n_stems + 1, Ms, dtype=torch.long)
            if n_stems:
                first = [next(k for k, g in enumerate(row_stem) if g == s) for s in range(n_stems)]
                seqs = [rows[k].ids[: stem_len[s]] for s, k in enumerate(first)]
                ids, mask, pos = left_padded(seqs, Ms, [0] * n_stems)
                kv = self._encode(ids, mask, pos, None, None, n_blocks)
                valid = mask.to(torch.bool)[:, None, :, None]
                # one all-masked stem (index n_stems) for the rows without one
                stem_kv = [
                    (
                        F.pad(torch.where(valid.to(k.device), k, 0), (0, 0, 0, 0, 0, 0, 0, 1)),
                        F.pad(torch.where(valid.to(v.device), v, 0), (0, 0, 0, 0, 0, 0, 0, 1)),
                    )
                    for k, v in kv
                ]
                stem_mask[:n_stems] = mask
            row_g = torch.tensor([g if g >= 0 else n_stems for g in row_stem])
            self.pmask = torch.zeros(len(rows), self.width, dtype=torch.long)
            self.pmask[:, :Ms] = stem_mask[row_g]
            order = sorted(range(len(rows)), key=lambda k: rest[k])
            for c0 in range(0, len(rows), chunk_rows):
                slots = torch.tensor(order[c0 : c0 + chunk_rows])
                rw = max(rest[k] for k in slots.tolist())
                if rw == 0:
                    continue
                seqs = [rows[k].ids[start[k] : rows[k].subject_last] for k in slots.tolist()]
                ids, mask, pos = left_padded(seqs, rw, [start[k] for k in slots.tolist()])
                past, past_mask = None, None
                if stem_kv is not None:
                    g = row_g[slots]
                    past = [
                        (k.index_select(0, g.to(k.device)), v.index_select(0, g.to(v.device)))
                        for k, v in stem_kv
                    ]
                    past_mask = stem_mask[g]
                kv = self._encode(ids, mask, pos, past, past_mask, n_blocks)
                self._allocate(kv)
                valid = mask.to(torch.bool)[:, None, :, None]
                for (k, v), ks, vs in zip(kv, self.keys, self.values, strict=True):
                    at = slots.to(ks.device)  # each block's cache is on that block's device
                    ks[at, :, self.width - rw :] = torch.where(valid.to(k.device), k, 0)
                    vs[at, :, self.width - rw :] = torch.where(valid.to(v.device), v, 0)
                self.pmask[slots, self.width - rw :] = mask
            if stem_kv is not None:
                self._allocate(stem_kv)  # (already done unless every prefix is a stem)
                for (k, v), ks, vs in zip(stem_kv, self.keys, self.values, strict=True):
                    ks[:, :, :Ms] = k.index_select(0, row_g.to(k.device))
                    vs[:, :, :Ms] = v.index_select(0, row_g.to(v.device))

    def _prepare_skip(self, layer: int, chunk_rows: int) -> None:
        """Block ``layer``'s output at every row's suffix (``(n_rows, S, d_model)``, right-padded), then
        the self-check; sets ``self.layer`` when the skip is valid, else ``self.skip_reason``."""
        blocks = get_module(self.model, get_arch(self.model).blocks)
        if not isinstance(blocks, nn.ModuleList):
            self.skip_reason = "the blocks are not a ModuleList"
            return
        width = max(len(r.ids) - r.subject_last for r in self.rows)
        parts: list[torch.Tensor] = []
        with torch.no_grad():
            for c0 in range(0, len(self.rows), chunk_rows):
                idx = list(range(c0, min(len(self.rows), c0 + chunk_rows)))
                zero = torch.zeros(len(idx), _d_model(self.model), device=self.device)
                block = self(idx, zero, block_only=True).block  # blocks above `layer` are not needed
                parts.append(F.pad(block, (0, 0, 0, width - block.shape[1])))
        self.suffix_out = torch.cat(parts, 0)
        self.blocks = blocks
        # self-check on a few rows with a random delta
        idx = list(range(min(len(self.rows), 4)))
        g = torch.Generator(device="cpu").manual_seed(0)
        scale = float(self.suffix_out[:, 0].float().norm(dim=-1).mean()) * 0.5 + 1e-3
        vec = (
            torch.randn(len(idx), _d_model(self.model), generator=g) * scale / _d_model(self.model) ** 0.5
        ).to(self.device)
        with torch.no_grad():
            ref = self(idx, vec)
            self.layer = layer
            try:
                got = self(idx, vec)
            except Exception as exc:  # noqa: BLE001 -- any failure of the stubs disables the skip
                self.layer, self.skip_reason = None, f"{type(exc).__name__}: {exc}"
                return
        lens = [len(self.rows[k].ids) - self.rows[k].subject_last for k in idx]
        err = max(
            float((got.hidden[k, :n] - ref.hidden[k, :n]).norm() / ref.hidden[k, :n].norm().clamp_min(1e-30))
            for k, n in enumerate(lens)
        )
        if not err < 1e-4:
            self.layer, self.skip_reason = None, f"self-check failed (relative difference {err:.2e})"

    def nbytes(self) -> int:
        """Memory held by the prefix cache."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def suffix_nbytes(self) -> int:
        """Memory held by the cached suffix block outputs (layer skip)."""
        return 0 if self.suffix_out is None else self.suffix_out.numel() * self.suffix_out.element_size()

    def __call__(self, idx: Sequence[int], vec: torch.Tensor, block_only: bool = False) -> _ChunkOutput:
        """The suffix forward of rows ``idx``; ``block_only`` (layer skip off) stops after block ``layer``
        (``hidden`` is then None)."""
        rows = [self.rows[k] for k in idx]
        n = len(rows)
        plen = [r.subject_last for r in rows]
        ids, smask = pad_rows([r.ids[p:] for r, p in zip(rows, plen, strict=True)], self.pad)
        pl = torch.tensor(plen, dtype=torch.long)[:, None]
        pos = pl + torch.arange(ids.shape[1])
        pos = torch.where(smask.bool(), pos, pl)  # pads: any valid position
        inputs: dict[str, object] = {"input_ids": ids.to(self.device), "position_ids": pos.to(self.device)}
        sel = torch.tensor(list(idx))
        pmask = self.pmask[sel]
        used = pmask.any(0).nonzero().flatten()  # prefix columns some row of this chunk uses
        if used.numel() == 0:
            inputs.update(attention_mask=smask.to(self.device), use_cache=False)
        else:
            lo = int(used[0])
            cache = self._cache_cls()
            for layer, (ks, vs) in enumerate(zip(self.keys, self.values, strict=True)):
                cache.update(
                    ks[:, :, lo:].index_select(0, sel.to(ks.device)),
                    vs[:, :, lo:].index_select(0, sel.to(vs.device)),
                    layer,
                )
            inputs.update(attention_mask=torch.cat([pmask[:, lo:], smask], 1).to(self.device), use_cache=True)
            inputs[self.cache_kwarg] = cache
        if self.layer is None:
            cols = torch.zeros(n, dtype=torch.long)
            hidden, block = _run_chunk(self.model, self.sites, vec, cols, block_only, **inputs)
            return _ChunkOutput(hidden, block, plen)  # type: ignore[arg-type]
        assert self.suffix_out is not None
        cached = self.suffix_out[torch.tensor(list(idx), device=self.suffix_out.device), : ids.shape[1]]
        first = cached[:, :1] + vec.to(device=cached.device, dtype=cached.dtype)[:, None]
        out = torch.cat([first, cached[:, 1:]], 1)  # block `layer`'s output with the delta: (n, S, d_model)
        stubs = [_SkippedBlock(self.blocks[j]) for j in range(self.layer)]
        stubs.append(_SkippedBlock(self.blocks[self.layer], out))
        with (
            _blocks_replaced(self.blocks, stubs),
            trace(self.model, [self.sites.final_norm], capture_output=True, detach=False, stop=True) as tr,
        ):
            self.model(**inputs)
        return _ChunkOutput(tr[self.sites.final_norm].output, out.detach(), plen)


_warned_fallback: set[str] = set()


def _make_forward(
    model: nn.Module, sites: _Sites, rows: Sequence[_Row], pad: int, cfg: ForwardSettings
) -> tuple[_ChunkForward, dict]:
    """The chunk forward ``cfg`` asks for, falling back to the full one (with a warning) where the
    prefix cache is unsupported. Returns ``(forward, info)`` (info goes to ``TargetResult.extra``)."""
    if not cfg.fast:
        return _FullForward(model, sites, rows, pad), {"fast": False}
    reason = _fast_unsupported(model)
    if reason is None:
        t0 = time.perf_counter()
        try:
            fwd = _PrefixCachedForward(
                model, sites, rows, pad, cfg.chunk_rows, layer=sites.layer if cfg.skip_layers else None
            )
        except (TypeError, ValueError, RuntimeError, NotImplementedError, AttributeError, IndexError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        else:
            info = {
                "fast": True,
                "prefix_seconds": time.perf_counter() - t0,
                "prefix_bytes": fwd.nbytes(),
                "suffix_bytes": fwd.suffix_nbytes(),
                "skip_layers": fwd.layer is not None,
                "skip_reason": fwd.skip_reason,
            }
            if cfg.skip_layers and fwd.layer is None:
                log.debug("compute_targets: layer skip off (%s)", fwd.skip_reason)
            return fwd, info
    model_type = str(getattr(model.config, "model_type", type(model).__name__))
    if model_type not in _warned_fallback:
        _warned_fallback.add(model_type)
        log.warning(
            "compute_targets: the prefix-cache fast path does not support %s (%s); running every row in full",
            model_type,
            reason,
        )
    return _FullForward(model, sites, rows, pad), {"fast": False, "fallback": reason}
