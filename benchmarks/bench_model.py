"""Benchmarks on a real model: target optimisation, a whole edit, and the second-moment statistics.

* :func:`bench_targets` -- :func:`rlsedit.locate.targets.compute_targets`, fast (prefix-cached) path vs the
  straightforward path, against the floor set by the FLOPs of the tokens each actually runs.
* :func:`bench_end_to_end` -- seconds per edit of ``editor.edit`` (targets / keys / update) over a stream of
  batches, and the peak resident memory.
* :func:`bench_stats` -- :func:`rlsedit.stats.second_moments` throughput vs plain forward passes over the
  same texts.
* :func:`bench_scoring` -- CounterFact scoring (:func:`rlsedit.eval.scoring.target_scores`: rows sorted by
  length, the LM head only where a target token is predicted) vs plain batches in the caller's order.

Each function takes a loaded ``(model, tokenizer)`` and leaves the model's weights as it found them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from benchlib import RssSampler, max_rss_bytes, median, rss_bytes, timed
from rlsedit.editors import make_editor
from rlsedit.eval.scoring import pair_rows
from rlsedit.hooks import trace
from rlsedit.locate.targets import TargetConfig, compute_targets
from rlsedit.locate.tokens import pad_id_of, pad_rows
from rlsedit.models.arch import get_arch, get_module, input_device, mlp_out_name, weight_kv
from rlsedit.requests import EditRequest
from rlsedit.stats import corpus_texts, second_moments

__all__ = [
    "TokenCounts",
    "bench_end_to_end",
    "bench_scoring",
    "bench_stats",
    "bench_targets",
    "count_tokens",
    "param_counts",
]

log = logging.getLogger("benchmarks.model")


# --------------------------------------------------------------------------------------------------------
# FLOP accounting for target optimisation
# --------------------------------------------------------------------------------------------------------


@dataclass
class TokenCounts:
    """Token positions (padding included: it is computed too) that went through the model.

    Attributes:
        block_fwd: positions into the first block, forward (every forward, with or without grad).
        block_param_tokens: sum over blocks of (block parameters x positions run through it), forward:
            counts blocks that were skipped (the fast path's layer skip) as not run.
        block_bwd: positions back-propagated through the blocks (counted at the last block's output).
        head_fwd / head_bwd: positions through the LM head, forward / backward.
    """

    block_fwd: int = 0
    block_param_tokens: int = 0
    block_bwd: int = 0
    head_fwd: int = 0
    head_bwd: int = 0


def _main(value: object) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _positions(x: torch.Tensor) -> int:
    """Number of token positions in a ``(..., d)`` activation."""
    return int(x.numel() // x.shape[-1])


@contextlib.contextmanager
def count_tokens(model: nn.Module) -> Iterator[TokenCounts]:
    """Count the token positions run through the blocks and the LM head, forward and backward, while the
    block runs (hooks on the first and last block and on the LM head)."""
    arch = get_arch(model)
    blocks = get_module(model, arch.blocks)
    head = get_module(model, arch.lm_head)
    counts = TokenCounts()

    def block_counter(index: int, n_params: int):
        def on_forward(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = _main(args) if args else kwargs.get("hidden_states")
            if isinstance(x, torch.Tensor):
                counts.block_param_tokens += n_params * _positions(x)
                if index == 0:
                    counts.block_fwd += _positions(x)

        return on_forward

    def backward_counter(field: str):
        def on_grad(grad: torch.Tensor) -> None:
            setattr(counts, field, getattr(counts, field) + _positions(grad))

        return on_grad

    def last_block(_module: nn.Module, _args: tuple, output: object) -> None:
        y = _main(output)
        if y is not None and y.requires_grad:
            y.register_hook(backward_counter("block_bwd"))

    def head_fwd(_module: nn.Module, args: tuple, output: object) -> None:
        x = _main(args)
        if x is not None:
            counts.head_fwd += _positions(x)
        y = _main(output)
        if y is not None and y.requires_grad:
            y.register_hook(backward_counter("head_bwd"))

    handles = [
        b.register_forward_pre_hook(
            block_counter(i, sum(p.numel() for p in b.parameters())), with_kwargs=True
        )
        for i, b in enumerate(blocks)
    ]
    handles += [
        blocks[len(blocks) - 1].register_forward_hook(last_block),
        head.register_forward_hook(head_fwd),
    ]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def param_counts(model: nn.Module, layer: int) -> dict[str, int]:
    """Parameters used per token: all blocks, the blocks after ``layer`` (the only ones a target's gradient
    goes through), and the LM head (``d_model x vocab``)."""
    arch = get_arch(model)
    blocks = get_module(model, arch.blocks)
    head = get_module(model, arch.lm_head)
    return {
        "blocks": sum(p.numel() for p in blocks.parameters()),
        "blocks_after_layer": sum(p.numel() for b in list(blocks)[layer + 1 :] for p in b.parameters()),
        "head": int(head.weight.numel()),
        "n_blocks": len(blocks),
    }


def target_flops(params: dict[str, int], counts: TokenCounts) -> dict[str, float]:
    """FLOPs of a target optimisation from the tokens it ran (attention scores neglected).

    ``2 P T_fwd`` below is ``2 sum_b P_b T_b`` (each block's parameters times the positions it ran), which
    equals it when every block runs every position (not so with the fast path's layer skip).

    * ``standard`` = ``2 P T_fwd + 4 P T_bwd + 2 H h_fwd + 4 H h_bwd``: the usual "6 x params x tokens"
      (forward 2, backward 4 per parameter and token) for tokens that are also back-propagated, with
      ``P`` the block parameters, ``H`` the LM head's.
    * ``tight`` = ``2 P T_fwd + 2 P_after T_bwd + 2 H (h_fwd + h_bwd)``: the weights are frozen, so the
      backward needs only activation gradients (2 per parameter and token), and only through the blocks
      after the edited layer (``P_after``), where the delta enters.
    """
    P, Pa, H = params["blocks"], params["blocks_after_layer"], params["head"]
    c = counts
    fwd = 2.0 * c.block_param_tokens  # = 2 P T_fwd when every block runs every position
    standard = fwd + 4.0 * P * c.block_bwd + 2.0 * H * c.head_fwd + 4.0 * H * c.head_bwd
    tight = fwd + 2.0 * Pa * c.block_bwd + 2.0 * H * (c.head_fwd + c.head_bwd)
    return {"standard": standard, "tight": tight}


def bench_targets(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    layer: int,
    contexts: Sequence[str],
    repeats: int,
    gflops: float,
    device: str = "cpu",
    config: TargetConfig | None = None,
    warmup: bool = False,
    reference: TargetConfig | None = None,
) -> dict[str, Any]:
    """Time ``compute_targets`` on ``requests`` with the fast (prefix-cached) and the straightforward path
    and compare with the FLOP floor; with ``reference`` (another step rule, e.g. MEMIT's 25 steps), also
    that rule on the fast path (path ``reference``), in turn with the others.

    The two paths run in turn within each repeat, in alternating order (fast first in odd repeats); the
    token counts (identical in every run) are taken during the first repeat, by hooks of negligible cost.

    Args:
        layer: the block whose MLP output gets the delta (the last edited layer).
        contexts: context templates, ``""`` first.
        gflops: the machine's measured matmul rate (GFLOP/s) that sets the floor.
        config: target settings (default ``TargetConfig()``); ``fast`` is set per path.
        warmup: run each path once, untimed, first.

    Returns:
        ``{"n_requests", "n_contexts", "layer", "params", "gflops", "paths": {"fast"|"full": {"seconds",
        "samples", "per_edit_s", "tokens", "flops", "floor_s", "mean_steps", "nll_final", "fast_path_ran",
        "prefix_seconds", "skip_layers"}}, "ratio_full_fast", "ratio_no_skip_fast", "z_rel_diff",
        "z_rel_diff_no_skip"}`` (paths: ``fast`` with the layer skip, ``fast_no_skip``, ``full``, and with
        ``reference`` the path ``reference`` and ``ratio_reference_fast``).
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    base = config or TargetConfig()
    params = param_counts(model, layer)
    paths = {
        "fast": dataclasses.replace(base, fast=True, skip_layers=True),
        "fast_no_skip": dataclasses.replace(base, fast=True, skip_layers=False),
        "full": dataclasses.replace(base, fast=False),
    }
    if reference is not None:
        paths["reference"] = dataclasses.replace(reference, fast=True, skip_layers=True)
    samples: dict[str, list[float]] = {p: [] for p in paths}
    counts: dict[str, TokenCounts] = {}
    results = {}
    if warmup:
        for cfg in paths.values():
            compute_targets(model, tokenizer, requests, layer, contexts, cfg)
    for r in range(repeats):
        order = list(paths) if r % 2 == 0 else list(reversed(paths))
        for name in order:
            cfg = paths[name]
            with count_tokens(model) if r == 0 else contextlib.nullcontext(TokenCounts()) as c:
                seconds, results[name] = timed(
                    lambda cfg=cfg: compute_targets(model, tokenizer, requests, layer, contexts, cfg), device
                )
            if r == 0:
                counts[name] = c
            samples[name].append(seconds)
            log.info("targets: repeat %d/%d %s path %.2f s", r + 1, repeats, name, seconds)
    n = len(requests)
    out: dict[str, Any] = {
        "n_requests": n,
        "n_contexts": len(contexts),
        "layer": layer,
        "params": params,
        "gflops": gflops,
        "paths": {},
    }
    for name in paths:
        flops = target_flops(params, counts[name])
        res = results[name]
        out["paths"][name] = {
            "seconds": median(samples[name]),
            "samples": samples[name],
            "per_edit_s": median(samples[name]) / n,
            "tokens": vars(counts[name]),
            "flops": flops,
            "floor_s": {k: v / (gflops * 1e9) for k, v in flops.items()},
            "mean_steps": float(res.steps.float().mean()),
            "nll_final": float(res.nll_final.mean()),
            "fast_path_ran": bool(res.extra.get("fast", False)),
            "prefix_seconds": res.extra.get("prefix_seconds"),
            "skip_layers": bool(res.extra.get("skip_layers", False)),
        }
    out["ratio_full_fast"] = out["paths"]["full"]["seconds"] / out["paths"]["fast"]["seconds"]
    out["ratio_no_skip_fast"] = out["paths"]["fast_no_skip"]["seconds"] / out["paths"]["fast"]["seconds"]
    if reference is not None:
        out["ratio_reference_fast"] = out["paths"]["reference"]["seconds"] / out["paths"]["fast"]["seconds"]
    zs = results["full"].z
    out["z_rel_diff"] = float((results["fast"].z - zs).norm() / zs.norm().clamp_min(1e-30))
    out["z_rel_diff_no_skip"] = float((results["fast_no_skip"].z - zs).norm() / zs.norm().clamp_min(1e-30))
    return out


# --------------------------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------------------------


def _edit_then_restore(editor: Any, requests: Sequence[EditRequest], batch_size: int) -> Any:
    """``editor.edit(requests)``'s report; the edited weights are put back to W_0 afterwards."""
    try:
        return editor.edit(list(requests), batch_size=batch_size)
    finally:
        with torch.no_grad():
            for layer, name in editor.modules.items():
                weight_kv(get_module(editor.model, name)).copy_(editor.W0[layer])


def bench_end_to_end(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    batch_size: int,
    layers: Sequence[int] | None = None,
    sigmas: dict[int, torch.Tensor] | None = None,
    stats_dir: str | None = None,
    static: bool = False,
    reference: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Apply ``requests`` with the RLSEdit editor in batches of ``batch_size``; report the editor's own
    per-batch timings (targets, keys, update, total) per edit and the peak RSS over the stream.

    ``reference``: editor options of another target step (e.g. MEMIT's 25 steps,
    :data:`rlsedit.locate.targets.REFERENCE_STEP`): then, side by side, the same stream with them
    (``reference`` in the result: its batches and per-edit medians).

    ``static``: then, side by side, the same stream with static targets (each request's target optimised
    once on the unedited model into a :class:`rlsedit.locate.provider.StaticTargetStore`, not timed per
    edit: its one-off cost is ``static["fill_s"]``), read by a fresh editor; ``static`` holds its batches
    and per-edit medians like the dynamic stream's.

    The editor is built (templates, statistics, ``C_0``) outside the timed stream; ``sigmas`` (``{layer:
    Sigma}``) skips the statistics, else they come from ``stats_dir`` / the user cache (computed once if
    absent). The edited weights are restored afterwards.

    Returns:
        ``{"n_requests", "batch_size", "layers", "setup_s", "batches": [{"n_requests", "timings",
        "per_edit"}], "per_edit_median": {key: seconds}, "rss": {...}}``.
    """
    overrides: dict[str, Any] = {} if layers is None else {"layers": list(layers)}
    rss_before = rss_bytes()
    setup_s, editor = timed(
        lambda: make_editor("rlsedit", model, tokenizer, sigmas=sigmas, stats_dir=stats_dir, **overrides)
    )
    rss_editor = rss_bytes()
    with RssSampler() as sampler:
        report = _edit_then_restore(editor, requests, batch_size)
    keys = ("targets", "keys", "update", "save", "total")

    def per_batch(rep: Any) -> list[dict[str, Any]]:
        out = []
        for b in rep.batches:
            n = max(1, b.n_requests)
            out.append(
                {
                    "n_requests": b.n_requests,
                    "timings": dict(b.timings),
                    "per_edit": {k: b.timings.get(k, 0.0) / n for k in keys},
                    "target_nll_final": b.target_nll_final,
                }
            )
        return out

    batches = per_batch(report)
    reference_result = None
    if reference is not None:
        ref_editor = make_editor(
            "rlsedit", model, tokenizer, sigmas=sigmas, stats_dir=stats_dir, **overrides, **reference
        )
        rb = per_batch(_edit_then_restore(ref_editor, requests, batch_size))
        reference_result = {
            "overrides": dict(reference),
            "batches": rb,
            "per_edit_median": {k: median([b["per_edit"][k] for b in rb]) for k in keys},
        }
    static_result = None
    if static:
        import tempfile

        from rlsedit.locate.provider import (
            StaticTargetStore,
            TargetProvider,
            fill_static_targets,
            store_meta,
        )

        last = editor.config.layers[-1]
        meta = store_meta(model, "benchmark", editor.target_settings())
        with tempfile.TemporaryDirectory() as d:
            store = StaticTargetStore.create(d, meta)
            fill_s, _ = timed(
                lambda: fill_static_targets(
                    store,
                    model,
                    tokenizer,
                    list(requests),
                    range(len(requests)),
                    last,
                    editor.templates,
                    editor.config.targets,
                    batch_size,
                    progress=False,
                )
            )
            static_editor = make_editor(
                "rlsedit", model, tokenizer, sigmas=sigmas, stats_dir=stats_dir, **overrides
            )
            static_editor.use_targets(TargetProvider(static=store))
            static_report = _edit_then_restore(static_editor, requests, batch_size)
        sb = per_batch(static_report)
        static_result = {
            "fill_s": fill_s,
            "batches": sb,
            "per_edit_median": {k: median([b["per_edit"][k] for b in sb]) for k in keys},
        }
    return {
        "n_requests": len(requests),
        "batch_size": batch_size,
        "layers": list(editor.config.layers),
        "setup_s": setup_s,
        "batches": batches,
        "per_edit_median": {k: median([b["per_edit"][k] for b in batches]) for k in keys},
        "rss": {
            "before_editor": rss_before,
            "after_editor_setup": rss_editor,
            "stream_start": sampler.start,
            "stream_peak": sampler.peak,
            "lifetime_peak": max_rss_bytes(),
        },
        "static": static_result,
        "reference": reference_result,
    }


# --------------------------------------------------------------------------------------------------------
# second-moment statistics
# --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def _plain_forward(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], max_len: int, batch_size: int, stop_at: str | None
) -> int:
    """Forward ``texts`` as ``second_moments`` batches them; ``stop_at``: end each forward after that module.
    Returns the number of non-padding tokens."""
    device = input_device(model)
    tokens = 0
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_len)
        inputs = {
            "input_ids": enc["input_ids"].to(device),
            "attention_mask": enc["attention_mask"].to(device),
            "use_cache": False,
        }
        if stop_at is None:
            model(**inputs)
        else:
            with trace(model, [stop_at], capture_output=False, stop=True):
                model(**inputs)
        tokens += int(enc["attention_mask"].sum())
    return tokens


def bench_stats(
    model: nn.Module,
    tokenizer: Any,
    layers: Sequence[int],
    samples: int,
    repeats: int,
    max_len: int = 128,
    batch_size: int = 8,
    device: str = "cpu",
) -> dict[str, Any]:
    """Throughput (tokens/s) of ``second_moments`` for the MLP output projections of ``layers`` vs a plain
    forward over the same texts (the first ``samples`` of the bundled corpus, same batching and
    truncation): the whole model, and the model up to the last of ``layers`` (where ``second_moments``
    stops). The three run in turn within each repeat, after one untimed warm-up each.

    Returns:
        ``{"samples", "tokens", "modules", "seconds": {...}, "samples_s": {...}, "tokens_per_s": {...},
        "ratios": {...}}``.
    """
    texts = corpus_texts(None)[0][:samples]
    names = [mlp_out_name(model, layer) for layer in layers]
    runs = {
        "second_moments": lambda: second_moments(
            model,
            tokenizer,
            names,
            samples=samples,
            max_len=max_len,
            batch_size=batch_size,
            use_cache=False,
            progress=False,
        ),
        "forward_full": lambda: _plain_forward(model, tokenizer, texts, max_len, batch_size, None),
        "forward_to_last_layer": lambda: _plain_forward(
            model, tokenizer, texts, max_len, batch_size, names[-1]
        ),
    }
    tokens = runs["forward_full"]()  # warm-up and the token count
    runs["second_moments"]()
    runs["forward_to_last_layer"]()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(repeats):
        for name, fn in runs.items():
            seconds, _ = timed(fn, device)
            times[name].append(seconds)
            log.info("stats: repeat %d/%d %s %.2f s", r + 1, repeats, name, seconds)
    seconds = {k: median(v) for k, v in times.items()}
    tps = {k: tokens / v for k, v in seconds.items()}
    return {
        "samples": samples,
        "max_len": max_len,
        "batch_size": batch_size,
        "tokens": tokens,
        "modules": names,
        "seconds": seconds,
        "samples_s": times,
        "tokens_per_s": tps,
        "ratios": {
            "second_moments/forward_full": seconds["second_moments"] / seconds["forward_full"],
            "second_moments/forward_to_last_layer": seconds["second_moments"]
            / seconds["forward_to_last_layer"],
        },
    }


# --------------------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def plain_target_scores(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """The straightforward scoring the library's replaces: pairs in the caller's order, right-padded in
    batches of ``batch_size``, every logit of every position computed.

    Returns ``(nll (n,), top1 (n,), {"positions": padded positions run, "head_positions": positions
    through the LM head})``, NLL and top-1 as :func:`rlsedit.eval.scoring.target_scores`.
    """
    device = input_device(model)
    pad = pad_id_of(tokenizer)
    rows, spans = pair_rows(tokenizer, prompts, targets)
    nll, top1 = torch.empty(len(rows)), torch.zeros(len(rows), dtype=torch.bool)
    positions = 0
    for s in range(0, len(rows), batch_size):
        ids, mask = pad_rows(rows[s : s + batch_size], pad)
        positions += ids.numel()
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        for k, (start, t_ids) in enumerate(spans[s : s + batch_size]):
            logp = torch.log_softmax(logits[k, start - 1 : start - 1 + len(t_ids)].float(), -1)
            tok = torch.tensor(t_ids, device=logp.device)
            nll[s + k] = -logp[torch.arange(len(t_ids)), tok].mean().cpu()
            top1[s + k] = bool((logp.argmax(-1) == tok).all())
    return nll, top1, {"positions": positions, "head_positions": positions}


def _sorted_positions(
    tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], batch_size: int
) -> dict[str, int]:
    """Padded positions and LM-head positions of the library's scoring (rows sorted by length; the head
    only at the union of a batch's target-predicting positions), counted without running the model."""
    ids, spans = pair_rows(tokenizer, prompts, targets)
    rows = sorted((len(r), p_len) for r, (p_len, _) in zip(ids, spans, strict=True))
    positions = head = 0
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        positions += len(chunk) * max(n for n, _ in chunk)
        head += len(chunk) * len({j for n, p_len in chunk for j in range(p_len - 1, n - 1)})
    return {"positions": positions, "head_positions": head}


def bench_scoring(
    model: nn.Module, tokenizer: Any, cases: Sequence[Any], repeats: int, device: str = "cpu"
) -> dict[str, Any]:
    """Time CounterFact scoring of ``cases``: the library's :func:`target_scores` ("sorted") against
    :func:`plain_target_scores` ("plain"), in turn within each repeat (alternating which goes first), on
    the same (prompt, target) pairs as :func:`rlsedit.eval.counterfact.score_counterfact`.

    Returns:
        ``{"cases", "pairs", "batch_size", "logits_to_keep", "paths": {"sorted"|"plain": {"seconds",
        "samples", "per_case_s", "positions", "head_positions"}}, "ratio_plain_sorted", "max_nll_diff",
        "top1_agree", "win_flips"}``: ``win_flips`` counts pairs of (new, true) whose preference differs.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    from rlsedit.eval.counterfact import counterfact_pairs
    from rlsedit.eval.scoring import _keeps_logits, target_scores

    prompts, targets, _ = counterfact_pairs(cases)
    batch_size = 32
    paths = {
        "sorted": lambda: target_scores(model, tokenizer, prompts, targets, batch_size),
        "plain": lambda: plain_target_scores(model, tokenizer, prompts, targets, batch_size),
    }
    samples: dict[str, list[float]] = {p: [] for p in paths}
    results: dict[str, Any] = {}
    for r in range(repeats):
        for name in list(paths) if r % 2 == 0 else list(reversed(paths)):
            seconds, results[name] = timed(paths[name], device)
            samples[name].append(seconds)
            log.info("scoring: repeat %d/%d %s %.2f s", r + 1, repeats, name, seconds)
    keeps = _keeps_logits(model)
    counts = {
        "sorted": _sorted_positions(tokenizer, prompts, targets, batch_size),
        "plain": results["plain"][2],
    }
    if not keeps:  # every logit is computed on both paths
        counts["sorted"]["head_positions"] = counts["sorted"]["positions"]
    out: dict[str, Any] = {
        "cases": len(cases),
        "pairs": len(prompts),
        "batch_size": batch_size,
        "logits_to_keep": keeps,
        "paths": {
            name: {
                "seconds": median(samples[name]),
                "samples": samples[name],
                "per_case_s": median(samples[name]) / len(cases),
                **counts[name],
            }
            for name in paths
        },
    }
    out["ratio_plain_sorted"] = out["paths"]["plain"]["seconds"] / out["paths"]["sorted"]["seconds"]
    (nll_s, top_s), (nll_p, top_p, _) = results["sorted"], results["plain"]
    out["max_nll_diff"] = float((nll_s - nll_p).abs().max())
    out["top1_agree"] = bool((top_s == top_p).all())
    out["win_flips"] = int(((nll_s[0::2] < nll_s[1::2]) != (nll_p[0::2] < nll_p[1::2])).sum())
    return out
