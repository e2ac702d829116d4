"""Target hidden states: the vector each request's subject should produce at the last edited layer.

For every request ``i`` a delta ``d_i`` (``d_model``) is added to the output of the last edited layer's
MLP at the subject's last token, in every context template. ``d_i`` is optimised (Adam) to minimise, as
MEMIT's ``compute_z`` does (the defaults),

    NLL(target_new | template + prompt)  averaged over templates and target tokens
    + kl_factor * KL(p_delta || p_0) of the next token after the subject in "{subject} is a"
    + weight_decay * ||d_i|| / ||h_i||^2

with ``||d_i|| <= clamp_norm_factor * ||h_i||`` after every step, where ``h_i`` is the layer's hidden state
(block output) at the subject's last token of the bare prompt. The target is ``z_i = h_i + d_i``. A request
stops once its total loss (the three terms) is below ``stop_nll`` (MEMIT: ``loss < 5e-2``). Named options
keep this project's earlier forms: ``kl_form="after_prompt"`` (KL(p_0 || p_delta) of the token after
"{subject} is a"), ``weight_decay_form="squared"`` (``||d_i||^2 / ||h_i||^2``), ``stop_on="nll"`` (stop on
the NLL alone).

All requests of a batch are optimised together (one padded batch, gradients accumulated over chunks);
a request whose stopping measure falls below ``stop_nll`` is frozen and leaves the batch, so later steps
only run the requests still learning.

Fast path (``TargetConfig.fast``, the default): every token before a row's subject's last token is
independent of ``d_i`` at every layer, so the key/value cache of those prefix tokens is computed once,
before the optimisation (no grad), and each step runs only the row's remaining tokens (the subject's last
token onwards, plus the target tokens) on top of that cache. The prefixes are left-padded so they end in
the same column; the suffix forward gets an explicit attention mask (prefix mask + suffix mask) and
explicit position ids (the positions of the unpadded row), so it computes what the full forward computes
(up to float rounding). The straightforward path (``fast=False``) runs every row in full at every step;
both share the loss, the clamp and the early stop and differ only in the forward of a chunk of rows. The
prefix cache costs ``2 * n_layers * (kv width)`` values per prefix token of every row, held for the whole
call; architectures whose forward takes no cache fall back to the straightforward path with a warning.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from rlsedit.hooks import add_at_positions, trace
from rlsedit.locate.tokens import encode_text_upto, pad_id_of, pad_rows, target_ids
from rlsedit.models.arch import get_arch, get_module, input_device
from rlsedit.requests import EditRequest

__all__ = [
    "FAST_STEP",
    "REFERENCE_STEP",
    "STEP_RULES",
    "TargetConfig",
    "TargetResult",
    "compute_targets",
    "frozen_params",
    "logits_from_hidden",
]

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
    #: compute the prefix key/value cache once and run only the tokens from the subject's last token on
    #: (same results up to float rounding; 2-3x faster on SmolLM2-135M); False runs every row in full
    fast: bool = True
    #: on the fast path, also skip blocks up to the edited one for the suffix tokens (self-checked; off
    #: where the delta does not add to the block's output)
    skip_layers: bool = True
    #: "reference" (MEMIT): KL(p || p_0) at the subject's last token of ``kl_prompt``; "after_prompt":
    #: KL(p_0 || p) at its last token
    kl_form: str = "reference"
    #: "norm" (MEMIT): ``weight_decay * ||d|| / ||h||^2``; "squared": ``weight_decay * ||d||^2 / ||h||^2``
    weight_decay_form: str = "norm"
    #: what must fall below ``stop_nll`` for a request to stop: "loss" (MEMIT: NLL + KL + decay) or "nll"
    stop_on: str = "loss"
    #: the first step: "zero" (MEMIT: an Adam step from d = 0) or "gradient" (d jumps to
    #: ``init_scale * clamp_norm_factor * ||h||`` along the loss's negative gradient at d = 0, the
    #: steepest descent direction at the clamp's length; later steps are Adam's)
    init: str = "zero"
    init_scale: float = 1.0
    #: generated context templates the loss uses besides the bare prompt: -1 all of them (MEMIT), k the
    #: first k (a step costs about proportionally to the prompts it runs; the keys still use all)
    n_contexts: int = -1

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.steps < 1 or self.chunk_rows < 1:
            raise ValueError("lr must be > 0, steps >= 1 and chunk_rows >= 1")
        if self.kl_factor < 0 or self.weight_decay < 0 or self.clamp_norm_factor <= 0 or self.stop_nll < 0:
            raise ValueError("kl_factor, weight_decay, stop_nll must be >= 0 and clamp_norm_factor > 0")
        if self.n_contexts < -1:
            raise ValueError(f"n_contexts must be -1 (all) or >= 0, got {self.n_contexts}")
        if not 0 < self.init_scale <= 1:
            raise ValueError(f"init_scale must be in (0, 1], got {self.init_scale}")
        if self.kl_prompt.count("{}") != 1:
            raise ValueError("kl_prompt must hold exactly one '{}' for the subject")
        for name, allowed in (
            ("kl_form", ("reference", "after_prompt")),
            ("weight_decay_form", ("norm", "squared")),
            ("stop_on", ("loss", "nll")),
            ("init", ("zero", "gradient")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")


#: MEMIT's step rule (``compute_z``): up to 25 Adam steps at lr 0.5 from ``d = 0`` over every context
#: template, stopping on the total loss < 0.05. Overrides of a :class:`TargetConfig` (its loss terms are
#: kept); the class defaults are this rule, SmolLM2's defaults a cheaper one (see its config file).
REFERENCE_STEP: dict[str, object] = {
    "lr": 0.5,
    "steps": 25,
    "stop_on": "loss",
    "stop_nll": 0.05,
    "init": "zero",
    "n_contexts": -1,
}


#: A cheaper step rule (SmolLM2's default; measured side by side with MEMIT's in RESULTS.md, section 4):
#: larger Adam steps, at most 10, each request stopping once its NLL < 0.1, over the bare prompt and one
#: generated context. The lr is in the units of the hidden state (SmolLM2's ||h|| ~ 124 at layer 7): a
#: model whose hidden states are much larger or smaller needs its own.
FAST_STEP: dict[str, object] = {
    "lr": 2.5,
    "steps": 10,
    "stop_on": "nll",
    "stop_nll": 0.1,
    "init": "zero",
    "n_contexts": 1,
}

#: Named step rules (``--target-step NAME`` on the CLI; ``make_editor(..., **STEP_RULES[NAME])``).
STEP_RULES: dict[str, dict[str, object]] = {"memit": REFERENCE_STEP, "fast": FAST_STEP}


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
        v0: ``(u, d_model)`` the layer's MLP output at the same tokens before optimisation (``h0`` less
            the residual stream it adds to), where known (static stores keep it; norm-anchored targets
            rescale ``v0 + z - h0``).
    """

    z: torch.Tensor
    h0: torch.Tensor
    nll_init: torch.Tensor
    nll_final: torch.Tensor
    steps: torch.Tensor
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    v0: torch.Tensor | None = None


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
    """One optimisation row of a request: an NLL row (context + prompt + target) or its KL row."""

    ids: list[int]
    subject_last: int  # index of the subject's last token: the delta is added there
    req: int
    kind: str  # "nll" or "kl"
    target_pos: list[int]  # positions whose next-token prediction is a target token
    target_tok: list[int]
    ctx: int = -1  # index of the row's context template (-1: the KL row)


def _build_rows(
    tokenizer,
    requests: Sequence[EditRequest],
    contexts: Sequence[str],
    kl_prompt: str,
    kl_at_subject: bool = True,
) -> list[list[_Row]]:
    per_req: list[list[_Row]] = []
    for i, req in enumerate(requests):
        tgt = target_ids(tokenizer, req.target_new_text)
        rows: list[_Row] = []
        for c, ctx in enumerate(contexts):
            ids, last = encode_text_upto(
                tokenizer, ctx + req.text, len(ctx) + len(req.prefix) + len(req.subject)
            )
            n = len(ids)
            rows.append(_Row(ids + tgt[:-1], last, i, "nll", list(range(n - 1, n - 1 + len(tgt))), tgt, c))
        pre, post = kl_prompt.split("{}", 1)
        kl_text = pre + req.subject + post
        ids, last = encode_text_upto(tokenizer, kl_text, len(pre) + len(req.subject))
        if kl_at_subject:  # the distribution after the subject: later tokens cannot change it
            rows.append(_Row(ids[: last + 1], last, i, "kl", [last], []))
        else:
            rows.append(_Row(ids, last, i, "kl", [len(ids) - 1], []))
        per_req.append(rows)
    return per_req


# --------------------------------------------------------------------------------------------------------
# The forward of a chunk of rows: the only part in which the straightforward and the fast path differ.
# --------------------------------------------------------------------------------------------------------


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


#: ``forward(row_indices, vectors) -> _ChunkOutput``: run the rows ``row_indices`` (into the flat row list)
#: with ``vectors[k]`` (``(n, d_model)``, model dtype) added at the MLP output of row ``k``'s subject's last
#: token.
_ChunkForward = Callable[[Sequence[int], torch.Tensor], _ChunkOutput]


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
    model: nn.Module, sites: _Sites, rows: Sequence[_Row], pad: int, cfg: TargetConfig
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


def _chunk_loss(
    model: nn.Module,
    rows: Sequence[_Row],
    out: _ChunkOutput,
    chunk: Sequence[int],
    n_ctx: int,
    kl_init: list[torch.Tensor | None],
    kl_reverse: bool = True,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Each request's KL term and NLL (averaged over its contexts).

    The LM head runs only on the positions that predict a target token (NLL rows) or the next token (KL
    rows), ``(n_sel, vocab)``; every term is then taken with one gather per kind, so the backward writes
    the ``(n_sel, vocab)`` gradient once rather than once per row (a per-row slice would zero-fill it per
    row). ``kl_init[i]`` is set to request ``i``'s unedited log-distribution on first use.

    ``kl_reverse``: KL(p || p_0) (MEMIT's ``kl_div(init, cur)``); otherwise KL(p_0 || p).

    Returns ``({request: KL}, {request: NLL})`` (requests without a KL row have none), scalars on the
    logits' device.
    """
    sel_rows: list[int] = []
    sel_pos: list[int] = []
    for k, r in enumerate(rows):
        for p in r.target_pos:
            sel_rows.append(k)
            sel_pos.append(p - out.start[k])
    hdev = out.hidden.device
    logits = logits_from_hidden(
        model, out.hidden[torch.tensor(sel_rows, device=hdev), torch.tensor(sel_pos, device=hdev)]
    ).float()
    logp = torch.log_softmax(logits, -1)  # (n_sel, vocab)
    dev = logp.device
    slot = {i: j for j, i in enumerate(chunk)}
    nll_at: list[int] = []  # NLL rows: flat position, target token, weight, request slot
    nll_tok: list[int] = []
    nll_w: list[float] = []
    nll_slot: list[int] = []
    kl_at: list[int] = []
    kl_req: list[int] = []
    cursor = 0
    for r in rows:
        span = len(r.target_pos)
        if r.kind == "nll":
            nll_at.extend(range(cursor, cursor + span))
            nll_tok.extend(r.target_tok)
            nll_w.extend([1.0 / (span * n_ctx)] * span)
            nll_slot.extend([slot[r.req]] * span)
        else:
            kl_at.append(cursor)
            kl_req.append(r.req)
        cursor += span
    picked = logp[torch.tensor(nll_at, device=dev), torch.tensor(nll_tok, device=dev)]
    per_slot = logp.new_zeros(len(chunk)).index_add(
        0, torch.tensor(nll_slot, device=dev), -picked * torch.tensor(nll_w, device=dev, dtype=logp.dtype)
    )
    nll_sum = {i: per_slot[j] for j, i in enumerate(chunk)}
    kl_of: dict[int, torch.Tensor] = {}
    if kl_at:
        lp_kl = logp[torch.tensor(kl_at, device=dev)]  # (n_kl, vocab)
        for k, i in enumerate(kl_req):
            if kl_init[i] is None:
                kl_init[i] = lp_kl[k].detach()
        ref = torch.stack([kl_init[i] for i in kl_req]).to(dev)
        if kl_reverse:  # sum_v p (log p - log p_0)
            kl = F.kl_div(ref, lp_kl, log_target=True, reduction="none").sum(-1)
        else:  # sum_v p_0 (log p_0 - log p)
            kl = F.kl_div(lp_kl, ref, log_target=True, reduction="none").sum(-1)
        for k, i in enumerate(kl_req):
            kl_of[i] = kl_of[i] + kl[k] if i in kl_of else kl[k]
    return kl_of, nll_sum


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
        contexts: context templates (the first must be ``""``); ``config.n_contexts`` may use fewer.
    Returns:
        :class:`TargetResult` with ``z`` of shape ``(u, d_model)``; ``extra["fast"]`` says whether the
        prefix-cache path ran.
    """
    cfg = config or TargetConfig()
    t0 = time.perf_counter()
    arch = get_arch(model)
    sites = _Sites(
        inject=f"{arch.blocks}.{layer}.{arch.mlp_out}",
        read=f"{arch.blocks}.{layer}",
        final_norm=arch.final_norm,
        layer=layer,
    )
    # delta and h0 live on the input device; with a model spread over devices (device_map) the injection,
    # the block read and the LM head may each be on another one: tensors are moved where they are used
    device = input_device(model)
    pad = pad_id_of(tokenizer)
    u = len(requests)
    if not contexts or contexts[0] != "":
        raise ValueError('contexts must start with "" (the bare prompt)')
    if cfg.n_contexts >= 0:
        contexts = contexts[: 1 + cfg.n_contexts]
    per_req = _build_rows(
        tokenizer, requests, contexts, cfg.kl_prompt, kl_at_subject=cfg.kl_form == "reference"
    )
    rows_per_req = len(per_req[0])
    req_per_chunk = max(1, cfg.chunk_rows // rows_per_req)
    all_rows = [r for rows in per_req for r in rows]  # request i owns rows i*rows_per_req ... (i+1)*... - 1
    n_ctx = rows_per_req - 1

    d_model = _d_model(model)
    delta = torch.zeros(u, d_model, device=device, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    h0 = torch.zeros(u, d_model, device=device)
    kl_init: list[torch.Tensor | None] = [None] * u
    nll_init = torch.full((u,), float("nan"))
    nll_last = torch.full((u,), float("nan"))
    steps_taken = torch.zeros(u, dtype=torch.long)
    # Requests are chunked in order of their suffix length (tokens from the subject's last one on, the
    # same in every context), so that a chunk's rows pad to similar lengths: on CounterFact this raises
    # the share of real tokens among those computed from ~66% to ~95%. The order changes nothing else.
    suffix = [len(rows[0].ids) - rows[0].subject_last for rows in per_req]
    active = sorted(range(u), key=lambda i: suffix[i])

    with frozen_params(model):
        forward, info = _make_forward(model, sites, all_rows, pad, cfg)
        for step in range(cfg.steps + 1):
            if not active:
                break
            opt.zero_grad(set_to_none=False)
            still: list[int] = []
            for c0 in range(0, len(active), req_per_chunk):
                chunk = active[c0 : c0 + req_per_chunk]
                idx = [i * rows_per_req + j for i in chunk for j in range(rows_per_req)]
                rows = [all_rows[k] for k in idx]
                row_req = torch.tensor([r.req for r in rows], device=device)
                out = forward(idx, delta[row_req])  # cast to the injection's dtype and device there
                if step == 0:  # row 0 of each request is its bare prompt (contexts[0] == "")
                    for k in range(0, len(rows), rows_per_req):
                        h0[rows[k].req] = out.block[k, rows[k].subject_last - out.start[k]].float().to(device)
                # Gather the needed positions, then the LM head on those only.
                kl_of, nll_sum = _chunk_loss(
                    model, rows, out, chunk, n_ctx, kl_init, kl_reverse=cfg.kl_form == "reference"
                )
                loss = nll_sum[chunk[0]].new_zeros(())
                learning = False
                for i in chunk:
                    nll = float(nll_sum[i].detach())
                    nll_last[i] = nll
                    if step == 0:
                        nll_init[i] = nll
                    h2 = h0[i].pow(2).sum().clamp_min(1e-12)
                    if cfg.weight_decay_form == "norm":
                        wd = cfg.weight_decay * delta[i].norm() / h2
                    else:
                        wd = cfg.weight_decay * delta[i].pow(2).sum() / h2
                    total = nll_sum[i] + wd.to(loss.device)
                    if i in kl_of:
                        total = total + cfg.kl_factor * kl_of[i]
                    loss = loss + total
                    measure = nll if cfg.stop_on == "nll" else float(total.detach())
                    if measure >= cfg.stop_nll and step < cfg.steps:
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
            if step == 0 and cfg.init == "gradient":
                with torch.no_grad():  # to the clamp's length along -grad (the optimiser has not stepped)
                    g = delta.grad
                    length = cfg.init_scale * cfg.clamp_norm_factor * h0.norm(dim=1, keepdim=True)
                    delta.copy_(-g * length / g.norm(dim=1, keepdim=True).clamp_min(1e-30))
            else:
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
        del forward  # frees the prefix cache

    z = (h0 + delta.detach()).float()
    seconds = time.perf_counter() - t0
    log.debug(
        "targets: %d requests, %.2fs, mean steps %.1f, %s",
        u,
        seconds,
        steps_taken.float().mean(),
        info,
    )
    return TargetResult(
        z=z, h0=h0, nll_init=nll_init, nll_final=nll_last, steps=steps_taken, seconds=seconds, extra=info
    )
