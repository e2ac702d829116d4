"""Value-by-value comparison of measurement records (JSON-like trees), wall-clock figures aside.

Used by ``experiments/compare_runs.py`` (do two run folders hold the same measurements?) and by
:func:`rlsedit.experiment.run_experiment` when it replays a recorded stream (is the replayed batch the
batch that was recorded?).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["IGNORED_KEYS", "diff_values", "equal_values", "relative_difference"]

#: Keys whose values legitimately differ between two runs of the same experiment: wall-clock and memory
#: figures, whether targets came from a cache and the cache files' names (which hash the weights' last
#: bits), the command line that made the run and the machine that ran it.
IGNORED_KEYS = frozenset(
    {"seconds", "timings", "memory", "targets_cached", "targets_keys", "command", "machine"}
)


def relative_difference(a: Any, b: Any) -> float:
    """How far apart two leaves are: ``|a - b| / max(|a|, |b|)`` for two finite numbers, 0 for equal
    leaves (NaN equals NaN, a boolean only the same boolean), ``inf`` for any other difference (an
    infinity against anything else, a number against a string or a boolean, two unequal strings)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return 0.0 if a is b else math.inf
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if a == b or (math.isnan(a) and math.isnan(b)):
            return 0.0
        if not (math.isfinite(a) and math.isfinite(b)):
            return math.inf
        return abs(a - b) / max(abs(a), abs(b))
    return 0.0 if a == b else math.inf


def equal_values(a: Any, b: Any, rtol: float = 0.0) -> bool:
    """Whether two leaves are equal within relative tolerance ``rtol``:
    ``relative_difference(a, b) <= rtol``."""
    return relative_difference(a, b) <= rtol


def diff_values(
    a: Any, b: Any, rtol: float = 0.0, path: str = "", ignored: frozenset[str] = IGNORED_KEYS
) -> tuple[int, list[tuple[str, Any, Any]]]:
    """Compare two JSON-like trees leaf by leaf, skipping dict keys in ``ignored``.

    Returns ``(n, differences)``: ``n`` the number of leaves compared, ``differences`` a list of
    ``(path, value_a, value_b)`` naming each differing leaf (``"3.layers.7.fit"``); a key present on one
    side only gives ``"<absent>"`` for the other, lists of different lengths give a ``path.length`` entry
    and are compared on their common part."""
    out: list[tuple[str, Any, Any]] = []
    n = _walk(a, b, path, rtol, ignored, out)
    return n, out


def _walk(a: Any, b: Any, path: str, rtol: float, ignored: frozenset[str], out: list) -> int:
    if isinstance(a, dict) and isinstance(b, dict):
        n = 0
        for key in sorted(set(a) | set(b), key=str):
            if key in ignored:
                continue
            sub = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                out.append((sub, a.get(key, "<absent>"), b.get(key, "<absent>")))
                n += 1
            else:
                n += _walk(a[key], b[key], sub, rtol, ignored, out)
        return n
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append((f"{path}.length" if path else "length", len(a), len(b)))
        n = 0
        for i, (u, v) in enumerate(zip(a, b, strict=False)):
            n += _walk(u, v, f"{path}.{i}" if path else str(i), rtol, ignored, out)
        return n
    if not equal_values(a, b, rtol):
        out.append((path, a, b))
    return 1
