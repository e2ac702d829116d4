"""rlsedit.compare: the one rule for how far apart two recorded values are, and the tree walk over it."""

from __future__ import annotations

import math

import pytest

from rlsedit.compare import IGNORED_KEYS, diff_values, equal_values, relative_difference

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (2.0, 2.0, 0.0),
        (3, 3.0, 0.0),
        (0, 0.0, 0.0),
        (NAN, NAN, 0.0),
        (INF, INF, 0.0),
        (1.0, 1.25, 0.2),
        (-4.0, 4.0, 2.0),
        (0.0, 1e-9, 1.0),
        (1.0, NAN, INF),
        (1.0, INF, INF),
        (INF, -INF, INF),
        (1, "1", INF),
        (True, 1.0, INF),
        (True, True, 0.0),
        (False, 0, INF),
        ("a", "a", 0.0),
        ("a", "b", INF),
        (None, None, 0.0),
    ],
)
def test_relative_difference(a: object, b: object, expected: float) -> None:
    got = relative_difference(a, b)
    assert got == pytest.approx(expected) if math.isfinite(expected) else got == expected
    assert relative_difference(b, a) == got  # symmetric


def test_equal_values_is_relative_difference_within_tolerance() -> None:
    assert equal_values(1.0, 1.0 + 1e-7, 1e-6) and not equal_values(1.0, 1.0 + 1e-7)
    assert not equal_values(1.0, 1.25, 0.19) and equal_values(1.0, 1.25, 0.2)
    # an infinity is never "close" to a finite number, whatever the tolerance
    assert not equal_values(INF, 1.0, 1.0) and not equal_values(1.0, NAN, 1.0)
    assert equal_values(NAN, NAN) and not equal_values(True, 1, 1.0)


def test_diff_values_names_each_differing_leaf_and_skips_ignored_keys() -> None:
    a = {"x": [1.0, 2.0, {"y": "s"}], "seconds": 3.0, "only_a": 1, "z": True}
    b = {"x": [1.0, 2.5, {"y": "t"}, 9], "seconds": 99.0, "z": True}
    assert "seconds" in IGNORED_KEYS
    n, diffs = diff_values(a, b)
    assert n == 5  # only_a, x.0, x.1, x.2.y, z (the length mismatch is reported, not counted)
    assert diffs == [
        ("only_a", 1, "<absent>"),
        ("x.length", 3, 4),
        ("x.1", 2.0, 2.5),
        ("x.2.y", "s", "t"),
    ]
    _, within = diff_values(a, b, rtol=0.25)  # 2.0 vs 2.5 is 0.2 apart
    assert ("x.1", 2.0, 2.5) not in within and ("x.2.y", "s", "t") in within
