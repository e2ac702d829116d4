"""Run the rlsedit benchmark suite and write a Markdown report (and its raw numbers as JSON).

    python benchmarks/run.py --out BENCHMARKS.md                 # the full suite (long; see below)
    python benchmarks/run.py --quick --out /tmp/BENCHMARKS.md    # everything shrunk: a minute or two
    python benchmarks/run.py --only update_vs_history,update_vs_resolve --out /tmp/linalg.md

Benchmarks (``--only`` takes a comma-separated list of these names):

* ``update_vs_history`` -- RLSEdit's update (``rls_step``) per batch of 100 against the number of edits
  already applied (100 batches, to 10,000 edits) at SmolLM2-135M dimensions, and a few batches at
  Llama-3-8B dimensions; synthetic keys.
* ``update_vs_resolve`` -- the same update against a full re-solve of the normal equations and against
  AlphaEdit's per-batch solve, at both dimensions.
* ``targets`` -- target optimisation per edit, fast vs straightforward path, against the FLOP floor.
* ``end_to_end`` -- seconds per edit (targets, keys, update) over a stream of batches, and peak RSS.
* ``stats`` -- second-moment statistics throughput vs a plain forward pass.
* ``scoring`` -- CounterFact scoring (rows sorted by length, the LM head only where a target token is
  predicted) vs plain batches in the caller's order.

The linear-algebra benchmarks need no model; the others load ``--model`` (SmolLM2-135M by default) once.
Timings are medians over repeats; ratios compare methods timed in turn within the same repeats. The
report starts with the machine's description (CPU, cores, torch and its threads, load average): compare
numbers only between reports of the same machine and settings. ``--threads N`` sets torch's intra-op
threads (default: torch's choice; ``OMP_NUM_THREADS`` also applies).

The raw numbers are written next to the report, with the suffix ``.json``; the report is rewritten after
each benchmark, so an interrupted run keeps what it measured. Linear-algebra sizes that need more memory
than is available are skipped (and said so) unless ``--ignore-memory``: at d_k=14336 they need about
15 GiB.

Duration of the full suite on a 2-core CPU: roughly an hour idle, two when the machine is busy;
``end_to_end`` (300 edits) is about half of it (``--e2e-batches 1`` cuts it to a third), the d_k=14336
AlphaEdit solves and drift check most of the rest. ``--quick`` takes a minute or two.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import bench_linalg
from benchlib import (
    Section,
    Table,
    fmt_bytes,
    fmt_ratio,
    fmt_seconds,
    machine_info,
    matmul_gflops,
    median,
)
from rlsedit.editors.rlsedit import RLSEditConfig

log = logging.getLogger("benchmarks")

BENCHMARKS = ("update_vs_history", "update_vs_resolve", "targets", "end_to_end", "stats", "scoring")
MODEL_BENCHMARKS = ("targets", "end_to_end", "stats", "scoring")

#: Targets stated in the task for the headline ratios.
HISTORY_TARGET = 1.2  # update@10,000 / update@first batch <= 1.2x
RESOLVE_TARGET = 10.0  # re-solve / RLSEdit >= 10x at d_k = 14336


@dataclass(frozen=True)
class Dims:
    """One problem size of the linear-algebra benchmarks."""

    label: str
    d_k: int
    d_v: int
    n_batches: int  # update_vs_history
    history_repeats: int
    resolve_repeats: int
    warmup_solves: bool = True  # an untimed re-solve / AlphaEdit solve before timing
    drift_repeats: int = 1


@dataclass(frozen=True)
class Scale:
    """Every size knob of the suite (:data:`FULL` and :data:`QUICK`)."""

    u: int
    dims: tuple[Dims, ...]
    target_requests: int
    target_templates: int
    target_repeats: int
    matmul_n: int
    matmul_repeats: int
    e2e_batch_size: int
    e2e_batches: int
    e2e_stats_samples: int | None  # None: the editor's default statistics (user cache, computed if absent)
    stats_samples: int
    stats_repeats: int
    scoring_cases: int = 200
    scoring_repeats: int = 3
    extra: dict[str, Any] = field(default_factory=dict)


FULL = Scale(
    u=100,
    dims=(
        Dims("SmolLM2-135M", 1536, 576, n_batches=100, history_repeats=5, resolve_repeats=5),
        Dims(
            "Llama-3-8B",
            14336,
            4096,
            n_batches=4,
            history_repeats=2,
            resolve_repeats=2,
            warmup_solves=False,
            drift_repeats=1,
        ),
    ),
    target_requests=10,
    target_templates=5,
    target_repeats=3,
    matmul_n=2048,
    matmul_repeats=5,
    e2e_batch_size=100,
    e2e_batches=3,
    e2e_stats_samples=None,
    stats_samples=256,
    stats_repeats=3,
)

QUICK = Scale(
    u=32,
    dims=(
        Dims("quick-small", 256, 96, n_batches=30, history_repeats=3, resolve_repeats=3),
        Dims("quick-large", 768, 256, n_batches=3, history_repeats=3, resolve_repeats=2),
    ),
    target_requests=2,
    target_templates=1,
    target_repeats=1,
    matmul_n=512,
    matmul_repeats=3,
    e2e_batch_size=5,
    e2e_batches=2,
    e2e_stats_samples=16,
    stats_samples=8,
    stats_repeats=1,
    scoring_cases=3,
    scoring_repeats=1,
)


@dataclass
class Context:
    """What the benchmarks share: the options, the scale, and the model once loaded."""

    args: argparse.Namespace
    scale: Scale
    dtype: torch.dtype
    _model: tuple[Any, Any] | None = None
    _gflops: float | None = None

    @property
    def device(self) -> str:
        return self.args.device

    def model(self) -> tuple[Any, Any]:
        """``(model, tokenizer)``, loaded on first use."""
        if self._model is None:
            from rlsedit.models.load import load_model

            log.info("loading %s on %s", self.args.model, self.device)
            self._model = load_model(self.args.model, device=self.device)
        return self._model

    def layers(self) -> list[int]:
        """The edited layers: ``--layers`` or the RLSEdit defaults for the model."""
        if self.args.layers:
            return [int(x) for x in self.args.layers.split(",")]
        from rlsedit.configs import model_defaults

        return list(model_defaults(self.model()[0], "rlsedit")["layers"])

    def target_steps(self) -> tuple[Any, Any]:
        """``(the model's RLSEdit target settings, the same with MEMIT's step rule)``, the second None
        where the model's step already is MEMIT's."""
        from rlsedit.configs import model_defaults
        from rlsedit.locate.targets import REFERENCE_STEP, TargetConfig

        config = TargetConfig(**model_defaults(self.model()[0], "rlsedit").get("targets", {}))
        reference = dataclasses.replace(config, **REFERENCE_STEP)
        return config, None if reference == config else reference

    def gflops(self) -> float:
        """The float32 matmul rate (GFLOP/s), measured once."""
        if self._gflops is None:
            s = self.scale
            self._gflops = matmul_gflops(s.matmul_n, s.matmul_repeats, torch.float32, self.device)
            log.info("float32 matmul %d^3: %.1f GFLOP/s", s.matmul_n, self._gflops)
        return self._gflops

    def command(self, only: str, out: str) -> str:
        """The command line that reproduces section ``only`` (into ``out``)."""
        a = self.args
        parts = ["python", "benchmarks/run.py"]
        if a.quick:
            parts.append("--quick")
        parts += ["--only", only]
        if a.device != "cpu":
            parts += ["--device", a.device]
        if a.threads:
            parts += ["--threads", str(a.threads)]
        if a.dtype != "float64" and only not in MODEL_BENCHMARKS:
            parts += ["--dtype", a.dtype]
        if only in MODEL_BENCHMARKS:
            if a.model != "smollm2-135m":
                parts += ["--model", a.model]
            if a.layers:
                parts += ["--layers", a.layers]
        if only == "end_to_end" and a.e2e_batches:
            parts += ["--e2e-batches", str(a.e2e_batches)]
        parts += ["--out", out]
        return shlex.join(parts)


# --------------------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------------------


#: Live (d_k, d_k) matrices at the peak of each linear-algebra benchmark (measured at d_k=1536), plus margin.
HISTORY_MATRICES = 7
RESOLVE_MATRICES = 11


def _available_bytes(device: str) -> int | None:
    """Memory available for new allocations on ``device`` (MemAvailable on the CPU), None if unknown."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    if dev.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _skip_for_memory(ctx: Context, sec: Section, dims: Dims, matrices: int) -> bool:
    """Whether to skip ``dims`` because it would need more memory than is available (a run that swaps or
    is killed helps no one, least of all other jobs on the machine); ``--ignore-memory`` never skips.
    A skipped size is reported in the section's summary and data."""
    item = torch.tensor([], dtype=ctx.dtype).element_size()
    need = (matrices * dims.d_k**2 + 6 * dims.d_k * dims.d_v) * item
    avail = _available_bytes(ctx.device)
    if ctx.args.ignore_memory or avail is None or need <= avail:
        return False
    msg = (
        f"{dims.label} (d_k={dims.d_k}): **skipped**, it needs about {fmt_bytes(need)} and "
        f"{fmt_bytes(avail)} is available on {ctx.device} (run with --ignore-memory to try anyway)"
    )
    log.warning(msg.replace("**", ""))
    sec.summary.append(msg)
    sec.data.setdefault("skipped", []).append({"label": dims.label, "need": need, "available": avail})
    return True


def _pick_rows(n: int) -> list[int]:
    """Batch indices (1-based) shown in the history table: the first few, then about every tenth."""
    keep = {1, 2, 3, n}
    keep.update(range(max(1, n // 10), n + 1, max(1, n // 10)))
    return sorted(k for k in keep if 1 <= k <= n)


def section_update_vs_history(ctx: Context) -> Section:
    """RLSEdit's update time per batch against the number of edits already applied."""
    s = ctx.scale
    sec = Section("update_vs_history", "RLSEdit update time vs number of edits already applied")
    sec.command = ctx.command(sec.name, f"benchmarks-{sec.name}.md")
    sec.data["runs"] = []
    summary_rows = []
    for dims in s.dims:
        if _skip_for_memory(ctx, sec, dims, HISTORY_MATRICES):
            continue
        r = bench_linalg.bench_update_vs_history(
            dims.d_k,
            dims.d_v,
            u=s.u,
            n_batches=dims.n_batches,
            repeats=dims.history_repeats,
            drift_repeats=dims.drift_repeats,
            dtype=ctx.dtype,
            device=ctx.device,
            seed=ctx.args.seed,
        )
        r["label"] = dims.label
        sec.data["runs"].append(r)
        by_batch = {row["batch"]: row for row in r["batches"]}
        table = Table(
            ["batch", "edits before", "edits after", "rls_step (median)", "vs batch 1", "A += K K^T"],
            caption=(
                f"{dims.label}: d_k={dims.d_k}, d_v={dims.d_v}, batches of {s.u}, {r['dtype']}, "
                f"median of {dims.history_repeats} per batch"
            ),
        )
        for b in _pick_rows(dims.n_batches):
            row = by_batch[b]
            table.rows.append(
                [
                    str(b),
                    f"{row['edits_before']:,}",
                    f"{row['edits_after']:,}",
                    fmt_seconds(row["update_s"]),
                    fmt_ratio(row["update_s"] / r["first_s"]),
                    fmt_seconds(row["a_update_s"]),
                ]
            )
        sec.tables.append(table)
        ok = r["ratio_last_first"] <= HISTORY_TARGET
        ok_w = r["ratio_window"] <= HISTORY_TARGET
        last_edits = r["batches"][-1]["edits_after"]
        summary_rows.append(
            [
                dims.label,
                f"{dims.d_k} / {dims.d_v}",
                f"{dims.n_batches} ({last_edits:,} edits)",
                fmt_seconds(r["first_s"]),
                fmt_seconds(r["last_s"]),
                fmt_ratio(r["ratio_last_first"]),
                f"{fmt_ratio(r['ratio_window'])} ({r['window']} batches each)",
                f"{'yes' if ok else 'NO'} / {'yes' if ok_w else 'NO'}",
            ]
        )
        sec.summary.append(
            f"{dims.label} (d_k={dims.d_k}): update at {last_edits:,} edits / first batch = "
            f"**{fmt_ratio(r['ratio_last_first'])}**; median of the last {r['window']} / first "
            f"{r['window']} batch(es) = **{fmt_ratio(r['ratio_window'])}** (target <= {HISTORY_TARGET}x: "
            f"{'met' if ok else 'NOT met'} / {'met' if ok_w else 'NOT met'})"
        )
    sec.tables.insert(
        0,
        Table(
            [
                "dimensions",
                "d_k / d_v",
                "batches",
                "batch 1",
                "last batch",
                "last / first",
                "last / first (windows)",
                f"<= {HISTORY_TARGET}x (point / windows)",
            ],
            summary_rows,
            caption="Summary",
        ),
    )
    drift_table = Table(
        [
            "dimensions",
            "rls_step (median)",
            "A += K K^T (median)",
            "exact drift check",
            "estimated drift (32 probes)",
            "check used / 10 batches",
        ],
        caption="The editor's bookkeeping outside rls_step (RLSEditor.solve / check_drift)",
    )
    for r in sec.data["runs"]:
        drift_table.rows.append(
            [
                r["label"],
                fmt_seconds(median_of(r["batches"], "update_s")),
                fmt_seconds(r["a_update_s"]),
                f"{fmt_seconds(r['drift_s'])} (drift {r['drift']:.1e})",
                f"{fmt_seconds(r['drift_estimate_s'])} (estimate {r['drift_estimate']:.1e})"
                if "drift_estimate_s" in r
                else "-",
                fmt_seconds(_drift_used_s(r) / max(1, r["drift_every"])),
            ]
        )
    sec.tables.append(drift_table)
    sec.notes += [
        "Synthetic keys: Sigma = diag(s) with s log-spaced in [1e-4, 1], keys K = diag(sqrt(s)) Z with Z "
        "standard normal, targets V = K^T W + E; lam = 1, mu = 31.6 (the SmolLM2 defaults). C_0 is "
        "stored dense and is dense after the first batch: dense kernels do the same work whatever the "
        "values, so the timings are those of real statistics.",
        "Timed: `rlsedit.linalg.rls_step(C, W, K, V, out=spare)` (next C and W), repeated from the same "
        "state, median kept; the state then advances and the old C becomes the spare (double buffering, as "
        "the RLSEdit editor does: no d_k x d_k matrix is allocated per batch). One untimed call precedes "
        "batch 1 (it also touches the spare's pages).",
        "'last / first' compares single batches; 'windows' compares the medians of the last and the first "
        "tenth of the batches, which a momentary change in the machine's load does not move.",
        "At Llama-3-8B dimensions only a few batches run: the cost of a batch depends on d_k, d_v and u, "
        "not on the number of edits behind C_t, which the SmolLM2-size run shows over 10,000 edits.",
        "The RLSEdit editor also accumulates A_t = A_{t-1} + K K^T (for drift checks and retraction; "
        "O(d_k^2 u) per batch, timed above, double-buffered like C) and every `drift_check_every` "
        "(default 10) batches computes "
        "||A_t C_t - I|| in float64: exactly (an O(d_k^3) product) up to d_k = 4096 "
        "(`drift_exact_max`), above that estimated from 32 random probes (`rlsedit.linalg.drift_estimate`, "
        "O(d_k^2) per probe); the last column amortises the check the editor uses over 10 batches. "
        "Neither grows with the history.",
    ]
    return sec


def _drift_used_s(run: dict[str, Any]) -> float:
    """Seconds of the drift check the editor uses at this run's ``d_k`` (exact up to its
    ``drift_exact_max``, the estimate above)."""
    if run["d_k"] <= RLSEditConfig.drift_exact_max or "drift_estimate_s" not in run:
        return run["drift_s"]
    return run["drift_estimate_s"]


def median_of(rows: list[dict[str, Any]], key: str) -> float:
    """Median of ``row[key]`` over ``rows``."""
    return median([row[key] for row in rows])


def section_update_vs_resolve(ctx: Context) -> Section:
    """RLSEdit's update against a full re-solve and against AlphaEdit's solve."""
    s = ctx.scale
    sec = Section("update_vs_resolve", "RLSEdit update vs full re-solve vs AlphaEdit solve (one batch)")
    sec.command = ctx.command(sec.name, f"benchmarks-{sec.name}.md")
    table = Table(
        [
            "dimensions",
            "d_k / d_v",
            "repeats",
            "RLSEdit",
            "re-solve",
            "AlphaEdit",
            "re-solve / RLSEdit",
            "AlphaEdit / RLSEdit",
            "W agreement",
        ],
        caption=f"One batch of {s.u} edits; median seconds; the three timed in turn in each repeat",
    )
    rate = Table(
        ["dimensions", "RLSEdit GFLOP", "re-solve GFLOP", "AlphaEdit GFLOP", "achieved GFLOP/s (R / S / A)"],
        caption="Approximate FLOPs (leading terms) and the rate each achieved",
    )
    sec.data["runs"] = []
    for dims in s.dims:
        if _skip_for_memory(ctx, sec, dims, RESOLVE_MATRICES):
            continue
        r = bench_linalg.bench_update_vs_resolve(
            dims.d_k,
            dims.d_v,
            u=s.u,
            repeats=dims.resolve_repeats,
            warmup_solves=dims.warmup_solves,
            dtype=ctx.dtype,
            device=ctx.device,
            seed=ctx.args.seed,
        )
        r["label"] = dims.label
        sec.data["runs"].append(r)
        sec_ = r["seconds"]
        table.rows.append(
            [
                dims.label,
                f"{dims.d_k} / {dims.d_v}",
                str(dims.resolve_repeats),
                fmt_seconds(sec_["rlsedit"]),
                fmt_seconds(sec_["resolve"]),
                fmt_seconds(sec_["alphaedit"]),
                f"**{fmt_ratio(r['ratios']['resolve/rlsedit'])}**",
                f"**{fmt_ratio(r['ratios']['alphaedit/rlsedit'])}**",
                f"{r['agreement']:.1e}",
            ]
        )
        g, gr = r["gflop"], r["gflops_rate"]
        rate.rows.append(
            [
                dims.label,
                _fmt_num(g["rlsedit"]),
                _fmt_num(g["resolve"]),
                _fmt_num(g["alphaedit"]),
                f"{gr['rlsedit']:.3g} / {gr['resolve']:.3g} / {gr['alphaedit']:.3g}",
            ]
        )
        sec.summary.append(
            f"{dims.label} (d_k={dims.d_k}): RLSEdit {fmt_seconds(sec_['rlsedit'])}, re-solve "
            f"{fmt_seconds(sec_['resolve'])} (**{fmt_ratio(r['ratios']['resolve/rlsedit'])}**), AlphaEdit "
            f"{fmt_seconds(sec_['alphaedit'])} (**{fmt_ratio(r['ratios']['alphaedit/rlsedit'])}**)"
        )
    if sec.data["runs"]:
        big = max(sec.data["runs"], key=lambda r: r["d_k"])
        ok = big["ratios"]["resolve/rlsedit"] >= RESOLVE_TARGET
        sec.summary.append(
            f"Target RLSEdit >= {RESOLVE_TARGET:g}x faster than the re-solve at d_k={big['d_k']}: "
            f"{'met' if ok else 'NOT met'} ({fmt_ratio(big['ratios']['resolve/rlsedit'])})"
            + ("" if big["d_k"] == 14336 else " (the target is stated for d_k=14336; this run is smaller)")
        )
    sec.tables += [table, rate]
    sec.notes += [
        "Same synthetic problem as update_vs_history; the timed batch comes after one earlier batch "
        f"(C_1, A_1 = A_0 + K_p K_p^T); all in {ctx.args.dtype}, as the editors compute.",
        "RLSEdit: `rls_step(C, W, K, V, out=buffer)`, O(d_k^2 u), C_t written into a preallocated matrix "
        "(the editor's double buffering).",
        "re-solve: A_t = A_{t-1} + K K^T (into a preallocated matrix too), then "
        "W_t = W_{t-1} + A_t^{-1} K (V - K^T W_{t-1}) by "
        "`solve_spd` (Cholesky of A_t, two triangular solves): the cheapest exact re-solve of the normal "
        "equations, O(d_k^3 / 3). It gives RLSEdit's W_t: 'W agreement' is "
        "||W_R - W_S|| / ||W_R - W_{t-1}||.",
        "AlphaEdit: `alphaedit_delta(P, K_p K_p^T, K, E, alpha)` with the projector P precomputed (dense "
        "null-space projector of Sigma, threshold 0.02), i.e. the LU solve of "
        "(P (K_p K_p^T + K K^T) + alpha I) X = P K E, plus the running sum K_p K_p^T += K K^T; "
        "O(2 d_k^3) for the product with P and O(2 d_k^3 / 3) for the LU.",
        "FLOP formulas: see `bench_linalg.flops_estimates`. At d_k=14336 the float64 matrices take 1.6 GiB "
        "each; this benchmark needs about 15 GiB at its peak (the re-solve's factorisation, with C_t, A_t, "
        "K_p K_p^T and P held for the others), update_vs_history about 9 GiB.",
    ]
    return sec


def _fmt_num(x: float) -> str:
    """Three significant figures below 1000, else a whole number with thousands separators."""
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def _requests(n: int) -> list[Any]:
    from rlsedit.datasets import load_counterfact

    cases = load_counterfact(split="tune", limit=n)
    if len(cases) < n:
        raise ValueError(f"the CounterFact tune split has only {len(cases)} cases; asked for {n}")
    return [c.request for c in cases]


def section_targets(ctx: Context) -> Section:
    """Target optimisation per edit: fast vs straightforward path, against the FLOP floor."""
    from bench_model import bench_targets
    from rlsedit.locate.templates import generate_context_templates

    s = ctx.scale
    model, tok = ctx.model()
    layer = ctx.layers()[-1]
    sec = Section("targets", "Target optimisation per edit: fast path vs straightforward path vs FLOP floor")
    sec.command = ctx.command(sec.name, f"benchmarks-{sec.name}.md")
    gflops = ctx.gflops()
    contexts = generate_context_templates(model, tok, n=s.target_templates, length=10, seed=0)
    reqs = _requests(s.target_requests)
    config, reference = ctx.target_steps()
    r = bench_targets(
        model,
        tok,
        reqs,
        layer,
        contexts,
        s.target_repeats,
        gflops,
        ctx.device,
        config=config,
        reference=reference,
    )
    sec.data = r
    table = Table(
        [
            "path",
            "seconds (median)",
            "per edit",
            "mean steps",
            "block tokens fwd / bwd",
            "GFLOP standard / tight",
            "floor standard / tight",
            "time / floor (standard / tight)",
        ],
        caption=(
            f"{ctx.args.model}: {r['n_requests']} CounterFact tune requests, {r['n_contexts']} contexts "
            f"(bare prompt + {r['n_contexts'] - 1} templates), layer {layer}, "
            "the model's RLSEdit target settings, "
            f"median of {s.target_repeats}; float32 matmul rate {gflops:.1f} GFLOP/s"
        ),
    )
    for name, p in r["paths"].items():
        t, f, fl = p["tokens"], p["flops"], p["floor_s"]
        table.rows.append(
            [
                {"reference": "fast, MEMIT's 25-step rule"}.get(name, name)
                + ("" if name == "full" or p["fast_path_ran"] else " (fell back to full)")
                + (" (layer skip off)" if name == "fast" and not p.get("skip_layers", True) else ""),
                fmt_seconds(p["seconds"]),
                fmt_seconds(p["per_edit_s"]),
                f"{p['mean_steps']:.1f}",
                f"{t['block_fwd']:,} / {t['block_bwd']:,}",
                f"{_fmt_num(f['standard'] / 1e9)} / {_fmt_num(f['tight'] / 1e9)}",
                f"{fmt_seconds(fl['standard'])} / {fmt_seconds(fl['tight'])}",
                f"{fmt_ratio(p['seconds'] / fl['standard'])} / {fmt_ratio(p['seconds'] / fl['tight'])}",
            ]
        )
    sec.tables.append(table)
    pc = r["params"]
    fast, full = r["paths"]["fast"], r["paths"]["full"]
    sec.summary += [
        f"fast path {fmt_seconds(fast['per_edit_s'])} per edit, straightforward path "
        f"{fmt_seconds(full['per_edit_s'])}: **{fmt_ratio(r['ratio_full_fast'])}** faster "
        f"(targets agree to {r['z_rel_diff']:.1e} relative); the layer skip's share: fast without it "
        f"{fmt_seconds(r['paths']['fast_no_skip']['per_edit_s'])} per edit "
        f"({fmt_ratio(r['ratio_no_skip_fast'])} of the fast path)",
        f"fast path: {fmt_ratio(fast['seconds'] / fast['floor_s']['standard'])} the standard FLOP floor, "
        f"{fmt_ratio(fast['seconds'] / fast['floor_s']['tight'])} the tight one",
    ]
    if "reference" in r["paths"]:
        ref = r["paths"]["reference"]
        sec.summary.insert(
            0,
            f"new default vs 25-step: {fmt_seconds(fast['per_edit_s'])} vs {fmt_seconds(ref['per_edit_s'])} "
            f"per edit (**{fmt_ratio(r['ratio_reference_fast'])}**; mean steps {fast['mean_steps']:.1f} vs "
            f"{ref['mean_steps']:.1f}, both on the fast path)",
        )
    sec.notes += [
        f"Parameters: blocks P = {pc['blocks']:,} ({pc['n_blocks']} blocks), blocks after layer {layer} "
        f"P_after = {pc['blocks_after_layer']:,}, LM head H = {pc['head']:,}.",
        "Tokens are counted by hooks while the targets are optimised (one run per path; the counts are the "
        "same in every run): T_fwd = token positions entering the first block (every forward, padding "
        "included, the fast path's one-off prefix and suffix forwards included; with the layer skip the "
        "blocks up to the edited one do not run for the suffix tokens at each step, so the forward FLOPs "
        "count each block's parameters times the positions it ran), T_bwd = positions back-propagated "
        "through the last block, h_fwd / h_bwd = positions through the LM head.",
        "standard FLOPs = 2 P T_fwd + 4 P T_bwd + 2 H h_fwd + 4 H h_bwd (the usual 6 x params x tokens "
        "for tokens that are also back-propagated); tight FLOPs = 2 P T_fwd + 2 P_after T_bwd + "
        "2 H (h_fwd + h_bwd) (frozen weights: activation gradients only, and only through the blocks "
        "after the edited layer). Attention-score FLOPs are neglected (sequences of a few dozen tokens: "
        "about 1% of the weight FLOPs).",
        f"floor = FLOPs / the float32 rate of a {s.matmul_n}x{s.matmul_n} torch.matmul on this machine "
        f"({gflops:.1f} GFLOP/s, median of {s.matmul_repeats}); the model's much smaller matmuls run "
        "slower than that, so the floor is optimistic.",
        "The paths (fast = prefix cache + layer skip, the default; fast_no_skip = prefix cache only; full = "
        "straightforward; where the model's step rule is not MEMIT's, also MEMIT's 25-step rule on the fast "
        "path) run in turn in each repeat, in alternating order, without an untimed warm-up; the first "
        "three take the same steps; target settings are the model's RLSEdit defaults.",
    ]
    return sec


def section_end_to_end(ctx: Context) -> Section:
    """Seconds per edit of a whole edit (targets, keys, update) and peak RSS over a stream of batches."""
    from bench_model import bench_end_to_end

    s = ctx.scale
    model, tok = ctx.model()
    layers = ctx.layers()
    sec = Section("end_to_end", "End to end: seconds per edit and peak memory over a stream of batches")
    sec.command = ctx.command(sec.name, f"benchmarks-{sec.name}.md")
    sigmas = None
    if s.e2e_stats_samples is not None:
        from rlsedit.models.arch import mlp_out_name
        from rlsedit.stats import second_moments

        names = {layer: mlp_out_name(model, layer) for layer in layers}
        sm = second_moments(
            model, tok, list(names.values()), samples=s.e2e_stats_samples, use_cache=False, progress=False
        )
        sigmas = {layer: sm[name] for layer, name in names.items()}
    n = s.e2e_batch_size * s.e2e_batches
    from rlsedit.locate.targets import REFERENCE_STEP

    r = bench_end_to_end(
        model,
        tok,
        _requests(n),
        s.e2e_batch_size,
        layers=layers if ctx.args.layers else None,
        sigmas=sigmas,
        static=True,
        reference=None if ctx.target_steps()[1] is None else dict(REFERENCE_STEP),
    )
    sec.data = r
    table = Table(
        ["batch", "requests", "targets / edit", "keys / edit", "update / edit", "total / edit", "total"],
        caption=(
            f"{ctx.args.model}, RLSEdit editor defaults, layers {r['layers']}, {r['n_requests']} CounterFact "
            f"tune requests in batches of {r['batch_size']}"
        ),
    )

    def batch_rows(batches: list[dict[str, Any]], prefix: str) -> None:
        for i, b in enumerate(batches, 1):
            pe = b["per_edit"]
            table.rows.append(
                [
                    f"{prefix}{i}",
                    str(b["n_requests"]),
                    *(fmt_seconds(pe[k]) for k in ("targets", "keys", "update", "total")),
                    fmt_seconds(b["timings"].get("total", float("nan"))),
                ]
            )

    batch_rows(r["batches"], "")
    m = r["per_edit_median"]
    table.rows.append(
        [
            "median",
            "",
            fmt_seconds(m["targets"]),
            fmt_seconds(m["keys"]),
            fmt_seconds(m["update"]),
            fmt_seconds(m["total"]),
            "",
        ]
    )
    ref = r.get("reference")
    if ref is not None:
        batch_rows(ref["batches"], "25-step ")
    st = r["static"]
    if st is not None:
        batch_rows(st["batches"], "static ")
    rss = r["rss"]
    mem = Table(
        ["model loaded", "editor built", "peak during the stream", "peak increase", "process lifetime peak"],
        [
            [
                fmt_bytes(rss["before_editor"]),
                fmt_bytes(rss["after_editor_setup"]),
                fmt_bytes(rss["stream_peak"]),
                fmt_bytes(rss["stream_peak"] - rss["stream_start"]),
                fmt_bytes(rss["lifetime_peak"]),
            ]
        ],
        caption="Resident memory (RSS)",
    )
    sec.tables += [table, mem]
    total = m["total"] or float("nan")
    sec.summary += [
        f"**{fmt_seconds(m['total'])} per edit** in batches of {r['batch_size']} (median over "
        f"{len(r['batches'])} batches): targets {fmt_seconds(m['targets'])} "
        f"({100 * m['targets'] / total:.0f}%), "
        f"keys {fmt_seconds(m['keys'])} ({100 * m['keys'] / total:.0f}%), "
        f"update {fmt_seconds(m['update'])} ({100 * m['update'] / total:.0f}%)",
        *(
            [
                f"static targets (read from a store optimised once on the unedited model): "
                f"{fmt_seconds(st['per_edit_median']['total'])} vs {fmt_seconds(m['total'])} per edit "
                f"(**{fmt_ratio(m['total'] / max(st['per_edit_median']['total'], 1e-12))}** faster), the "
                f"store's one-off cost {fmt_seconds(st['fill_s'] / max(1, r['n_requests']))} per edit"
            ]
            if st is not None
            else []
        ),
        *(
            [
                f"new default vs 25-step (MEMIT's target step), whole edits: "
                f"{fmt_seconds(m['total'])} vs {fmt_seconds(ref['per_edit_median']['total'])} per edit "
                f"(**{fmt_ratio(ref['per_edit_median']['total'] / max(m['total'], 1e-12))}**; targets "
                f"{fmt_seconds(m['targets'])} vs {fmt_seconds(ref['per_edit_median']['targets'])})"
            ]
            if ref is not None
            else []
        ),
        f"peak RSS during the stream {fmt_bytes(rss['stream_peak'])} "
        f"(+{fmt_bytes(rss['stream_peak'] - rss['stream_start'])} over its start)",
    ]
    sec.notes += [
        "Timings are the editor's own (`report.batches[i].timings`): targets = target optimisation at "
        "the last edited layer; keys = keys and hidden states of every edited layer; update = every "
        "layer's solve (`rls_step` and the bookkeeping) and writing the weights; total also includes "
        "recording K and V for retraction and the drift check of every 10th batch.",
        f"The editor (templates, statistics, C_0) is built before the stream, in {r['setup_s']:.1f} s, not "
        "counted: "
        + (
            "statistics from the user cache (computed there first if absent)."
            if s.e2e_stats_samples is None
            else f"statistics over {s.e2e_stats_samples} texts, computed beforehand (quick mode)."
        ),
        "RSS is sampled every 20 ms during the stream (psutil or /proc/self/statm); the lifetime peak "
        "(getrusage) includes the benchmarks that ran before in the same process.",
        "Where the model's target step is not MEMIT's, the same requests run again, after the default "
        "stream, with MEMIT's 25-step rule (`REFERENCE_STEP`: rows '25-step'), then with static targets.",
    ]
    return sec


def section_stats(ctx: Context) -> Section:
    """Second-moment statistics throughput vs a plain forward pass."""
    from bench_model import bench_stats

    s = ctx.scale
    model, tok = ctx.model()
    layers = ctx.layers()
    sec = Section("stats", "Second-moment statistics throughput vs a plain forward pass")
    sec.command = ctx.command(sec.name, f"benchmarks-{sec.name}.md")
    r = bench_stats(model, tok, layers, s.stats_samples, s.stats_repeats, device=ctx.device)
    sec.data = r
    labels = {
        "second_moments": f"second_moments (layers {layers})",
        "forward_full": "plain forward, whole model",
        "forward_to_last_layer": f"plain forward up to layer {layers[-1]}",
    }
    table = Table(
        ["pass", "seconds (median)", "tokens/s", "time vs whole forward"],
        caption=(
            f"{ctx.args.model}: the first {r['samples']} texts of the bundled corpus, {r['tokens']:,} tokens "
            f"(max_len {r['max_len']}, batches of {r['batch_size']}), median of {s.stats_repeats}"
        ),
    )
    for key, label in labels.items():
        table.rows.append(
            [
                label,
                fmt_seconds(r["seconds"][key]),
                f"{r['tokens_per_s'][key]:,.0f}",
                fmt_ratio(r["seconds"][key] / r["seconds"]["forward_full"]),
            ]
        )
    sec.tables.append(table)
    sec.summary += [
        f"second_moments: **{r['tokens_per_s']['second_moments']:,.0f} tokens/s**; plain whole-model "
        f"forward {r['tokens_per_s']['forward_full']:,.0f} tokens/s "
        f"(time ratio {fmt_ratio(r['ratios']['second_moments/forward_full'])}); forward up to the last "
        f"statistics layer {r['tokens_per_s']['forward_to_last_layer']:,.0f} tokens/s "
        f"(ratio {fmt_ratio(r['ratios']['second_moments/forward_to_last_layer'])})",
    ]
    sec.notes += [
        "`second_moments(..., use_cache=False, progress=False)`: float64 sums of k k^T for every edited "
        "layer's MLP output projection; its forward stops after the last of them.",
        "The plain forwards tokenise and batch the same texts the same way (no_grad, use_cache=False); "
        "'up to layer' stops after that layer's MLP output projection as second_moments does, so the "
        "difference to it is the cost of the statistics themselves.",
    ]
    return sec


def section_scoring(ctx: Context) -> Section:
    """CounterFact scoring: rows sorted by length, logits kept where needed, vs plain batches."""
    from bench_model import bench_scoring
    from rlsedit.datasets import load_counterfact

    s = ctx.scale
    model, tok = ctx.model()
    sec = Section("scoring", "CounterFact scoring: sorted batches with kept logits vs plain batches")
    sec.command = ctx.command(sec.name, f"benchmarks-{sec.name}.md")
    cases = load_counterfact(split="tune", limit=s.scoring_cases)
    r = bench_scoring(model, tok, cases, s.scoring_repeats, device=ctx.device)
    sec.data = r
    table = Table(
        ["path", "seconds (median)", "per case", "padded positions", "LM-head positions"],
        caption=(
            f"{ctx.args.model}: the first {r['cases']} CounterFact tune cases, {r['pairs']:,} (prompt, "
            f"target) pairs in batches of {r['batch_size']}, median of {s.scoring_repeats}"
        ),
    )
    labels = {"sorted": "sorted + kept logits (the library's)", "plain": "plain (caller's order, all logits)"}
    for name, label in labels.items():
        q = r["paths"][name]
        table.rows.append(
            [
                label,
                fmt_seconds(q["seconds"]),
                fmt_seconds(q["per_case_s"]),
                f"{q['positions']:,}",
                f"{q['head_positions']:,}",
            ]
        )
    sec.tables.append(table)
    agree = "every top-1 flag the same" if r["top1_agree"] else "top-1 flags DIFFER"
    sec.summary += [
        f"sorted {fmt_seconds(r['paths']['sorted']['per_case_s'])} per case, plain "
        f"{fmt_seconds(r['paths']['plain']['per_case_s'])}: **{fmt_ratio(r['ratio_plain_sorted'])}** faster "
        f"(NLLs agree to {r['max_nll_diff']:.1e}; {agree}; {r['win_flips']} of {r['pairs'] // 2} "
        "new-vs-true preferences flipped)",
    ]
    sec.notes += [
        "Both paths score the pairs of `score_counterfact` (prompt, paraphrases, neighbours, each with the "
        "new and the true object) and run in turn in each repeat, in alternating order, without warm-up.",
        "sorted: `rlsedit.eval.scoring.target_scores` - rows sorted by length before batching (less "
        "padding) and, where the model takes `logits_to_keep`"
        + (" (it does here)" if r["logits_to_keep"] else " (it does not here)")
        + ", the LM head only at the union of a batch's positions that predict a target token. plain: "
        "the same rows in the caller's order, every logit computed (`bench_model.plain_target_scores`).",
    ]
    return sec


SECTIONS: dict[str, Callable[[Context], Section]] = {
    "update_vs_history": section_update_vs_history,
    "update_vs_resolve": section_update_vs_resolve,
    "targets": section_targets,
    "end_to_end": section_end_to_end,
    "stats": section_stats,
    "scoring": section_scoring,
}


# --------------------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------------------


def render(
    sections: list[Section],
    info: dict[str, str],
    command: str,
    quick: bool,
    seconds: float,
    kept: Sequence[str] = (),
) -> str:
    """The whole Markdown report (``kept``: names of sections carried over from an earlier run by
    ``--update``)."""
    parts = [
        "# rlsedit benchmarks",
        "",
        f"Generated by `{command}` in {seconds:.0f} s"
        + (" (**quick mode**: tiny sizes, not representative)." if quick else "."),
        "",
    ]
    if kept:
        parts += [
            f"Sections {', '.join(kept)} were kept from an earlier run of the suite (`--update`); each "
            "section ends with when and at which revision it was measured. The machine table below "
            "describes this run's machine.",
            "",
        ]
    parts += [
        "Timings are medians over repeats; every ratio compares methods timed in turn within the same run. "
        "Each section gives the command that reproduces it alone.",
        "",
        "## Machine",
        "",
        Table(["", ""], [[k, v] for k, v in info.items()]).to_markdown(),
        "",
    ]
    if sections:
        parts += ["## Headlines", ""]
        for sec in sections:
            parts += [f"- {sec.name}: {line}" for line in sec.summary]
        parts.append("")
    for sec in sections:
        parts.append(sec.to_markdown())
    return "\n".join(parts)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="Markdown report to write (raw numbers: same name, .json)")
    p.add_argument("--quick", action="store_true", help="shrink everything (sizes, repeats, requests)")
    p.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    p.add_argument("--device", default="cpu", help="torch device for the benchmarks (default cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    p.add_argument(
        "--dtype",
        default="float64",
        choices=("float64", "float32"),
        help="dtype of the linear-algebra benchmarks (the editors' default is float64)",
    )
    p.add_argument("--model", default="smollm2-135m", help="model of the model benchmarks")
    p.add_argument("--layers", default="", help="edited layers, e.g. 3,4,5,6,7 (default: the model's)")
    p.add_argument(
        "--e2e-batches",
        type=int,
        default=0,
        help="end_to_end: number of batches in the stream (default: 3 of 100, or 2 of 5 with --quick)",
    )
    p.add_argument(
        "--ignore-memory",
        action="store_true",
        help="run the linear-algebra sizes even where they need more memory than is available",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic problems")
    p.add_argument(
        "--update",
        action="store_true",
        help="keep the sections of --out's JSON that this run does not measure (each says when it ran)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    args.names = [n for n in BENCHMARKS if n in names]
    if args.threads < 0 or args.e2e_batches < 0:
        p.error("--threads and --e2e-batches must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks, write the report and its JSON, print the headlines."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", "benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)])
    scale = QUICK if args.quick else FULL
    if args.e2e_batches:
        scale = dataclasses.replace(scale, e2e_batches=args.e2e_batches)
    ctx = Context(args, scale, getattr(torch, args.dtype))
    info = machine_info(args.device)
    # the machine's speed on the day (it varies ~2x from day to day): figures of different runs compare
    # only through this probe
    info[f"float32 matmul {scale.matmul_n}^3 (GFLOP/s, median of {scale.matmul_repeats})"] = (
        f"{ctx.gflops():.1f}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sections: list[Section] = []
    kept: dict[str, Section] = {}
    if args.update and out.with_suffix(".json").exists():
        old = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
        kept = {
            d["name"]: Section.from_dict(d) for d in old.get("sections", []) if d["name"] not in args.names
        }
        if any(not sec.tables for sec in kept.values()):
            raise SystemExit(
                f"{out.with_suffix('.json')} predates --update (no tables kept): rerun those sections"
            )
    for name in args.names:
        log.info("benchmark %s ...", name)
        t1 = time.perf_counter()
        measured = {
            "measured": info["date (UTC)"]
            if not sections
            else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            "at revision": info.get("git revision", "?"),
            "load average": " / ".join(f"{x:.2f}" for x in os.getloadavg())
            if hasattr(os, "getloadavg")
            else "?",
        }
        sec = SECTIONS[name](ctx)
        sec.seconds = time.perf_counter() - t1
        sec.measured = measured
        sections.append(sec)
        shown = sorted([*kept.values(), *sections], key=lambda x: BENCHMARKS.index(x.name))
        log.info("benchmark %s done in %.1f s", name, sec.seconds)
        # write what there is after each benchmark, so a long run that is interrupted keeps its results
        total = time.perf_counter() - t0
        out.write_text(render(shown, info, command, args.quick, total, kept=list(kept)), encoding="utf-8")
        payload = {
            "command": command,
            "quick": args.quick,
            "machine": info,
            "seconds": total,
            "sections": [s.to_dict() for s in shown],
        }
        out.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")
    print(f"wrote {out} and {out.with_suffix('.json')} in {time.perf_counter() - t0:.1f} s")
    for sec in sections:
        for line in sec.summary:
            print(f"{sec.name}: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
