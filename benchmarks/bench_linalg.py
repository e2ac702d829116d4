"""Linear-algebra benchmarks on synthetic keys (no model): the cost of one RLSEdit update.

* :func:`bench_update_vs_history` -- :func:`rlsedit.linalg.rls_step` per batch against the number of edits
  already applied: the cost must not grow with the history.
* :func:`bench_update_vs_resolve` -- the same update against a full re-solve of the normal equations
  (Cholesky of ``A_t``, then a solve) and against AlphaEdit's per-batch solve.

The synthetic problem (:class:`SyntheticProblem`) has a diagonal key second moment ``Sigma``, so that
``C_0 = (lam^2 I + mu^2 Sigma)^{-1}`` and AlphaEdit's null-space projector are known without an
``O(d_k^3)`` set-up; every matrix is nevertheless stored and multiplied dense, so the timed operations do
exactly the work they do on a real model's statistics (dense kernels do not look at the values), and
``C_t`` is dense after the first batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from benchlib import median, sync, timed
from rlsedit.linalg import alphaedit_delta, drift, drift_estimate, rls_step, solve_spd

__all__ = ["SyntheticProblem", "bench_update_vs_history", "bench_update_vs_resolve", "flops_estimates"]

log = logging.getLogger("benchmarks.linalg")

#: RLSEdit's and AlphaEdit's settings for SmolLM2-135M (src/rlsedit/configs/smollm2-135m.json).
LAM, MU, ALPHA, NULLSPACE_THRESHOLD = 1.0, 31.6, 10.0, 0.02


@dataclass
class SyntheticProblem:
    """Synthetic keys and values at given dimensions.

    ``Sigma = diag(s)`` with ``s`` log-spaced from 1 down to 1e-4; keys are ``K = diag(sqrt(s)) Z`` with
    ``Z`` standard normal (so their second moment is ``Sigma``); values are ``V = K^T W + E`` with a
    random residual ``E``. Each batch is drawn from its own seeded generator.
    """

    d_k: int
    d_v: int
    u: int
    dtype: torch.dtype = torch.float64
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.d_k, self.d_v, self.u) < 1:
            raise ValueError("d_k, d_v and u must be >= 1")
        self.s = torch.logspace(0.0, -4.0, self.d_k, dtype=self.dtype).to(self.device)

    def _gen(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + salt)

    def weights(self) -> torch.Tensor:
        """``W_0`` (``(d_k, d_v)``), entries of standard deviation ``1 / sqrt(d_k)``."""
        w = torch.randn(self.d_k, self.d_v, generator=self._gen(-1), dtype=self.dtype) / self.d_k**0.5
        return w.to(self.device)

    def anchor(self) -> torch.Tensor:
        """Dense ``A_0 = lam^2 I + mu^2 Sigma``."""
        return torch.diag(LAM**2 + MU**2 * self.s)

    def initial_inverse(self) -> torch.Tensor:
        """Dense ``C_0 = A_0^{-1}`` (exact: ``A_0`` is diagonal)."""
        return torch.diag(1.0 / (LAM**2 + MU**2 * self.s))

    def projector(self) -> torch.Tensor:
        """Dense AlphaEdit null-space projector of ``Sigma``: what
        :func:`rlsedit.linalg.nullspace_projector` returns for a diagonal ``Sigma`` (without its
        ``O(d_k^3)`` eigendecomposition)."""
        mask = self.s < NULLSPACE_THRESHOLD  # the reference's absolute threshold (s.max() is 1)
        return torch.diag(mask.to(self.dtype))

    def batch(self, t: int, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``t``: keys ``K (d_k, u)`` and target values ``V = K^T W + E (u, d_v)``."""
        g = self._gen(t)
        Z = torch.randn(self.d_k, self.u, generator=g, dtype=self.dtype).to(self.device)
        K = Z * self.s.sqrt()[:, None]
        E = torch.randn(self.u, self.d_v, generator=g, dtype=self.dtype).to(self.device) * 0.1
        return K, K.mT @ W + E


def flops_estimates(d_k: int, d_v: int, u: int) -> dict[str, float]:
    """Approximate FLOPs of one batch for each method (leading terms; see the notes in the report).

    * RLSEdit (``rls_step``): ``C K`` and the rank-``u`` update ``C - G G^T`` (``2 d_k^2 u`` each), the
      innovation ``K^T W`` and the weight update ``C K (V - K^T W)`` (``2 d_k u d_v`` each).
    * re-solve: ``A_t = A_{t-1} + K K^T`` (``2 d_k^2 u``), Cholesky (``d_k^3 / 3``), two triangular solves
      with ``u`` right-hand sides (``2 d_k^2 u``), the innovation (``2 d_k u d_v``) and ``K E``
      (``2 d_k u d_v``).
    * AlphaEdit: ``P (K_p K_p^T + K K^T)`` (``2 d_k^3`` plus ``2 d_k^2 u``), LU solve (``2 d_k^3 / 3`` plus
      ``2 d_k^2 d_v``), ``P K E`` (``2 d_k^2 d_v`` plus ``2 d_k u d_v``), and the running sum
      ``K_p K_p^T += K K^T`` (``2 d_k^2 u``).
    """
    d, v = float(d_k), float(d_v)
    return {
        "rlsedit": 4 * d * d * u + 4 * d * u * v,
        "resolve": d**3 / 3 + 4 * d * d * u + 4 * d * u * v,
        "alphaedit": 2 * d**3 + 2 * d**3 / 3 + 4 * d * d * u + 4 * d * d * v + 2 * d * u * v,
    }


def bench_update_vs_history(
    d_k: int,
    d_v: int,
    u: int = 100,
    n_batches: int = 100,
    repeats: int = 3,
    drift_repeats: int = 1,
    drift_every: int = 10,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    seed: int = 0,
    double_buffer: bool = True,
) -> dict[str, Any]:
    """Time :func:`rls_step` for ``n_batches`` consecutive batches of ``u`` synthetic edits.

    With ``double_buffer`` (the editor's way) ``C_next`` and ``A_next`` are written into spare matrices and
    the old ``C`` and ``A`` become the next spares, so no ``(d_k, d_k)`` matrix is allocated per batch;
    without it every call allocates fresh ones (and pays their page faults: ~25% of a step at
    ``d_k = 14336``).

    Each batch is timed ``repeats`` times from the same state (``rls_step`` is pure) and the median kept;
    the state then advances with the last result. One untimed call precedes batch 1. The editor's
    bookkeeping outside ``rls_step`` is timed too: ``A_t = A_{t-1} + K K^T`` (every batch) and the drift
    check ``||A_t C_t - I||`` (``O(d_k^3)``, every ``drift_every`` batches in the editor), timed once at the
    end (``drift_repeats`` times).

    Returns:
        ``{"d_k", "d_v", "u", "dtype", "device", "repeats", "batches": [{"batch", "edits_before",
        "edits_after", "update_s", "samples", "a_update_s"}], "first_s", "last_s", "ratio_last_first",
        "window", "ratio_window", "a_update_s", "drift_s", "drift", "drift_every",
        "drift_amortised_s", "drift_estimate_s", "drift_estimate"}`` (seconds; the estimate is
        :func:`rlsedit.linalg.drift_estimate` with its default 32 probes).
    """
    if n_batches < 1 or repeats < 1:
        raise ValueError("n_batches and repeats must be >= 1")
    prob = SyntheticProblem(d_k, d_v, u, dtype=dtype, device=device, seed=seed)
    W = prob.weights()
    C = prob.initial_inverse()
    A = prob.anchor()
    # double buffering, as the editor does: C_next goes into the spare matrix, the old C becomes the spare
    spare = torch.empty_like(C) if double_buffer else None
    a_spare = torch.empty_like(A) if double_buffer else None  # the same for A_t = A_{t-1} + K K^T
    rows: list[dict[str, Any]] = []
    for t in range(n_batches):
        K, V = prob.batch(t, W)
        if t == 0:
            rls_step(C, W, K, V, out=spare)  # warm-up (allocator, kernels, the spare's pages); discarded
            sync(device)
        samples = []
        result = None
        for _ in range(repeats):
            result = None  # free the previous repeat's C before the next is computed (1.6 GiB at 14336)
            seconds, result = timed(
                lambda C=C, W=W, K=K, V=V, out=spare: rls_step(C, W, K, V, out=out), device
            )
            samples.append(seconds)
        assert result is not None
        if double_buffer:
            spare = C
        C, W = result
        a_seconds, A_next = timed(lambda A=A, K=K, out=a_spare: torch.addmm(A, K, K.mT, out=out), device)
        if double_buffer:
            a_spare = A
        A = A_next
        rows.append(
            {
                "batch": t + 1,
                "edits_before": t * u,
                "edits_after": (t + 1) * u,
                "update_s": median(samples),
                "samples": samples,
                "a_update_s": a_seconds,
            }
        )
        if t == 0 or (t + 1) % max(1, n_batches // 10) == 0 or t == n_batches - 1:
            log.info(
                "update_vs_history d_k=%d: batch %d/%d (%d edits), rls_step %.4f s",
                d_k,
                t + 1,
                n_batches,
                (t + 1) * u,
                rows[-1]["update_s"],
            )
    drift_samples = []
    value = float("nan")
    for _ in range(drift_repeats):
        seconds, value = timed(lambda: drift(C, A), device)
        drift_samples.append(seconds)
    est_samples = []
    est_value = float("nan")
    for _ in range(drift_repeats):
        seconds, est_value = timed(lambda: drift_estimate(C, A), device)
        est_samples.append(seconds)
    window = max(1, n_batches // 10)
    first_w = median([r["update_s"] for r in rows[:window]])
    last_w = median([r["update_s"] for r in rows[-window:]])
    drift_s = median(drift_samples)
    return {
        "d_k": d_k,
        "d_v": d_v,
        "u": u,
        "dtype": str(dtype).replace("torch.", ""),
        "device": device,
        "repeats": repeats,
        "double_buffer": double_buffer,
        "batches": rows,
        "first_s": rows[0]["update_s"],
        "last_s": rows[-1]["update_s"],
        "ratio_last_first": rows[-1]["update_s"] / rows[0]["update_s"],
        "window": window,
        "ratio_window": last_w / first_w,
        "a_update_s": median([r["a_update_s"] for r in rows]),
        "drift_s": drift_s,
        "drift": value,
        "drift_every": drift_every,
        "drift_amortised_s": drift_s / drift_every if drift_every else 0.0,
        "drift_estimate_s": median(est_samples),
        "drift_estimate": est_value,
    }


def bench_update_vs_resolve(
    d_k: int,
    d_v: int,
    u: int = 100,
    repeats: int = 3,
    warmup_solves: bool = True,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """One batch of ``u`` edits on top of one earlier batch, three ways, timed side by side.

    * ``rlsedit``: ``rls_step(C, W, K, V, out=...)`` -- the whole RLSEdit update (next ``C`` and ``W``),
      ``C_next`` written into a preallocated buffer as the editor's double buffering does.
    * ``resolve``: ``A_t = A_{t-1} + K K^T`` (into a preallocated buffer too), then
      ``W_t = W_{t-1} + A_t^{-1} K (V - K^T W_{t-1})`` by
      :func:`rlsedit.linalg.solve_spd` (Cholesky of ``A_t``, two triangular solves): the minimal full
      re-solve of the normal equations; it gives the same ``W_t`` as RLSEdit.
    * ``alphaedit``: :func:`rlsedit.linalg.alphaedit_delta` with the projector precomputed, i.e.
      ``(P (K_p K_p^T + K K^T) + alpha I)^{-1} P K E`` by LU, plus AlphaEdit's running sum
      ``K_p K_p^T += K K^T`` and the weight update.

    The three are run in turn within each repeat, so that a change in the machine's load hits them alike.
    With ``warmup_solves=False`` only RLSEdit gets an untimed warm-up call (use it where one re-solve or
    AlphaEdit solve takes minutes).

    Returns:
        ``{"d_k", "d_v", "u", "dtype", "device", "repeats", "seconds": {method: median}, "samples":
        {method: [...]}, "ratios": {"resolve/rlsedit", "alphaedit/rlsedit"}, "gflop": {method: ...},
        "gflops_rate": {method: ...}, "agreement": ||W_rls - W_resolve|| / ||W_rls - W||}``.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    prob = SyntheticProblem(d_k, d_v, u, dtype=dtype, device=device, seed=seed)
    W0 = prob.weights()
    # one earlier batch: C_1 = A_1^{-1} by RLSEdit, A_1 = A_0 + K_p K_p^T, running sum K_p K_p^T
    Kp, Vp = prob.batch(0, W0)
    C, W = rls_step(prob.initial_inverse(), W0, Kp, Vp)
    del W0
    KpKpT = Kp @ Kp.mT
    A = prob.anchor()
    A += KpKpT
    P = prob.projector()
    K, V = prob.batch(1, W)
    E = V - K.mT @ W

    # preallocated outputs for the two d_k x d_k results that a caller can keep between batches
    C_out = torch.empty_like(C)
    A_out = torch.empty_like(A)

    def run_rls() -> torch.Tensor:
        return rls_step(C, W, K, V, out=C_out)[1]

    def run_resolve() -> torch.Tensor:
        A_t = torch.addmm(A, K, K.mT, out=A_out)
        return W + solve_spd(A_t, K @ E)

    def run_alpha() -> torch.Tensor:
        delta = alphaedit_delta(P, KpKpT, K, E, ALPHA)
        torch.addmm(KpKpT, K, K.mT)  # the running sum for the next batch
        return W + delta

    methods = {"rlsedit": run_rls, "resolve": run_resolve, "alphaedit": run_alpha}
    run_rls()
    if warmup_solves:
        run_resolve()
        run_alpha()
    sync(device)
    samples: dict[str, list[float]] = {m: [] for m in methods}
    results: dict[str, torch.Tensor] = {}
    for r in range(repeats):
        for name, fn in methods.items():
            seconds, results[name] = timed(fn, device)
            samples[name].append(seconds)
            log.info("update_vs_resolve d_k=%d: repeat %d/%d %s %.4f s", d_k, r + 1, repeats, name, seconds)
    seconds = {m: median(s) for m, s in samples.items()}
    flops = flops_estimates(d_k, d_v, u)
    step = (results["rlsedit"] - W).norm()
    agreement = float((results["rlsedit"] - results["resolve"]).norm() / step.clamp_min(1e-300))
    return {
        "d_k": d_k,
        "d_v": d_v,
        "u": u,
        "dtype": str(dtype).replace("torch.", ""),
        "device": device,
        "repeats": repeats,
        "seconds": seconds,
        "samples": samples,
        "ratios": {
            "resolve/rlsedit": seconds["resolve"] / seconds["rlsedit"],
            "alphaedit/rlsedit": seconds["alphaedit"] / seconds["rlsedit"],
        },
        "gflop": {m: f / 1e9 for m, f in flops.items()},
        "gflops_rate": {m: flops[m] / 1e9 / seconds[m] for m in methods},
        "agreement": agreement,
    }
