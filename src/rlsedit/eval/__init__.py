"""Evaluation: scoring continuations, CounterFact/zsRE metrics, general capability."""

from rlsedit.eval.scoring import greedy_continuations, target_nll

__all__ = ["greedy_continuations", "target_nll"]
