"""Tests of rlsedit.datasets: the bundled data, its counts (as in PROVENANCE.md) and the loaders."""

from __future__ import annotations

import gzip
import hashlib
import logging
import re
from collections import Counter
from importlib import resources

import pytest

from rlsedit import datasets
from rlsedit.datasets import (
    COUNTERFACT_TUNE_SIZE,
    CounterFactCase,
    ZsreCase,
    load_counterfact,
    load_counterfact_invalid,
    load_glue,
    load_mmlu,
    load_wikipedia_leads,
    load_wikitext,
    load_zsre,
    load_zsre_invalid,
    superseded_cases,
)
from rlsedit.requests import EditRequest, RequestError, parse_request

DATA = resources.files("rlsedit").joinpath("data")
BUNDLED = [
    "counterfact.jsonl.gz",
    "zsre.jsonl.gz",
    "wikipedia-leads.jsonl.gz",
    "wikitext-2-test.txt.gz",
    "wikitext-2-valid.txt.gz",
    "sst2.jsonl.gz",
    "mrpc.jsonl.gz",
    "cola.jsonl.gz",
    "rte.jsonl.gz",
    "mmlu.jsonl.gz",
]
# zsRE records whose new answer equals the old one (SOURCES.md: 17) and those with an empty new answer
ZSRE_SAME_ANSWER = [101, 115, 157, 202, 213, 229, 273, 402, 453, 487, 522, 541, 596, 654, 737, 784, 827]
ZSRE_BLANK_ANSWER = [534, 723]


# ------------------------------------------------------------------------------------------- bundle


def test_bundle_matches_provenance_checksums() -> None:
    provenance = DATA.joinpath("PROVENANCE.md").read_text(encoding="utf-8")
    assert "CC BY-SA" in provenance and "MIT" in provenance
    assert "## Facts about the data" in provenance
    for name in BUNDLED:
        packed = DATA.joinpath(name).read_bytes()
        assert packed[4:8] == b"\0\0\0\0", f"{name}: gzip mtime is not 0"
        row = re.search(
            rf"^\| {re.escape(name)} \|.*`([0-9a-f]{{64}})` \| `([0-9a-f]{{64}})` \|$",
            provenance,
            re.MULTILINE,
        )
        assert row is not None, name
        assert hashlib.sha256(gzip.decompress(packed)).hexdigest() == row.group(1), name
        assert hashlib.sha256(packed).hexdigest() == row.group(2), name


# -------------------------------------------------------------------------------------------- CounterFact


def test_counterfact_counts_and_splits() -> None:
    cases = load_counterfact()
    assert len(cases) == 20_000
    ids = [case.case_id for case in cases]
    assert ids == sorted(ids) and len(set(ids)) == 20_000
    assert (ids[0], ids[-1]) == (0, 21_918)
    test, tune = load_counterfact("test"), load_counterfact("tune")
    assert (len(test), len(tune)) == (19_000, COUNTERFACT_TUNE_SIZE)
    assert test + tune == cases  # a partition, in order
    assert max(c.case_id for c in test) < min(c.case_id for c in tune)
    assert (test[-1].case_id, tune[0].case_id) == (20_813, 20_814)
    assert load_counterfact_invalid() == []


def test_counterfact_first_case() -> None:
    case = load_counterfact(limit=1)[0]
    assert isinstance(case, CounterFactCase)
    assert case.case_id == 0
    r = case.request
    assert (r.subject, r.target_new, r.target_true) == ("Danielle Darrieux", "English", "French")
    assert r.case_id == 0
    assert r.prompt == "The mother tongue of {} is"
    assert r.text == "The mother tongue of Danielle Darrieux is"
    assert case.paraphrase_prompts == ("Where Danielle Darrieux is from, people speak the language of",)
    assert case.neighborhood_prompts == ("Michel Rocard is a native speaker of",)
    assert case.neighborhood_true == "French"


def test_counterfact_content_facts() -> None:
    cases = load_counterfact()
    assert sum(c.request.prompt.startswith("{}") for c in cases) == 16_042  # "80% start with the subject"
    assert all(len(c.paraphrase_prompts) == 1 and len(c.neighborhood_prompts) == 1 for c in cases)
    braces = [c.paraphrase_prompts[0] for c in cases if "{" in c.paraphrase_prompts[0]]
    assert len(braces) == 2 and all("{|" in p for p in braces)  # plain text, kept verbatim
    assert all(c.request.target_true is not None for c in cases)


def test_counterfact_limit_and_bad_arguments() -> None:
    assert [c.case_id for c in load_counterfact("tune", limit=3)] == [20_814, 20_815, 20_816]
    assert load_counterfact(limit=0) == []
    with pytest.raises(ValueError, match="valid: all, tune, test"):
        load_counterfact("train")
    with pytest.raises(ValueError, match="limit"):
        load_counterfact(limit=-1)


def test_counterfact_superseded_counts() -> None:
    cases = load_counterfact()
    sup = superseded_cases(cases)
    keys = Counter(c.request.key for c in cases)
    repeated = {key for key, n in keys.items() if n > 1}
    targets: dict[tuple[str, str], set[str]] = {}
    for c in cases:
        targets.setdefault(c.request.key, set()).add(c.request.target_new)
    assert len(repeated) == 181
    assert sum(len(t) > 1 for t in targets.values()) == 174  # SOURCES.md: 174 keys with different targets
    assert len(sup) == 268 == sum(n - 1 for n in keys.values())
    assert len(superseded_cases(cases, different_target_only=True)) == 260
    first = cases[:10_000]
    sup_first = superseded_cases(first)
    by_id = {c.case_id: c for c in cases}
    assert len({by_id[i].request.key for i in sup_first}) == 61  # SOURCES.md: 61 groups in the first 10,000
    assert len(sup_first) == 78
    assert len(superseded_cases(first, different_target_only=True)) == 76
    # each superseded case maps to the next case (in stream order) with the same key
    expected: dict[int, int] = {}
    last: dict[tuple[str, str], int] = {}
    for c in cases:
        if c.request.key in last:
            expected[last[c.request.key]] = c.case_id
        last[c.request.key] = c.case_id
    assert sup == expected
    assert all(by_id[old].request.key == by_id[new].request.key and old < new for old, new in sup.items())


def test_superseded_cases_small_streams() -> None:
    a = EditRequest("{} twin city is", "X", "Paris", case_id="a")
    b = EditRequest("{} twin city is", "X", "paris ", case_id="b")
    c = EditRequest("{} twin city is", "X", "Rome", case_id="c")
    d = EditRequest("{} is in", "X", "Rome", case_id="d")
    assert superseded_cases([a, b, c, d]) == {"a": "b", "b": "c"}
    assert superseded_cases([a, b, c, d], different_target_only=True) == {"a": "c", "b": "c"}
    assert superseded_cases([c, a]) == {"c": "a"}  # the order of the stream decides
    assert superseded_cases([]) == {}
    with pytest.raises(ValueError, match="no case_id"):
        superseded_cases([EditRequest("{} is", "X", "y")])
    with pytest.raises(ValueError, match="not unique"):
        superseded_cases([a, a])


def test_counterfact_case_from_rome_record_and_bad_records() -> None:
    rewrite = {
        "prompt": "The mother tongue of {} is",
        "subject": "Danielle Darrieux",
        "target_new": {"str": "English"},
        "target_true": {"str": "French"},
    }
    rome = {
        "case_id": 0,
        "requested_rewrite": rewrite,
        "paraphrase_prompts": ["p1", "p2"],
        "neighborhood_prompts": ["n1", "n2", "n3"],
    }
    case = CounterFactCase.from_record(rome)
    assert case.request == load_counterfact(limit=1)[0].request
    assert (case.paraphrase_prompts, case.neighborhood_prompts, case.neighborhood_true) == (
        ("p1", "p2"),
        ("n1", "n2", "n3"),
        "French",
    )
    with pytest.raises(RequestError, match="line 3, field 'locality_ground_truth'"):
        CounterFactCase.from_record(
            {
                "case_id": 1,
                "prompt": "{} is",
                "subject": "X",
                "target_new": "y",
                "ground_truth": "z",
                "rephrase_prompt": "r",
                "locality_prompt": "l",
            },
            line=3,
        )
    with pytest.raises(RequestError, match="field 'case_id'"):
        CounterFactCase.from_record({**rome, "case_id": "7"})


def test_counterfact_is_deterministic_and_fresh() -> None:
    first, second = load_counterfact("tune"), load_counterfact("tune")
    assert first == second and first is not second
    first.clear()
    assert load_counterfact("tune") == second


# ------------------------------------------------------------------------------------------------ zsRE


def test_zsre_counts(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="rlsedit.datasets"):
        valid = load_zsre()
    assert "skipped 19 invalid records" in caplog.text
    everything = load_zsre(valid_only=False)
    assert len(everything) == 1000 and [c.case_id for c in everything] == list(range(1000))
    assert len(valid) == 981  # SOURCES.md says 983: it misses the 2 records with an empty new answer
    invalid = dict(load_zsre_invalid())
    assert sorted(invalid) == sorted(ZSRE_SAME_ANSWER + ZSRE_BLANK_ANSWER)
    assert all("must differ from target_true" in invalid[i] for i in ZSRE_SAME_ANSWER)
    assert all("field 'target_new': must not be blank" in invalid[i] for i in ZSRE_BLANK_ANSWER)
    assert Counter(c.subject_match for c in everything) == {"exact": 1000}
    for case in everything:
        if case.request is None:
            with pytest.raises(RequestError):  # a validating editor refuses the raw record
                parse_request(case.request_dict())
        else:
            assert parse_request(case.request_dict()) == case.request


def test_zsre_first_case() -> None:
    case = load_zsre()[0]
    assert isinstance(case, ZsreCase)
    r = case.request
    assert r is not None
    assert (r.prompt, r.subject, r.target_new, r.target_true) == (
        "What is the product made by {}?",
        "UniFirst",
        "unmanned aircraft",
        "uniform",
    )
    assert r.text == "What is the product made by UniFirst?"
    assert case.rephrase == "What will be the product of UniFirst?"
    assert case.loc.startswith("nq question: ") and case.loc_ans == "Walter Sobchak"
    assert load_zsre() == load_zsre()


def test_zsre_stripped_targets() -> None:
    by_id = {c.case_id: c for c in load_zsre(valid_only=False)}
    assert by_id[174].alt == " Captain Universe"
    assert by_id[174].request is not None and by_id[174].request.target_new == "Captain Universe"


def test_zsre_subject_located_ignoring_case_or_missing() -> None:
    record = {
        "case_id": 5,
        "subject": "unifirst",
        "src": "What does UniFirst make?",
        "alt": "cars",
        "answers": ["uniforms"],
        "rephrase": "r",
        "loc": "l",
        "loc_ans": "a",
    }
    case = datasets._zsre_case(record, 6)
    assert case.subject_match == "ignorecase"
    assert case.request is not None and case.request.subject == "UniFirst"
    assert case.request.text == "What does UniFirst make?"
    missing = datasets._zsre_case({**record, "subject": "Acme"}, 6)
    assert (missing.subject_match, missing.request) == ("missing", None)
    assert missing.error is not None and "does not occur" in missing.error


# --------------------------------------------------------------------------------- corpora and general


def test_wikipedia_leads() -> None:
    texts = load_wikipedia_leads()
    assert len(texts) == 10_033
    assert all(isinstance(t, str) and t.strip() for t in texts)
    assert texts[0].startswith("0 is a number")
    assert load_wikipedia_leads(limit=5) == texts[:5]
    assert 700_000 < sum(len(t.split()) for t in texts) < 850_000  # "about 776k words"


def test_wikitext() -> None:
    test, valid = load_wikitext("test"), load_wikitext("valid")
    assert len(test.split()) == 241_211 and len(valid.split()) == 213_886
    assert "<unk>" in test and " @-@ " in test
    assert load_wikitext() == test
    with pytest.raises(ValueError, match="valid: test, valid"):
        load_wikitext("train")


@pytest.mark.parametrize(
    "task, count, fields",
    [
        ("sst2", 856, {"sentence", "label", "idx"}),
        ("mrpc", 258, {"sentence1", "sentence2", "label", "idx"}),
        ("cola", 644, {"sentence", "label", "idx"}),
        ("rte", 262, {"sentence1", "sentence2", "label", "idx"}),
    ],
)
def test_glue(task: str, count: int, fields: set[str]) -> None:
    items = load_glue(task)
    assert len(items) == count
    assert all(set(item) == fields and isinstance(item["label"], int) for item in items)
    assert load_glue(task) == items


def test_glue_unknown_task() -> None:
    with pytest.raises(ValueError, match="valid: sst2, mrpc, cola, rte"):
        load_glue("mnli")


def test_mmlu() -> None:
    items = load_mmlu()
    assert len(items) == 1516
    assert all(len(item["choices"]) == 4 and item["answer"] in range(4) for item in items)
    assert items[0]["question"] == "Which expression is equivalent to 4 x 9?"
