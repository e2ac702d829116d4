"""Edit requests: one fact to write into a model, validated once at the boundary.

An :class:`EditRequest` follows the ROME convention: ``prompt`` is a template holding ``{}`` exactly
once, in the subject's place, e.g. ``EditRequest("The mother tongue of {} is", "Danielle Darrieux",
"English", "French")``. A prompt without ``{}`` that contains the subject literally is accepted too
(the compact CounterFact form); the first occurrence of the subject is taken as its place and the
prompt is stored in the ``{}`` form. Templates are never passed to ``str.format``: the text is split
around the single ``{}``, so other braces (``{|`` in wiki markup, ``{x}``) are plain text.

Targets are stored stripped and scored as a continuation of the filled prompt with one leading space
(:attr:`EditRequest.target_new_text`). For the same reason trailing whitespace is removed from the
prompt.

Everything that reads requests from outside (:func:`parse_request`, :func:`read_requests_jsonl`,
:func:`validate_batch`) raises :class:`RequestError` (a ``ValueError``) and nothing else on bad input;
its message names the record (line or index) and the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_FIELD_CHARS",
    "MAX_PROMPT_CHARS",
    "PLACEHOLDER",
    "EditRequest",
    "RequestError",
    "parse_request",
    "read_requests_jsonl",
    "read_requests_jsonl_numbered",
    "validate_batch",
    "write_requests_jsonl",
]

#: Longest prompt accepted (characters, as given).
MAX_PROMPT_CHARS = 2000
#: Longest subject, target or string case id accepted (characters).
MAX_FIELD_CHARS = 500
#: The subject's place in a prompt template.
PLACEHOLDER = "{}"

_OUR_FIELDS = ("prompt", "subject", "target_new", "target_true", "case_id")
_COMPACT_MARKERS = (
    "ground_truth",
    "rephrase_prompt",
    "rephrase",
    "locality_prompt",
    "locality_ground_truth",
    "locality",
    "portability",
)
_NAME_LIMIT = 60  # longest field name quoted in a message


def _short(name: object) -> str:
    text = name if isinstance(name, str) else repr(name)
    return text if len(text) <= _NAME_LIMIT else text[: _NAME_LIMIT - 3] + "..."


def _rebuild_error(
    reason: str, record: int | None, field: str | None, source: str | None, unit: str
) -> RequestError:
    return RequestError(reason, record=record, field=field, source=source, unit=unit)


class RequestError(ValueError):
    """A request (or a line or item holding one) is invalid.

    Attributes: ``reason`` (what is wrong), ``record`` (line number, 1-based, or batch index, 0-based;
    ``None`` when not known), ``field`` (field name or ``None``), ``source`` (e.g. a file name) and
    ``unit`` (``"line"``, ``"index"`` or ``"record"``). The message names all that is known, e.g.
    ``requests.jsonl line 7, field 'target_new': must not be blank``.
    """

    def __init__(
        self,
        reason: str,
        *,
        record: int | None = None,
        field: str | None = None,
        source: str | None = None,
        unit: str = "record",
    ) -> None:
        self.reason = reason
        self.record = record
        self.field = field
        self.source = source
        self.unit = unit
        super().__init__(self._format())

    def _format(self) -> str:
        where = self.source or ""
        if self.record is not None:
            where = f"{where} {self.unit} {self.record}".strip()
        if self.field is not None:
            named = f"field {_short(self.field)!r}"
            where = f"{where}, {named}" if where else named
        return f"{where}: {self.reason}" if where else self.reason

    def located(self, record: int | None, *, source: str | None = None, unit: str = "record") -> RequestError:
        """The same error with a record (and source) attached."""
        return RequestError(self.reason, record=record, field=self.field, source=source, unit=unit)

    def renamed(self, names: Mapping[str, str]) -> RequestError:
        """The same error with its field renamed through ``names`` (for input forms that name fields
        differently from :class:`EditRequest`)."""
        field = names.get(self.field, self.field) if self.field is not None else None
        return RequestError(self.reason, record=self.record, field=field, source=self.source, unit=self.unit)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_error, (self.reason, self.record, self.field, self.source, self.unit))


def _check_text(value: object, field: str, limit: int) -> str:
    if not isinstance(value, str):
        raise RequestError(f"must be a string, got {type(value).__name__}", field=field)
    if len(value) > limit:
        raise RequestError(f"is {len(value)} characters long; the limit is {limit}", field=field)
    if "\x00" in value:
        raise RequestError("must not contain NUL characters", field=field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError("must not contain lone surrogates (invalid Unicode)", field=field) from None
    return str(value)


def _check_target(value: object, field: str) -> str:
    text = _check_text(value, field, MAX_FIELD_CHARS).strip()
    if not text:
        raise RequestError("must not be blank", field=field)
    return text


def _check_case_id(value: object) -> int | str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise RequestError(
            f"must be an integer, a string or null, got {type(value).__name__}", field="case_id"
        )
    if isinstance(value, int):
        return int(value)
    text = _check_text(value, "case_id", MAX_FIELD_CHARS)
    if not text.strip():
        raise RequestError("must not be blank", field="case_id")
    return text


def _template(prompt: str, subject: str) -> str:
    """The prompt in the ``{}`` form (see :class:`EditRequest`)."""
    count = prompt.count(PLACEHOLDER)
    if count > 1:
        raise RequestError(f"must contain '{{}}' exactly once, found it {count} times", field="prompt")
    if count == 1:
        template = prompt
    else:
        start = prompt.find(subject)
        if start < 0:
            raise RequestError(
                "must contain '{}' (the subject's place) or the subject literally", field="prompt"
            )
        template = prompt[:start] + PLACEHOLDER + prompt[start + len(subject) :]
    return template.rstrip()


@dataclass(frozen=True)
class EditRequest:
    """One edit: make the model continue ``prompt`` (filled with ``subject``) with ``target_new``.

    ``prompt`` holds ``{}`` exactly once (or the subject literally, normalised to the ``{}`` form);
    ``target_true`` is the fact being replaced, when known; ``case_id`` identifies the case in its
    data set. Invalid values raise :class:`RequestError` from the constructor.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: int | str | None = None

    def __post_init__(self) -> None:
        checked = self.validate(self.prompt, self.subject, self.target_new, self.target_true, self.case_id)
        for name, value in zip(_OUR_FIELDS, checked, strict=True):
            object.__setattr__(self, name, value)

    @classmethod
    def validate(
        cls,
        prompt: object,
        subject: object,
        target_new: object,
        target_true: object = None,
        case_id: object = None,
    ) -> tuple[str, str, str, str | None, int | str | None]:
        """Check and normalise the fields; return them in field order or raise :class:`RequestError`."""
        prompt = _check_text(prompt, "prompt", MAX_PROMPT_CHARS)
        subject = _check_text(subject, "subject", MAX_FIELD_CHARS).strip()
        if not subject:
            raise RequestError("must not be blank", field="subject")
        if PLACEHOLDER in subject:
            raise RequestError("must not contain the placeholder '{}'", field="subject")
        target_new = _check_target(target_new, "target_new")
        if target_true is not None:
            target_true = _check_target(target_true, "target_true")
            if target_new.casefold() == target_true.casefold():
                raise RequestError(
                    f"must differ from target_true (both are {_short(target_new)!r})", field="target_new"
                )
        case_id = _check_case_id(case_id)
        template = _template(prompt, subject)
        return template, subject, target_new, target_true, case_id

    @property
    def prefix(self) -> str:
        """Text before the subject."""
        return self.prompt[: self.prompt.index(PLACEHOLDER)]

    @property
    def suffix(self) -> str:
        """Text after the subject."""
        return self.prompt[self.prompt.index(PLACEHOLDER) + len(PLACEHOLDER) :]

    @property
    def text(self) -> str:
        """The prompt with the subject in its place."""
        return self.prefix + self.subject + self.suffix

    @property
    def subject_span(self) -> tuple[int, int]:
        """Character span ``(start, end)`` of the subject in :attr:`text`."""
        start = self.prompt.index(PLACEHOLDER)
        return start, start + len(self.subject)

    @property
    def target_new_text(self) -> str:
        """The new target as scored: a continuation with one leading space."""
        return " " + self.target_new

    @property
    def target_true_text(self) -> str | None:
        """The true target as scored (one leading space), or ``None``."""
        return None if self.target_true is None else " " + self.target_true

    @property
    def key(self) -> tuple[str, str]:
        """``(subject, prompt)``: two requests with the same key edit the same fact (a re-edit)."""
        return self.subject, self.prompt

    def to_dict(self) -> dict[str, Any]:
        """Our JSON form: ``prompt`` (``{}`` form), ``subject``, ``target_new``, ``target_true``,
        ``case_id``."""
        return {
            "prompt": self.prompt,
            "subject": self.subject,
            "target_new": self.target_new,
            "target_true": self.target_true,
            "case_id": self.case_id,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EditRequest:
        """Inverse of :meth:`to_dict`; accepts every form :func:`parse_request` does."""
        return parse_request(d)


def _required(obj: Mapping[Any, Any], key: str, field: str | None = None) -> Any:
    if key not in obj:
        raise RequestError("missing required field", field=field or key)
    return obj[key]


def _mapping(value: object, field: str) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise RequestError(f"must be an object, got {type(value).__name__}", field=field)
    return value


def _build(names: Mapping[str, str], **fields: Any) -> EditRequest:
    try:
        return EditRequest(**fields)
    except RequestError as err:
        raise err.renamed(names) from None


def _parse_ours(obj: Mapping[Any, Any]) -> EditRequest:
    for key in obj:
        if key not in _OUR_FIELDS:
            raise RequestError(
                f"unknown field; expected some of {', '.join(_OUR_FIELDS)} (or the "
                "CounterFact compact or ROME form)",
                field=_short(key),
            )
    return _build(
        {},
        prompt=_required(obj, "prompt"),
        subject=_required(obj, "subject"),
        target_new=_required(obj, "target_new"),
        target_true=obj.get("target_true"),
        case_id=obj.get("case_id"),
    )


def first_answer(value: object, field: str) -> object:
    """KnowEdit-style answers: a list (of strings, or of alias lists) stands for its first non-blank
    string; anything else is returned as given (and checked where it is used). RequestError for a list
    without one."""
    if not isinstance(value, list):
        return value
    for item in value:
        if isinstance(item, str) and item.strip():
            return item
        if isinstance(item, list):
            try:
                return first_answer(item, field)
            except RequestError:
                continue
    raise RequestError("a list of answers must hold a non-blank string", field=field)


def _parse_compact(obj: Mapping[Any, Any]) -> EditRequest:
    if "ground_truth" in obj and "target_true" in obj:
        raise RequestError("give either 'ground_truth' or 'target_true', not both", field="target_true")
    if "ground_truth" in obj:
        target_true, names = (
            first_answer(obj["ground_truth"], "ground_truth"),
            {"target_true": "ground_truth"},
        )
    else:
        target_true, names = obj.get("target_true"), {}
    return _build(
        names,
        prompt=_required(obj, "prompt"),
        subject=_required(obj, "subject"),
        target_new=first_answer(_required(obj, "target_new"), "target_new"),
        target_true=target_true,
        case_id=obj.get("case_id"),
    )


def _rome_target(rewrite: Mapping[Any, Any], key: str, required: bool) -> Any:
    field = f"requested_rewrite.{key}"
    if key not in rewrite:
        if required:
            raise RequestError("missing required field", field=field)
        return None
    value = rewrite[key]
    if isinstance(value, Mapping):
        return _required(value, "str", f"{field}.str")
    return value


def _parse_rome(obj: Mapping[Any, Any]) -> EditRequest:
    rewrite = _mapping(obj["requested_rewrite"], "requested_rewrite")
    names = {name: f"requested_rewrite.{name}" for name in ("prompt", "subject", "target_new", "target_true")}
    return _build(
        names,
        prompt=_required(rewrite, "prompt", "requested_rewrite.prompt"),
        subject=_required(rewrite, "subject", "requested_rewrite.subject"),
        target_new=_rome_target(rewrite, "target_new", True),
        target_true=_rome_target(rewrite, "target_true", False),
        case_id=obj.get("case_id"),
    )


def parse_request(
    obj: object, record: int | None = None, *, source: str | None = None, unit: str = "record"
) -> EditRequest:
    """Build an :class:`EditRequest` from a JSON object in one of three forms.

    - ROME's form, recognised by ``requested_rewrite``: ``{"case_id", "requested_rewrite": {"prompt",
      "subject", "target_new": {"str"}, "target_true": {"str"}}}``; other top-level fields (paraphrase
      prompts etc.) are ignored.
    - The compact CounterFact (MEND/EasyEdit) form and KnowEdit's records, recognised by any of
      ``ground_truth``, ``rephrase_prompt``, ``rephrase``, ``locality_prompt``, ``locality_ground_truth``,
      ``locality``, ``portability``: ``ground_truth`` is the true target; ``target_new`` and
      ``ground_truth`` may be lists of answers (the first non-blank string counts); the other extra
      fields are ignored here (:func:`rlsedit.load_cases` reads and validates them).
    - Otherwise our form, ``{"prompt", "subject", "target_new", "target_true"?, "case_id"?}``, strictly:
      an unknown field is an error.

    ``record``, ``source`` and ``unit`` only label errors (``"requests.jsonl line 7"``).
    """
    try:
        if not isinstance(obj, Mapping):
            raise RequestError(f"must be a JSON object, got {type(obj).__name__}")
        if "requested_rewrite" in obj:
            return _parse_rome(obj)
        if any(marker in obj for marker in _COMPACT_MARKERS):
            return _parse_compact(obj)
        return _parse_ours(obj)
    except RequestError as err:
        if record is None and source is None:
            raise
        raise err.located(record, source=source, unit=unit) from None


def read_requests_jsonl(path: str | PathLike[str]) -> list[EditRequest]:
    """Read one request per line (JSON Lines, strict UTF-8; blank lines skipped).

    All or nothing: the first bad line (invalid UTF-8, not JSON, not an object, or an invalid request)
    raises :class:`RequestError` naming the file and line (1-based); nothing is returned partially.
    """
    return [request for _, request in read_requests_jsonl_numbered(path)]


def read_requests_jsonl_numbered(path: str | PathLike[str]) -> list[tuple[int, EditRequest]]:
    """As :func:`read_requests_jsonl`, with each request's line number (1-based), so that a later check
    of request ``i`` (e.g. against a model) can name its line."""
    path = Path(path)
    data = path.read_bytes()
    source = path.name
    requests: list[tuple[int, EditRequest]] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.removesuffix(b"\r")
        if number == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise RequestError(
                f"invalid UTF-8 at byte {err.start}", record=number, source=source, unit="line"
            ) from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
            reason = err.msg if isinstance(err, json.JSONDecodeError) else type(err).__name__
            raise RequestError(
                f"not valid JSON ({reason})", record=number, source=source, unit="line"
            ) from None
        requests.append((number, parse_request(obj, number, source=source, unit="line")))
    return requests


def write_requests_jsonl(requests: Iterable[EditRequest], path: str | PathLike[str]) -> None:
    """Write requests in our form, one JSON object per line (UTF-8); :func:`read_requests_jsonl`
    reads them back equal."""
    lines = [json.dumps(request.to_dict(), ensure_ascii=False) + "\n" for request in requests]
    Path(path).write_text("".join(lines), encoding="utf-8")


def validate_batch(requests: Iterable[EditRequest | Mapping[str, Any]]) -> list[EditRequest]:
    """Check a batch (``EditRequest`` objects or dicts in any :func:`parse_request` form).

    Returns the requests as :class:`EditRequest` objects; the first bad one raises
    :class:`RequestError` naming its index (0-based).
    """
    if isinstance(requests, (str, bytes, Mapping, EditRequest)) or not isinstance(requests, Iterable):
        raise RequestError(f"expected a list of requests, got {type(requests).__name__}")
    batch: list[EditRequest] = []
    for index, item in enumerate(requests):
        if isinstance(item, EditRequest):
            batch.append(item)
        elif isinstance(item, Mapping):
            batch.append(parse_request(item, index, unit="index"))
        else:
            raise RequestError(
                f"must be an EditRequest or a dict, got {type(item).__name__}", record=index, unit="index"
            )
    return batch
