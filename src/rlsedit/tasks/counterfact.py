"""CounterFact (ROME / MEMIT): efficacy, generalization and specificity as new-vs-true preferences;
splits ``test``, ``tune``, ``sweep`` and ``all`` (see :func:`rlsedit.datasets.load_counterfact`)."""

from __future__ import annotations

from rlsedit.datasets import load_counterfact
from rlsedit.eval.counterfact import score_counterfact, summarize_counterfact
from rlsedit.tasks.base import Task, register_task

TASK = register_task(
    Task(
        name="counterfact",
        splits=("test", "tune", "sweep", "all"),
        load=lambda split, limit: load_counterfact(split=split, limit=limit),
        every_case=lambda: load_counterfact(split="all"),
        score=score_counterfact,
        summarize=summarize_counterfact,
        generation_metrics=True,
        label="CounterFact",
    )
)
