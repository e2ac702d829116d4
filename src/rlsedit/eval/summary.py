"""Aggregating per-case records: means in percent with 95% confidence intervals."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["Z95", "mean_ci95", "summarize_metrics", "wilson_interval"]

#: The two-sided 95% normal quantile.
Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` in [0, 1] of a binomial proportion (``(0, 1)`` when n = 0)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes <= 0 else max(0.0, centre - half)
    hi = 1.0 if successes >= n else min(1.0, centre + half)
    return lo, hi


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, half-width)`` of the normal-approximation 95% interval of the mean (half-width 0 for n=1)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    m = math.fsum(values) / n
    if n == 1:
        return m, 0.0
    var = math.fsum((v - m) ** 2 for v in values) / (n - 1)
    return m, Z95 * math.sqrt(var / n)


def summarize_metrics(
    records: Iterable[dict[str, Any]],
    metrics: Sequence[str],
    exclude: Iterable[Any] = (),
    scale: float = 100.0,
) -> dict[str, float | int | None]:
    """Mean of each metric over the records times ``scale`` (percent by default), leaving out case ids
    in ``exclude``; ``n`` and a normal-approximation 95% half-width per metric (``<metric>_ci95``).

    A record whose metric is missing or None does not count for that metric; a metric no record has
    is None.
    """
    skip = set(exclude)
    recs = [r for r in records if r["case_id"] not in skip]
    out: dict[str, float | int | None] = {"n": len(recs)}
    for m in metrics:
        vals = [float(r[m]) for r in recs if r.get(m) is not None]
        if not vals:
            out[m] = out[f"{m}_ci95"] = None
            continue
        mean, half = mean_ci95(vals)
        out[m] = scale * mean
        out[f"{m}_ci95"] = scale * half
    return out
