"""KnowEdit-style (EasyEdit) records: read and validated by `rlsedit.load_cases`, accepted as requests,
streamed and scored (portability, per-group locality) by `rlsedit run --dataset FILE`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import rlsedit
from rlsedit import cli
from rlsedit.experiment import ExperimentSpec, run_experiment
from rlsedit.report import load_results, results_table
from rlsedit.requests import RequestError, parse_request, read_requests_jsonl
from rlsedit.tasks import get_task
from rlsedit.tasks.knowedit import score_knowedit, summarize_knowedit
from test_experiment import SETTINGS  # the tiny run settings (model_dir: conftest.py)

RECORDS = [
    {
        "subject": "Danielle Darrieux",
        "prompt": "The mother tongue of Danielle Darrieux is",
        "target_new": "English",
        "ground_truth": ["French"],
        "rephrase_prompt": "Danielle Darrieux's mother tongue is",
        "portability": {
            "Reasoning": [
                {
                    "prompt": "The language Danielle Darrieux spoke as a child is",
                    "ground_truth": [["English", "en"]],
                }
            ],
            "Subject_Aliasing": [{"prompt": "The mother tongue of Darrieux is", "ground_truth": "English"}],
        },
        "locality": {
            "Relation_Specificity": [
                {"prompt": "Danielle Darrieux was born in", "ground_truth": ["Bordeaux"]}
            ],
        },
    },
    {
        "subject": "Eiffel Tower",
        "prompt": "The {} is located in the city of",
        "target_new": ["Rome"],
        "ground_truth": "Paris",
        "rephrase_prompt": ["Where is the Eiffel Tower? In the city of", "The Eiffel Tower stands in"],
        "locality": {
            "Relation_Specificity": [{"prompt": "The Louvre is located in", "ground_truth": ["Paris"]}]
        },
    },
    {
        "subject": "Toko Yasuda",
        "prompt": "Toko Yasuda, the",
        "target_new": "piano",
        "ground_truth": ["guitar"],
        "locality_prompt": "Joe Satriani, the",
        "locality_ground_truth": "guitar",
        "case_id": 77,
    },
]


@pytest.fixture()
def records_file(tmp_path: Path) -> Path:
    path = tmp_path / "knowedit.json"
    path.write_text(json.dumps(RECORDS))
    return path


def test_load_cases_reads_every_form(records_file: Path) -> None:
    cases = rlsedit.load_cases(str(records_file))
    assert [c.case_id for c in cases] == [0, 1, 77]
    a, b, c = cases
    assert a.request.target_true == "French" and a.request.target_new == "English"
    assert a.rephrase_prompts == ("Danielle Darrieux's mother tongue is",)
    assert a.portability["Reasoning"] == (("The language Danielle Darrieux spoke as a child is", "English"),)
    assert set(a.portability) == {"Reasoning", "Subject_Aliasing"}
    assert a.locality == {"Relation_Specificity": (("Danielle Darrieux was born in", "Bordeaux"),)}
    assert (
        b.request.target_new == "Rome"
        and b.request.subject == "Eiffel Tower"
        and len(b.rephrase_prompts) == 2
    )
    assert c.locality == {"Neighborhood": (("Joe Satriani, the", "guitar"),)} and c.rephrase_prompts == ()
    # JSON Lines holds the same
    lines = records_file.with_suffix(".jsonl")
    lines.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    assert rlsedit.load_cases(str(lines)) == cases


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"portability": {"Reasoning": "x"}},
            "knowedit.json record 0, field 'portability.Reasoning': must be a list",
        ),
        (
            {"portability": {"Reasoning": [{"prompt": "p"}]}},
            "field 'portability.Reasoning[0]': needs 'prompt' and 'ground_truth'",
        ),
        ({"locality": {"R": [{"prompt": "p", "ground_truth": [[]]}]}}, "field 'locality.R[0].ground_truth'"),
        ({"target_new": []}, "field 'target_new'"),
        ({"ground_truth": "   "}, "field 'ground_truth'"),
        ({"portability": []}, "field 'portability': must be an object of groups"),
    ],
)
def test_bad_records_are_refused_naming_record_and_field(tmp_path: Path, change: dict, message: str) -> None:
    path = tmp_path / "knowedit.json"
    path.write_text(json.dumps([{**RECORDS[0], **change}, RECORDS[1]]))
    with pytest.raises(RequestError) as err:
        rlsedit.load_cases(str(path))
    assert message in str(err.value)


def test_bad_files_are_refused(tmp_path: Path) -> None:
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps([{**RECORDS[2]}, {**RECORDS[2]}]))
    with pytest.raises(RequestError, match="record 1, field 'case_id': duplicate case_id 77"):
        rlsedit.load_cases(str(dup))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n{oops\n")
    with pytest.raises(RequestError, match="bad.jsonl line 2: not valid JSON"):
        rlsedit.load_cases(str(bad))
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(RequestError, match="holds no records"):
        rlsedit.load_cases(str(empty))


def test_knowedit_records_are_requests(tmp_path: Path) -> None:
    req = parse_request(RECORDS[0])
    assert (req.subject, req.target_new, req.target_true) == ("Danielle Darrieux", "English", "French")
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS[:2]))
    assert [r.target_new for r in read_requests_jsonl(path)] == ["English", "Rome"]
    with pytest.raises(RequestError, match="field 'ground_truth'"):
        parse_request({**RECORDS[0], "ground_truth": [[], ""]})


def test_scores_have_portability_and_locality_groups(records_file: Path, tiny_model_factory) -> None:
    model, tok = tiny_model_factory("llama")
    cases = rlsedit.load_cases(str(records_file))
    recs = score_knowedit(model, tok, cases)
    assert [r["case_id"] for r in recs] == [0, 1, 77]
    a, b, c = recs
    assert {
        "efficacy",
        "generalization",
        "portability",
        "specificity",
        "portability/Reasoning",
        "portability/Subject_Aliasing",
        "locality/Relation_Specificity",
    } <= set(a)
    assert b["portability"] is None and c["generalization"] is None and "locality/Neighborhood" in c
    for r in recs:
        assert all(0.0 <= v <= 1.0 for k, v in r.items() if k != "case_id" and v is not None)
    assert a["portability"] == pytest.approx(
        (a["portability/Reasoning"] + a["portability/Subject_Aliasing"]) / 2
    )
    summary = summarize_knowedit(recs)
    assert summary["n"] == 3 and summary["locality/Relation_Specificity"] is not None
    assert summary["portability"] == pytest.approx(100 * a["portability"])  # the one case with items


def test_run_streams_a_records_file(records_file: Path, model_dir: Path, tmp_path: Path) -> None:
    assert get_task(str(records_file)).splits == ("test",)
    spec = ExperimentSpec(
        model=str(model_dir), dataset=str(records_file), edits=3, batch_size=3, overrides=dict(SETTINGS)
    )
    res = run_experiment(spec, tmp_path / "run", stats_dir=tmp_path / "stats")
    for part in ("pre", "post"):
        assert {"efficacy", "portability", "specificity", "portability/Reasoning"} <= set(res[part])
    assert res["edits"] == 3 and res["spec"]["fluency"] == 0
    table = results_table([load_results(tmp_path / "run")])
    assert " portability |" in table.splitlines()[0]
    argv = ["run", "--model", str(model_dir), "--edits", "1", "--out", str(tmp_path / "x")]
    assert cli.main([*argv, "--dataset", str(tmp_path / "missing.json")]) != 0
    assert not (tmp_path / "x").exists()
