"""Evaluation: scoring continuations, CounterFact/zsRE metrics, fluency and consistency, general
capability, and RLSEdit's objective terms.

Submodules: :mod:`~rlsedit.eval.scoring`, :mod:`~rlsedit.eval.counterfact`, :mod:`~rlsedit.eval.zsre`,
:mod:`~rlsedit.eval.fluency`, :mod:`~rlsedit.eval.capability`, :mod:`~rlsedit.eval.objective` (imports the
editors), :mod:`~rlsedit.eval.summary`.
"""

from rlsedit.eval.scoring import greedy_continuations, target_nll

__all__ = ["greedy_continuations", "target_nll"]
