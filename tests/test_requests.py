"""Tests of rlsedit.requests: validation rules, error messages, input forms, JSON Lines, properties."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from rlsedit.requests import (
    MAX_FIELD_CHARS,
    MAX_PROMPT_CHARS,
    EditRequest,
    RequestError,
    parse_request,
    read_requests_jsonl,
    validate_batch,
    write_requests_jsonl,
)

DARRIEUX = {
    "prompt": "The mother tongue of {} is",
    "subject": "Danielle Darrieux",
    "target_new": "English",
    "target_true": "French",
    "case_id": 0,
}

COMPACT = {
    "case_id": 0,
    "prompt": "The mother tongue of Danielle Darrieux is",
    "target_new": "English",
    "subject": "Danielle Darrieux",
    "ground_truth": "French",
    "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
    "locality_prompt": "Michel Rocard is a native speaker of",
    "locality_ground_truth": "French",
}

ROME = {
    "case_id": 0,
    "pararel_idx": 2796,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
        "subject": "Danielle Darrieux",
    },
    "paraphrase_prompts": ["Shayna does this and Yossel goes still and dies. Danielle Darrieux, a"],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is"],
    "attribute_prompts": [],
    "generation_prompts": [],
}


def make(**overrides: Any) -> EditRequest:
    fields = {**DARRIEUX, **overrides}
    return EditRequest(**fields)


# ------------------------------------------------------------------------------------------ valid forms


def test_template_form_and_properties() -> None:
    r = make()
    assert r.prompt == "The mother tongue of {} is"
    assert r.prefix == "The mother tongue of "
    assert r.suffix == " is"
    assert r.text == "The mother tongue of Danielle Darrieux is"
    assert r.subject_span == (21, 38)
    assert r.text[slice(*r.subject_span)] == "Danielle Darrieux"
    assert r.key == ("Danielle Darrieux", "The mother tongue of {} is")
    assert r.target_new_text == " English"
    assert r.target_true_text == " French"
    assert EditRequest("{} is", "X", "y").target_true_text is None


def test_literal_subject_is_normalised_to_placeholder_form() -> None:
    r = make(prompt="The mother tongue of Danielle Darrieux is")
    assert r == make()
    assert r.key == make().key


def test_literal_subject_first_occurrence_is_the_subject() -> None:
    r = EditRequest("Paris and Paris are", "Paris", "x")
    assert r.prompt == "{} and Paris are"
    assert r.text == "Paris and Paris are"


def test_placeholder_wins_over_literal_subject() -> None:
    r = EditRequest("{} likes Paris", "Paris", "cheese")
    assert r.text == "Paris likes Paris"
    assert r.subject_span == (0, 5)


@pytest.mark.parametrize(
    "prompt, text",
    [
        ("{| class=wikitable {} is", "{| class=wikitable X is"),
        ("{0} {x} {} {{", "{0} {x} X {{"),
        ("{{}}", "{X}"),
        ("}{}{", "}X{"),
        ("{| X is a citizen of", "{| X is a citizen of"),
    ],
)
def test_other_braces_are_plain_text(prompt: str, text: str) -> None:
    r = EditRequest(prompt, "X", "y")
    assert r.text == text
    assert r.prompt.count("{}") == 1


def test_targets_and_subject_are_stripped_and_prompt_right_stripped() -> None:
    r = EditRequest("The capital of {} is \n", "  France ", "  Lyon\t", " Paris ")
    assert (r.subject, r.target_new, r.target_true) == ("France", "Lyon", "Paris")
    assert r.prompt == "The capital of {} is"
    assert r.target_new_text == " Lyon"


def test_case_id_forms() -> None:
    assert make(case_id=None).case_id is None
    assert make(case_id=7).case_id == 7
    assert make(case_id="cf-7").case_id == "cf-7"


def test_limits_are_inclusive() -> None:
    prompt = "{}" + "a" * (MAX_PROMPT_CHARS - 2)
    r = EditRequest(prompt, "s" * MAX_FIELD_CHARS, "t" * MAX_FIELD_CHARS, "u" * MAX_FIELD_CHARS)
    assert len(r.prompt) == MAX_PROMPT_CHARS


def test_request_is_frozen_and_hashable() -> None:
    r = make()
    with pytest.raises(AttributeError):
        r.subject = "x"  # type: ignore[misc]
    assert len({r, make()}) == 1


# --------------------------------------------------------------------------------------------- rules

BAD_FIELDS = [
    # (overrides, field, fragment of the reason)
    ({"prompt": 3}, "prompt", "must be a string, got int"),
    ({"prompt": None}, "prompt", "must be a string, got NoneType"),
    ({"prompt": b"{} is"}, "prompt", "must be a string, got bytes"),
    ({"subject": None}, "subject", "must be a string"),
    ({"subject": ["Danielle Darrieux"]}, "subject", "must be a string, got list"),
    ({"target_new": 5}, "target_new", "must be a string"),
    ({"target_true": 5.0}, "target_true", "must be a string, got float"),
    ({"subject": ""}, "subject", "must not be blank"),
    ({"subject": " \t\n"}, "subject", "must not be blank"),
    ({"target_new": ""}, "target_new", "must not be blank"),
    ({"target_new": "   "}, "target_new", "must not be blank"),
    ({"target_true": " "}, "target_true", "must not be blank"),
    ({"target_new": "French"}, "target_new", "must differ from target_true"),
    ({"target_new": " french "}, "target_new", "must differ from target_true"),
    ({"target_new": "FRENCH"}, "target_new", "must differ from target_true"),
    ({"prompt": "{}" + "a" * (MAX_PROMPT_CHARS - 1)}, "prompt", "the limit is 2000"),
    ({"subject": "a" * (MAX_FIELD_CHARS + 1)}, "subject", "the limit is 500"),
    ({"target_new": "a" * (MAX_FIELD_CHARS + 1)}, "target_new", "the limit is 500"),
    ({"target_true": "a" * (MAX_FIELD_CHARS + 1)}, "target_true", "the limit is 500"),
    ({"prompt": "The {} is\x00"}, "prompt", "NUL"),
    ({"subject": "Dan\x00"}, "subject", "NUL"),
    ({"target_new": "Eng\x00lish"}, "target_new", "NUL"),
    ({"target_true": "\x00"}, "target_true", "NUL"),
    ({"prompt": "The {} is \ud800"}, "prompt", "lone surrogates"),
    ({"subject": "Dan\udfff"}, "subject", "lone surrogates"),
    ({"target_new": "\udc80English"}, "target_new", "lone surrogates"),
    ({"target_true": "Fr\ud83d"}, "target_true", "lone surrogates"),
    ({"prompt": "{} and {} are"}, "prompt", "exactly once, found it 2 times"),
    ({"prompt": "{}{}{}"}, "prompt", "found it 3 times"),
    ({"prompt": "The mother tongue of Darrieux is"}, "prompt", "or the subject literally"),
    ({"prompt": "The mother tongue of danielle darrieux is"}, "prompt", "or the subject literally"),
    ({"prompt": ""}, "prompt", "or the subject literally"),
    ({"subject": "a{}b"}, "subject", "placeholder"),
    ({"case_id": True}, "case_id", "must be an integer, a string or null, got bool"),
    ({"case_id": 1.5}, "case_id", "got float"),
    ({"case_id": [1]}, "case_id", "got list"),
    ({"case_id": ""}, "case_id", "must not be blank"),
    ({"case_id": "x" * (MAX_FIELD_CHARS + 1)}, "case_id", "the limit is 500"),
    ({"case_id": "\x00"}, "case_id", "NUL"),
]


@pytest.mark.parametrize("overrides, field, fragment", BAD_FIELDS)
def test_each_rule_raises_request_error_naming_the_field(
    overrides: dict[str, Any], field: str, fragment: str
) -> None:
    with pytest.raises(RequestError) as info:
        make(**overrides)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.field == field
    assert err.record is None
    assert fragment in str(err)
    assert str(err).startswith(f"field '{field}': ")


def test_validate_classmethod_returns_normalised_fields() -> None:
    assert EditRequest.validate("The X is ", " X", " y ", None, 3) == ("The {} is", "X", "y", None, 3)
    with pytest.raises(RequestError):
        EditRequest.validate("The X is", "X", "y", "Y")


# ------------------------------------------------------------------------------------ RequestError


def test_request_error_message_names_record_and_field() -> None:
    err = RequestError(
        "must not be blank", record=7, field="target_new", source="requests.jsonl", unit="line"
    )
    assert str(err) == "requests.jsonl line 7, field 'target_new': must not be blank"
    assert (err.record, err.field, err.reason) == (7, "target_new", "must not be blank")
    assert str(RequestError("bad", record=3, unit="index")) == "index 3: bad"
    assert str(RequestError("bad", field="subject")) == "field 'subject': bad"
    assert str(RequestError("bad")) == "bad"


def test_request_error_pickles() -> None:
    err = RequestError("must not be blank", record=7, field="target_new", source="r.jsonl", unit="line")
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err)
    assert (back.record, back.field, back.source, back.unit) == (7, "target_new", "r.jsonl", "line")


# ------------------------------------------------------------------------------------------- parsing


def test_parse_our_form() -> None:
    assert parse_request(DARRIEUX) == make()
    minimal = parse_request({"prompt": "{} is", "subject": "X", "target_new": "y"})
    assert (minimal.target_true, minimal.case_id) == (None, None)


def test_parse_compact_counterfact_form() -> None:
    assert parse_request(COMPACT) == make()


def test_parse_rome_form() -> None:
    assert parse_request(ROME) == make()
    plain = {"case_id": 1, "requested_rewrite": {"prompt": "{} is", "subject": "X", "target_new": "y"}}
    assert parse_request(plain) == EditRequest("{} is", "X", "y", None, 1)


@pytest.mark.parametrize(
    "obj, field, fragment",
    [
        ({"subject": "X", "target_new": "y"}, "prompt", "missing required field"),
        ({"prompt": "{} is", "target_new": "y"}, "subject", "missing required field"),
        ({"prompt": "{} is", "subject": "X"}, "target_new", "missing required field"),
        ({**DARRIEUX, "colour": "red"}, "colour", "unknown field"),
        ({**DARRIEUX, "target_true": "English"}, "target_new", "must differ"),
        ({**COMPACT, "ground_truth": " "}, "ground_truth", "must not be blank"),
        ({**COMPACT, "ground_truth": "english"}, "target_new", "must differ"),
        ({**COMPACT, "target_true": "French"}, "target_true", "not both"),
        ({k: v for k, v in COMPACT.items() if k != "subject"}, "subject", "missing required field"),
        ({**COMPACT, "prompt": "The mother tongue of Michel is"}, "prompt", "or the subject literally"),
        ({"requested_rewrite": "x"}, "requested_rewrite", "must be an object"),
        (
            {"requested_rewrite": {**ROME["requested_rewrite"], "target_new": {"id": "Q1"}}},
            "requested_rewrite.target_new.str",
            "missing required field",
        ),
        (
            {"requested_rewrite": {k: v for k, v in ROME["requested_rewrite"].items() if k != "target_new"}},
            "requested_rewrite.target_new",
            "missing required field",
        ),
        (
            {"requested_rewrite": {k: v for k, v in ROME["requested_rewrite"].items() if k != "prompt"}},
            "requested_rewrite.prompt",
            "missing required field",
        ),
        (
            {"requested_rewrite": {**ROME["requested_rewrite"], "subject": 3}},
            "requested_rewrite.subject",
            "must be a string",
        ),
        (
            {"requested_rewrite": {**ROME["requested_rewrite"], "target_true": {"str": "english"}}},
            "requested_rewrite.target_new",
            "must differ",
        ),
    ],
)
def test_parse_errors_name_the_field(obj: dict[str, Any], field: str, fragment: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_request(obj, 4, source="batch.jsonl", unit="line")
    assert info.value.field == field
    assert info.value.record == 4
    assert str(info.value).startswith(f"batch.jsonl line 4, field '{field}': ")
    assert fragment in str(info.value)


@pytest.mark.parametrize("obj", [None, [], "text", 3, 2.5, True, [DARRIEUX]])
def test_parse_non_object(obj: object) -> None:
    with pytest.raises(RequestError, match="record 2: must be a JSON object"):
        parse_request(obj, 2)


def test_to_dict_from_dict_round_trip() -> None:
    r = make()
    assert r.to_dict() == DARRIEUX
    assert EditRequest.from_dict(r.to_dict()) == r
    assert EditRequest.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    assert EditRequest.from_dict(COMPACT) == r


# ------------------------------------------------------------------------------------------ JSON Lines


def write(tmp_path: Path, lines: list[bytes], name: str = "requests.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines))
    return path


def good_line(**overrides: Any) -> bytes:
    return json.dumps({**DARRIEUX, **overrides}).encode()


def test_read_jsonl_all_forms_blank_lines_crlf_and_bom(tmp_path: Path) -> None:
    lines = [
        b"\xef\xbb\xbf" + good_line(),
        b"",
        b"   ",
        json.dumps(COMPACT).encode() + b"\r",
        json.dumps(ROME).encode(),
        b"",
    ]
    assert read_requests_jsonl(write(tmp_path, lines)) == [make(), make(), make()]
    assert read_requests_jsonl(str(write(tmp_path, [b""]))) == []


def test_read_jsonl_message_names_file_line_and_field(tmp_path: Path) -> None:
    lines = [good_line(case_id=i) for i in range(6)] + [good_line(target_new="  ")]
    with pytest.raises(RequestError) as info:
        read_requests_jsonl(write(tmp_path, lines))
    assert str(info.value) == "requests.jsonl line 7, field 'target_new': must not be blank"
    assert (info.value.record, info.value.field) == (7, "target_new")


@pytest.mark.parametrize(
    "bad, fragment",
    [
        (b"\xff\xfe{}", "invalid UTF-8 at byte 0"),
        (b'{"prompt": "caf\xc3"}', "invalid UTF-8"),
        (b'{"prompt": "\xed\xa0\x80"}', "invalid UTF-8"),  # an encoded surrogate
        (b"{not json", "not valid JSON"),
        (b'{"prompt": "a"', "not valid JSON"),
        (b"[" * 100_000, "not valid JSON"),
        (b"1" * 5000, "not valid JSON"),  # beyond Python's int-string limit
        (b"[1, 2]", "must be a JSON object, got list"),
        (b'"just a string"', "must be a JSON object, got str"),
        (b"null", "must be a JSON object, got NoneType"),
        (b'{"prompt": "\\u0000{} is", "subject": "X", "target_new": "y"}', "NUL"),
        (b'{"prompt": "{} is", "subject": "\\ud800", "target_new": "y"}', "lone surrogates"),
        (b'{"prompt": "{} is", "subject": "X", "target_new": "y", "case_id": 1.0}', "case_id"),
    ],
)
def test_read_jsonl_bad_line_names_the_line(tmp_path: Path, bad: bytes, fragment: str) -> None:
    path = write(tmp_path, [good_line(), b"", bad, good_line()])
    with pytest.raises(RequestError) as info:
        read_requests_jsonl(path)
    assert info.value.record == 3
    assert str(info.value).startswith("requests.jsonl line 3")
    assert fragment in str(info.value)


def test_write_read_round_trip(tmp_path: Path) -> None:
    requests = [make(), EditRequest("{| {} {x}", "Zoë", "naïve", None, "id-1"), EditRequest("{}", "X", "y")]
    path = tmp_path / "out.jsonl"
    write_requests_jsonl(requests, path)
    assert read_requests_jsonl(path) == requests


# ---------------------------------------------------------------------------------------- batches


def test_validate_batch_accepts_requests_and_dicts() -> None:
    assert validate_batch([make(), DARRIEUX, COMPACT, ROME]) == [make()] * 4
    assert validate_batch(iter([])) == []


def test_validate_batch_names_first_bad_index() -> None:
    with pytest.raises(RequestError) as info:
        validate_batch([make(), DARRIEUX, {**DARRIEUX, "subject": ""}, {**DARRIEUX, "prompt": 1}])
    assert (info.value.record, info.value.field) == (2, "subject")
    assert str(info.value) == "index 2, field 'subject': must not be blank"


@pytest.mark.parametrize(
    "batch, fragment",
    [
        ([make(), "text"], "index 1: must be an EditRequest or a dict, got str"),
        ([None], "index 0: must be an EditRequest or a dict, got NoneType"),
        (DARRIEUX, "expected a list of requests, got dict"),
        ("abc", "expected a list of requests, got str"),
        (make(), "expected a list of requests, got EditRequest"),
        (5, "expected a list of requests, got int"),
    ],
)
def test_validate_batch_bad_items(batch: Any, fragment: str) -> None:
    with pytest.raises(RequestError, match=fragment):
        validate_batch(batch)


# ------------------------------------------------------------------------------------------ properties

# Pieces that exercise the rules: placeholders, stray braces, blanks; the "dirty" ones add NUL and
# lone surrogates, which no valid request may contain.
CLEAN_TOKENS = ["{}", "{", "}", "{|", " ", "\t", "\n", "Paris", "paris", "é", "🙂"]
DIRTY_TOKENS = ["\x00", "\ud800", "\udfff"]
clean_texts = st.lists(
    st.one_of(st.text(st.characters(exclude_characters="\x00"), max_size=6), st.sampled_from(CLEAN_TOKENS)),
    max_size=6,
).map("".join)
dirty_texts = st.lists(
    st.one_of(
        st.text(st.characters(exclude_categories=()), max_size=6),
        st.sampled_from(CLEAN_TOKENS + DIRTY_TOKENS),
    ),
    max_size=6,
).map("".join)
texts = st.one_of(clean_texts, clean_texts, dirty_texts)
words = st.text(
    st.characters(categories=["L", "N", "P", "S", "Zs"], exclude_characters="{}"), min_size=1, max_size=12
)
long_texts = st.integers(MAX_FIELD_CHARS - 2, MAX_PROMPT_CHARS + 3).map(lambda n: "{}" + "a" * n)
non_strings = st.one_of(
    st.none(),
    st.integers(),
    st.floats(),
    st.booleans(),
    st.binary(max_size=4),
    st.lists(st.integers(), max_size=2),
)
# weighted choice (st.one_of flattens nested one_of, which would weight every non-string type alone)
FIELD_BRANCHES = [words] * 5 + [clean_texts] * 2 + [dirty_texts, long_texts, non_strings]
field_values = st.sampled_from(FIELD_BRANCHES).flatmap(lambda strategy: strategy)
case_ids = st.one_of(st.none(), st.integers(), texts, st.floats(), st.booleans())


@st.composite
def prompts_and_subjects(draw: st.DrawFn) -> tuple[Any, Any]:
    """A subject and a prompt that holds '{}', holds the subject literally, or is arbitrary."""
    subject = draw(field_values)
    before, after = draw(texts), draw(texts)
    kind = draw(st.sampled_from(["template", "literal", "arbitrary"]))
    if kind == "template":
        prompt: Any = before + "{}" + after
    elif kind == "literal" and isinstance(subject, str):
        prompt = before + subject + after
    else:
        prompt = draw(field_values)
    return prompt, subject


PROPERTY_SETTINGS = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_valid(r: EditRequest) -> None:
    assert r.prompt.count("{}") == 1
    assert r.prefix + "{}" + r.suffix == r.prompt
    assert r.prefix + r.subject + r.suffix == r.text
    start, end = r.subject_span
    assert r.text[start:end] == r.subject
    assert start == len(r.prefix)
    assert r.subject == r.subject.strip() and r.subject
    assert r.target_new == r.target_new.strip() and r.target_new
    assert r.target_new_text == " " + r.target_new
    assert r.target_true is None or r.target_true.casefold() != r.target_new.casefold()
    assert r.prompt == r.prompt.rstrip()
    assert EditRequest(**r.to_dict()) == r
    assert EditRequest.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    for value in (r.text, r.subject, r.target_new):
        value.encode("utf-8")
        assert "\x00" not in value


@PROPERTY_SETTINGS
@given(
    prompt_subject=prompts_and_subjects(),
    target_new=field_values,
    target_true=st.one_of(st.none(), field_values),
    case_id=case_ids,
)
def test_property_arbitrary_fields(
    prompt_subject: tuple[Any, Any], target_new: Any, target_true: Any, case_id: Any
) -> None:
    prompt, subject = prompt_subject
    try:
        r = EditRequest(prompt, subject, target_new, target_true, case_id)
    except RequestError as err:
        event(f"rejected: {err.field}")
        assert err.field in ("prompt", "subject", "target_new", "target_true", "case_id")
        return
    event("valid")
    check_valid(r)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=texts, subject=texts, after=texts, target=texts)
def test_property_literal_subject_round_trips(before: str, subject: str, after: str, target: str) -> None:
    prompt = before + subject + after
    try:
        r = EditRequest(prompt, subject, target)
    except RequestError as err:
        event(f"rejected: {err.field}")
        return
    event("valid")
    check_valid(r)
    if "{}" not in prompt:
        # the first occurrence of the (stripped) subject is its place; the text is the prompt itself
        assert r.text == prompt.rstrip()
        assert r.text.find(r.subject) == r.subject_span[0]


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), texts)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(texts, inner, max_size=3)),
    max_leaves=8,
)
known_keys = st.sampled_from(
    [
        "prompt",
        "subject",
        "target_new",
        "target_true",
        "case_id",
        "ground_truth",
        "rephrase_prompt",
        "requested_rewrite",
        "str",
        "colour",
    ]
)
request_like = st.recursive(
    st.one_of(json_scalars, texts),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.one_of(known_keys, texts), inner, max_size=6)
    ),
    max_leaves=12,
)


@PROPERTY_SETTINGS
@given(
    obj=st.one_of(
        request_like,
        json_values,
        st.fixed_dictionaries(
            {
                "prompt": st.builds(lambda a, b: a + "{}" + b, texts, texts),
                "subject": texts,
                "target_new": texts,
            },
            optional={
                "target_true": texts,
                "case_id": case_ids,
                "ground_truth": texts,
                "rephrase_prompt": st.just("r"),
                "colour": st.just("red"),
            },
        ),
        st.builds(
            lambda p, s, t, c: {
                "case_id": c,
                "requested_rewrite": {"prompt": p, "subject": s, "target_new": {"str": t}},
            },
            st.builds(lambda a, b: a + "{}" + b, texts, texts),
            texts,
            texts,
            case_ids,
        ),
    )
)
def test_property_parse_request_arbitrary_objects(obj: Any) -> None:
    try:
        r = parse_request(obj, 5)
    except RequestError as err:
        event("rejected")
        assert err.record == 5
        return
    event("valid")
    check_valid(r)


def mutate(line: bytes, data: st.DataObject) -> bytes:
    if not line:
        return line
    position = data.draw(st.integers(0, len(line) - 1))
    return line[:position] + data.draw(st.binary(min_size=0, max_size=3)) + line[position + 1 :]


valid_lines = st.builds(
    lambda p, s, t: json.dumps(
        {"prompt": p + " {}", "subject": s, "target_new": t}, ensure_ascii=False
    ).encode("utf-8", "surrogatepass"),
    texts,
    texts,
    texts,
)
ascii_lines = st.builds(
    lambda p, s, t: json.dumps({"prompt": p, "subject": s, "target_new": t}).encode(), texts, texts, texts
)


def is_blank(line: bytes, number: int) -> bool:
    """Whether the reader skips physical line ``number`` (valid UTF-8 and only whitespace; a byte order
    mark opening the file does not count)."""
    if number == 1:
        line = line.removeprefix(b"\xef\xbb\xbf")
    try:
        return not line.decode("utf-8").strip()
    except UnicodeDecodeError:
        return False


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_jsonl_arbitrary_bytes(data: st.DataObject) -> None:
    kinds = st.one_of(
        st.binary(max_size=40),
        valid_lines,
        ascii_lines,
        st.just(good_line()),
        st.sampled_from([b"", b"  ", b"\r", b"\x1c", "\u2028".encode()]),
    )
    lines = data.draw(st.lists(kinds, max_size=6))
    if lines and data.draw(st.booleans()):
        index = data.draw(st.integers(0, len(lines) - 1))
        lines[index] = mutate(lines[index], data)
    content = b"\n".join(lines)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "fuzz.jsonl")
        Path(path).write_bytes(content)
        try:
            requests = read_requests_jsonl(path)
        except RequestError as err:
            event("rejected")
            physical = content.split(b"\n")
            assert err.record is not None and 1 <= err.record <= len(physical)
            assert str(err).startswith(f"fuzz.jsonl line {err.record}")
            assert not is_blank(physical[err.record - 1], err.record)  # never blames a blank line
            return
    event("valid")
    physical = content.split(b"\n")
    assert len(requests) == sum(not is_blank(line, n) for n, line in enumerate(physical, start=1))
    for r in requests:
        check_valid(r)


@settings(max_examples=300, deadline=None)
@given(
    prompt=texts, subject=words, target_new=words, target_true=st.one_of(st.none(), words), case_id=case_ids
)
def test_property_to_dict_from_dict(
    prompt: str, subject: str, target_new: str, target_true: str | None, case_id: Any
) -> None:
    try:
        r = EditRequest("Q " + prompt.replace("{}", "") + " {} ?", subject, target_new, target_true, case_id)
    except RequestError:
        event("rejected")
        return
    event("valid")
    d = r.to_dict()
    assert set(d) == {"prompt", "subject", "target_new", "target_true", "case_id"}
    assert EditRequest.from_dict(d) == r
    assert validate_batch([d, r]) == [r, r]
