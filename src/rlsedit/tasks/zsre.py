"""zsRE (MEND's question-answering edits): efficacy, generalization and specificity as top-1 token
accuracies; one split, ``test`` (all valid cases)."""

from __future__ import annotations

from rlsedit.datasets import load_zsre
from rlsedit.eval.zsre import score_zsre, summarize_zsre
from rlsedit.tasks.base import Task, register_task

TASK = register_task(
    Task(
        name="zsre",
        splits=("test",),
        load=lambda split, limit: load_zsre()[:limit],
        every_case=load_zsre,
        score=score_zsre,
        summarize=summarize_zsre,
        label="zsRE",
    )
)
