"""Datasets as registered tasks: runs and the CLI look a dataset up by name in :mod:`rlsedit.tasks`; a new
dataset is one registered :class:`~rlsedit.tasks.Task`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from rlsedit import tasks
from rlsedit.datasets import load_counterfact
from rlsedit.experiment import DATASETS, ExperimentSpec, _cases
from rlsedit.tasks import Task, get_task, register_task, task_names


def test_the_bundled_tasks() -> None:
    assert task_names()[:2] == ("counterfact", "zsre") and DATASETS[:2] == task_names()[:2]
    cf, zs = get_task("counterfact"), get_task("zsre")
    assert cf.generation_metrics and not zs.generation_metrics
    assert [c.case_id for c in cf.cases("tune", 2, 3)] == [
        c.case_id for c in load_counterfact(split="tune", limit=5)[2:]
    ]
    assert len(zs.cases("test", 0, 4)) == 4


def test_unknown_dataset_and_split_are_refused_naming_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="not supported .*counterfact, zsre"):
        get_task("wikidata")
    with pytest.raises(ValueError, match="zsRE has no 'tune' split .*test"):
        ExperimentSpec(dataset="zsre", split="tune")
    with pytest.raises(ValueError, match="registered already"):
        register_task(get_task("zsre"))


@pytest.fixture()
def third_task() -> Iterator[Task]:
    """A third dataset in one registration: CounterFact's tune cases whose subject starts with a capital
    A, under another name."""

    def load(split: str, limit: int | None) -> list:
        cases = [c for c in load_counterfact(split="tune") if c.request.subject.startswith("A")]
        return cases[:limit]

    cf = get_task("counterfact")
    task = register_task(
        Task("a-subjects", ("tune",), load, lambda: load("tune", None), cf.score, cf.summarize, label="A")
    )
    try:
        yield task
    finally:
        tasks._TASKS.pop(task.name)


def test_a_registered_task_is_a_dataset_runs_accept(third_task: Task) -> None:
    spec = ExperimentSpec(dataset="a-subjects", split="tune", edits=3, fluency=100)
    assert spec.fluency == 0  # no generation metrics on this task
    cases = _cases(spec)
    assert len(cases) == 3 and all(c.request.subject.startswith("A") for c in cases)
    with pytest.raises(ValueError, match="has only"):
        _cases(ExperimentSpec(dataset="a-subjects", split="tune", edits=100_000))
