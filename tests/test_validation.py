"""Every entry point refuses malformed requests whole (property-based).

Entry points: the JSON Lines reader (:func:`read_requests_jsonl`), the API (``editor.edit``) and the command
line (``rlsedit edit``). A bad request is one with a missing field, a field of the wrong type, a prompt
holding neither ``{}`` nor the subject, a blank target, ``target_new`` equal to ``target_true``, an absurd
length, NUL characters or lone surrogates, an unknown field; a bad line is also one that is not UTF-8 or not
JSON. In every case:

* the error is a :class:`RequestError` naming the record (line number, or index in an API call) and the
  field;
* a batch holding one bad request is refused whole: the weights are byte-identical, the editor's state is
  unchanged, the run directory (manifest, state, blobs, journal) is byte-identical;
* the command line exits with status 2 without creating or touching the run directory.

Bad inputs tried per run (hypothesis ``max_examples``): 1000 (reader) + 300 (API, mixed batches) +
100 (API, non-request items) + 300 (command line, in process) = 1700, plus 15 fixed cases below.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tiny_models
from rlsedit import cli
from rlsedit.editors import make_editor
from rlsedit.requests import MAX_FIELD_CHARS, MAX_PROMPT_CHARS, RequestError, read_requests_jsonl

log = logging.getLogger(__name__)

GOOD: list[dict[str, Any]] = [
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"},
    {"prompt": "The Eiffel Tower is located in", "subject": "Eiffel Tower", "target_new": "Rome"},
    {"prompt": "{} plays the sport of", "subject": "Michael Jordan", "target_new": "soccer", "case_id": 3},
    {"prompt": "The capital of {} is", "subject": "Japan", "target_new": "Paris", "target_true": "Tokyo"},
    {"prompt": "The twin city of {} is", "subject": "Lyon", "target_new": "Seattle", "target_true": "Beirut"},
]
REQUIRED = ("prompt", "subject", "target_new")
TEXT_FIELDS = ("prompt", "subject", "target_new", "target_true")
SETTINGS = {"layers": [1, 2], "steps": 2, "n_templates": 0, "stats_samples": 8, "stats_max_len": 16}
FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---------------------------------------------------------------------------------------------- strategies

_WHITESPACE = st.text(alphabet=" \t\n\r\x0b\x0c\u00a0\u2003\u3000", max_size=6)
_NEITHER_STRING_NOR_NONE = st.one_of(
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.text(max_size=3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
)
_NOT_A_STRING = st.one_of(st.none(), _NEITHER_STRING_NOR_NONE)


def _bad_prompt(subject: str) -> st.SearchStrategy[str]:
    """Prompts holding neither ``{}`` nor the subject, ``{}`` more than once, or absurdly long."""
    no_place = st.text(max_size=80).filter(lambda t: "{}" not in t and subject not in t)
    twice = st.tuples(st.text(max_size=10), st.text(max_size=10), st.text(max_size=10)).map(
        lambda p: f"{p[0]}{{}}{p[1]}{{}}{p[2]}"
    )
    too_long = st.integers(MAX_PROMPT_CHARS - 1, MAX_PROMPT_CHARS + 5000).map(lambda n: "{} " + "x" * n)
    return st.one_of(no_place, twice, too_long)


@st.composite
def bad_requests(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """A request dict with exactly one defect, and the field the error must name."""
    obj = dict(draw(st.sampled_from(GOOD)))
    kind = draw(
        st.sampled_from(
            [
                "missing",
                "type",
                "prompt",
                "blank",
                "same",
                "long",
                "nul",
                "surrogate",
                "unknown",
                "subject_placeholder",
                "case_id",
            ]
        )
    )
    if kind == "missing":
        field = draw(st.sampled_from(REQUIRED))
        del obj[field]
    elif kind == "type":
        field = draw(st.sampled_from(TEXT_FIELDS))
        obj[field] = draw(_NOT_A_STRING if field != "target_true" else _NEITHER_STRING_NOR_NONE)
    elif kind == "prompt":
        field = "prompt"
        obj["prompt"] = draw(_bad_prompt(obj["subject"]))
    elif kind == "blank":
        field = draw(st.sampled_from(("subject", "target_new", "target_true")))
        obj[field] = draw(_WHITESPACE)
    elif kind == "same":
        field = "target_new"
        true = draw(st.text(min_size=1, max_size=20).filter(lambda t: t.strip() and "\x00" not in t))
        true = true.encode("utf-8", "replace").decode("utf-8")
        obj["target_true"] = true
        swap = draw(st.booleans())
        obj["target_new"] = draw(_WHITESPACE) + (true.swapcase() if swap else true) + draw(_WHITESPACE)
        if obj["target_new"].strip().casefold() != true.strip().casefold():  # swapcase is not always
            obj["target_new"] = true  # an involution under casefold (e.g. 'ß'); keep the defect
    elif kind == "long":
        field = draw(st.sampled_from(("subject", "target_new", "target_true")))
        obj[field] = "y" * draw(st.integers(MAX_FIELD_CHARS + 1, MAX_FIELD_CHARS + 20_000))
    elif kind == "nul":
        field = draw(st.sampled_from(TEXT_FIELDS))
        base = obj.get(field) or "French"
        cut = draw(st.integers(0, len(base)))
        obj[field] = base[:cut] + "\x00" + base[cut:]
    elif kind == "surrogate":
        field = draw(st.sampled_from(TEXT_FIELDS))
        base = obj.get(field) or "French"
        cut = draw(st.integers(0, len(base)))
        obj[field] = base[:cut] + chr(draw(st.integers(0xD800, 0xDFFF))) + base[cut:]
    elif kind == "unknown":
        field = draw(
            st.text(min_size=1, max_size=12).filter(
                lambda k: (
                    k not in ("prompt", "subject", "target_new", "target_true", "case_id")
                    and k
                    not in ("ground_truth", "rephrase_prompt", "locality_prompt", "locality_ground_truth")
                    and k != "requested_rewrite"
                )
            )
        )
        obj[field] = draw(st.text(max_size=5))
    elif kind == "subject_placeholder":
        field = "subject"
        obj["subject"] = draw(st.text(max_size=5)) + "{}" + draw(st.text(max_size=5))
        obj["prompt"] = "{} is"
    else:
        field = "case_id"
        obj["case_id"] = draw(
            st.one_of(
                st.booleans(), st.floats(allow_nan=False), st.lists(st.integers(), max_size=2), _WHITESPACE
            )
        )
    return obj, field


def _good_list(draw: st.DrawFn, min_size: int = 0) -> list[dict[str, Any]]:
    return draw(st.lists(st.sampled_from(GOOD), min_size=min_size, max_size=5))


def _json_line(obj: dict[str, Any]) -> bytes:
    """One JSON line; lone surrogates are written as ``\\udxxx`` escapes (ensure_ascii)."""
    return json.dumps(obj, ensure_ascii=True).encode("ascii")


@st.composite
def bad_lines(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """A line that must be refused, and the field the error must name (None: the whole line is bad)."""
    kind = draw(st.sampled_from(["request", "request", "utf8", "json", "not_object"]))
    if kind == "request":
        obj, field = draw(bad_requests())
        return _json_line(obj), field
    good = _json_line(draw(st.sampled_from(GOOD)))
    if kind == "utf8":
        bad = draw(
            st.sampled_from(
                [b"\xff", b"\xfe", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\x80", b"\xc0\xaf"]
            )
        )
        cut = draw(st.integers(1, len(good) - 1))
        return good[:cut] + bad + good[cut:], None
    if kind == "json":
        line = draw(
            st.one_of(
                st.integers(1, len(good) - 1).map(lambda n: good[:n]),  # truncated object
                st.just(good + b","),
                st.just(good.replace(b":", b"=", 1)),
                st.text(alphabet="abcxyz{}[]:,'", min_size=1, max_size=20)
                .filter(lambda t: not _is_json(t))
                .map(str.encode),
            )
        )
        return line, None
    value = draw(
        st.one_of(st.integers(), st.lists(st.integers(), max_size=3), st.text(max_size=5), st.none())
    )
    return json.dumps(value).encode(), None


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ helpers


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> content): the run directory byte for byte."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def weights_bytes(model: torch.nn.Module) -> dict[str, bytes]:
    """Every parameter's raw bytes."""
    return {
        k: v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        for k, v in model.state_dict().items()
    }


def editor_state(editor: Any) -> tuple[Any, dict[str, bytes]]:
    """The editor's batches (deep copy) and its layer state's raw bytes."""
    state = {
        f"{layer}.{k}": t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        for layer, st_ in editor.layer_state.items()
        for k, t in st_.items()
    }
    return copy.deepcopy(editor.batches), state


def assert_error_names(err: RequestError, record: int | None, unit: str, field: str | None) -> None:
    """The error names the record (line or index) and, when known, the field."""
    assert err.record == record, (str(err), record)
    assert err.unit == unit
    assert f"{unit} {record}" in str(err)
    if field is not None:
        assert err.field == field, (str(err), field)
        shown = field if len(field) <= 60 else field[:57] + "..."
        assert f"field {shown!r}" in str(err)


@contextlib.contextmanager
def captured_stderr() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(io.StringIO()):
        yield buf


# ----------------------------------------------------------------------------------------- JSONL reader


@settings(FAST, max_examples=1000)
@given(data=st.data())
def test_jsonl_reader_refuses_any_bad_line(data: st.DataObject) -> None:
    """Good lines around one bad line: the whole file is refused, naming the bad line and its field."""
    before = [_json_line(o) for o in _good_list(data.draw)]
    after = [_json_line(o) for o in _good_list(data.draw)]
    blanks = data.draw(st.integers(0, 2))
    line, field = data.draw(bad_lines())
    lines = before + [b""] * blanks + [line] + after
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "requests.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        with pytest.raises(RequestError) as info:
            read_requests_jsonl(path)
    assert_error_names(info.value, len(before) + blanks + 1, "line", field)
    assert str(info.value).startswith("requests.jsonl line ")


# ---------------------------------------------------------------------------------------------- the API


@pytest.fixture(scope="module")
def editor_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """An RLSEdit editor on a tiny Llama, attached to a run directory, with one batch applied."""
    model, tok = tiny_models.tiny_model("llama", seed=1)
    run = tmp_path_factory.mktemp("api") / "run"
    editor = make_editor("rlsedit", model, tok, stats_dir=run.parent / "stats", **SETTINGS)
    editor.attach(run)
    editor.edit(GOOD[:2])
    return editor, run


def _assert_nothing_changed(
    editor: Any,
    run: Path,
    weights: dict[str, bytes],
    state: tuple[Any, dict[str, bytes]],
    files: dict[str, bytes],
) -> None:
    assert weights_bytes(editor.model) == weights
    assert editor_state(editor) == state
    assert tree_bytes(run) == files


@settings(FAST, max_examples=300)
@given(data=st.data())
def test_api_refuses_a_batch_with_one_bad_request(editor_run: tuple[Any, Path], data: st.DataObject) -> None:
    """editor.edit with one bad request among good ones raises RequestError naming its index and field;
    nothing changes (weights, editor state, run directory)."""
    editor, run = editor_run
    before = _good_list(data.draw)
    after = _good_list(data.draw)
    bad, field = data.draw(bad_requests())
    batch = before + [bad] + after
    batch_size = data.draw(st.one_of(st.none(), st.integers(1, len(batch))))
    weights, state, files = weights_bytes(editor.model), editor_state(editor), tree_bytes(run)
    with pytest.raises(RequestError) as info:
        editor.edit(batch, batch_size=batch_size)
    assert_error_names(info.value, len(before), "index", field)
    _assert_nothing_changed(editor, run, weights, state, files)


@settings(FAST, max_examples=100)
@given(
    data=st.data(),
    item=st.one_of(
        st.none(),
        st.integers(),
        st.text(max_size=5),
        st.lists(st.integers(), max_size=2),
        st.binary(max_size=4),
    ),
)
def test_api_refuses_items_that_are_not_requests(
    editor_run: tuple[Any, Path], data: st.DataObject, item: object
) -> None:
    editor, run = editor_run
    before = _good_list(data.draw)
    weights, state, files = weights_bytes(editor.model), editor_state(editor), tree_bytes(run)
    with pytest.raises(RequestError) as info:
        editor.edit([*before, item, GOOD[0]])
    assert_error_names(info.value, len(before), "index", None)
    _assert_nothing_changed(editor, run, weights, state, files)


@pytest.mark.parametrize("requests", [None, "The capital of {} is", GOOD[0], 5, [], iter([])])
def test_api_refuses_what_is_not_a_list_of_requests(editor_run: tuple[Any, Path], requests: Any) -> None:
    editor, run = editor_run
    weights, state, files = weights_bytes(editor.model), editor_state(editor), tree_bytes(run)
    with pytest.raises(RequestError):
        editor.edit(requests)
    _assert_nothing_changed(editor, run, weights, state, files)


def test_api_refuses_a_request_too_long_for_the_model(tmp_path: Path) -> None:
    """Within the character limits but longer than the model's context (a GPT-2 with 128 positions): a clear
    RequestError before anything runs, not an IndexError from the position embedding."""
    model, tok = tiny_models.tiny_model("gpt2", seed=0)
    editor = make_editor("rlsedit", model, tok, stats_dir=tmp_path / "stats", **SETTINGS)
    editor.attach(tmp_path / "run")
    long = {"prompt": "The capital of {} is" + " word" * 300, "subject": "Japan", "target_new": "Paris"}
    weights, state, files = weights_bytes(model), editor_state(editor), tree_bytes(tmp_path / "run")
    with pytest.raises(RequestError, match="tokens long") as info:
        editor.edit([GOOD[0], long])
    assert_error_names(info.value, 1, "index", "prompt")
    _assert_nothing_changed(editor, tmp_path / "run", weights, state, files)


# ------------------------------------------------------------------------------------------ command line


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama and its tokenizer saved with save_pretrained (what --model takes as a local path)."""
    path = tmp_path_factory.mktemp("model") / "tiny-llama"
    model, tok = tiny_models.tiny_model("llama", seed=2)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def edit_argv(model: Path, requests: Path, run: Path, *extra: str) -> list[str]:
    """``rlsedit edit`` arguments with tiny settings."""
    sets = [f"--set={k}={json.dumps(v)}" for k, v in SETTINGS.items()]
    return [
        "edit",
        "--model",
        str(model),
        "--requests",
        str(requests),
        "--run",
        str(run),
        "--batch-size",
        "2",
        "--stats",
        str(run.parent / "stats"),
        *sets,
        *extra,
    ]


@pytest.fixture(scope="module")
def cli_run(saved_model: Path) -> Path:
    """A run directory made by ``rlsedit edit`` (in process) with two batches applied."""
    run = saved_model.parent / "run"
    requests = saved_model.parent / "good.jsonl"
    requests.write_bytes(b"\n".join(_json_line(o) for o in GOOD[:4]) + b"\n")
    with captured_stderr():
        assert cli.main(edit_argv(saved_model, requests, run)) == 0
    return run


@settings(FAST, max_examples=300)
@given(data=st.data())
def test_cli_refuses_a_file_with_one_bad_line(saved_model: Path, cli_run: Path, data: st.DataObject) -> None:
    """``rlsedit edit`` on a file with one bad line: exit status 2, a one-line message naming the file, the
    line and the field, the existing run untouched and no new run created."""
    before = [_json_line(o) for o in _good_list(data.draw)]
    line, field = data.draw(bad_lines())
    lines = [*before, line, *[_json_line(o) for o in _good_list(data.draw)]]
    files = tree_bytes(cli_run)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bad.jsonl"
        path.write_bytes(b"\n".join(lines))
        for run in (cli_run, Path(tmp) / "new-run"):
            with captured_stderr() as err:
                status = cli.main(edit_argv(saved_model, path, run))
            message = err.getvalue()
            assert status == 2, message
            assert message.startswith(f"rlsedit: invalid request: bad.jsonl line {len(before) + 1}"), message
            if field is not None:
                shown = field if len(field) <= 60 else field[:57] + "..."
                assert f"field {shown!r}" in message
            assert "Traceback" not in message
        assert not (Path(tmp) / "new-run").exists()
    assert tree_bytes(cli_run) == files


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"", "no requests"),
        (b"\n \n\r\n", "no requests"),
        (b'{"prompt": "The capital of {} is", "subject": "Japan"}\n', "line 1, field 'target_new'"),
        (b'\xef\xbb\xbf{"prompt": 1, "subject": "Japan", "target_new": "Paris"}\n', "line 1, field 'prompt'"),
    ],
)
def test_cli_refuses_empty_or_bad_files_before_creating_a_run(
    saved_model: Path, tmp_path: Path, content: bytes, fragment: str
) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_bytes(content)
    with captured_stderr() as err:
        status = cli.main(edit_argv(saved_model, path, tmp_path / "run"))
    assert status == 2
    assert fragment in err.getvalue()
    assert not (tmp_path / "run").exists()


def test_cli_refuses_a_request_too_long_for_the_model(
    saved_model: Path, cli_run: Path, tmp_path: Path
) -> None:
    """A request that passes the character limits but not the model's context: exit 2, naming the line,
    nothing created or changed."""
    path = tmp_path / "long.jsonl"
    long = {"prompt": "In the year {}," + " the word" * 200, "subject": "2024", "target_new": "ended"}
    path.write_bytes(b"\n".join([_json_line(GOOD[0]), b"", _json_line(long)]) + b"\n")
    files = tree_bytes(cli_run)
    for run in (cli_run, tmp_path / "run"):
        with captured_stderr() as err:
            status = cli.main(edit_argv(saved_model, path, run))
        assert status == 2, err.getvalue()
        assert "long.jsonl line 3, field 'prompt'" in err.getvalue()
        assert "tokens long" in err.getvalue()
    assert tree_bytes(cli_run) == files
    assert not (tmp_path / "run").exists()


def test_cli_refuses_a_bad_batch_size(saved_model: Path, tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_bytes(_json_line(GOOD[0]) + b"\n")
    argv = edit_argv(saved_model, path, tmp_path / "run")
    argv[argv.index("--batch-size") + 1] = "0"
    with captured_stderr() as err, pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "--batch-size" in err.getvalue()
    assert not (tmp_path / "run").exists()


def _run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUTF8": "1"}
    return subprocess.run(
        [sys.executable, "-m", "rlsedit", *argv], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.parametrize(
    "bad, fragment",
    [
        (b"\xff\xfe not utf-8", "line 2: invalid UTF-8"),
        (b'{"prompt": "The capital of {} is", "subject": "Japan", "target_new": " "}', "field 'target_new'"),
    ],
)
def test_cli_subprocess_exit_status_is_2(
    saved_model: Path, cli_run: Path, tmp_path: Path, bad: bytes, fragment: str
) -> None:
    """The real command: exit status 2, one line on stderr, no traceback, the run untouched."""
    path = tmp_path / "requests.jsonl"
    path.write_bytes(_json_line(GOOD[0]) + b"\n" + bad + b"\n" + _json_line(GOOD[1]) + b"\n")
    files = tree_bytes(cli_run)
    result = _run_cli(*edit_argv(saved_model, path, cli_run))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "rlsedit: invalid request: requests.jsonl line 2" in result.stderr
    assert fragment in result.stderr
    assert tree_bytes(cli_run) == files
