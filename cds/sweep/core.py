"""The sweep's map step: one patient's resources in, its evaluation, CSV rows and tallies out."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from cds.criteria import TrialSet
from cds.criteria.engine import evaluate
from cds.criteria.model import CriterionResult, PatientEvaluation, Result, TrialStatus
from cds.criteria.record import PatientRecord

JSONDict = dict[str, Any]

RESULTS = (Result.PASS, Result.FAIL, Result.UNKNOWN, Result.MANUAL)
_SLOT = {result: i for i, result in enumerate(RESULTS)}
STATUSES = (TrialStatus.CANDIDATE, TrialStatus.NEEDS_REVIEW, TrialStatus.EXCLUDED)
CSV_HEADER = (
    "patient",
    "trial",
    "status",
    "unknown_count",
    "unknown",
    "manual_count",
    "manual",
)
#: rows of the candidates CSV: the patients a coordinator follows up
CSV_STATUSES = frozenset({TrialStatus.CANDIDATE, TrialStatus.NEEDS_REVIEW})

#: ensure_ascii=False, as evaluate_command prints
_string: Callable[[str], str] = json.encoder.encode_basestring


def result_line(evaluation: PatientEvaluation) -> bytes:
    """One results.ndjson line, UTF-8: exactly what `cds evaluate --format json` prints, i.e.
    ``json.dumps(evaluation.to_json(), ensure_ascii=False)`` (default separators), encoded.

    Written out by hand because a sweep writes one per patient and most of each line is
    constant: a criterion's id, kind and verbatim protocol text are encoded once per process.
    Built as bytes, not text: the criteria's text holds characters beyond Latin-1 ("≥"), which
    would make every line a two-byte string to encode again (a third of this step's cost).
    A test holds it to the json.dumps form.
    """
    parts = [
        b'{"patient": ',
        _utf8(evaluation.patient),
        b', "as_of": "',
        evaluation.as_of.isoformat().encode(),
        b'", "trials": [',
    ]
    for t, trial in enumerate(evaluation.trials):
        if t:
            parts.append(b", ")
        parts += (
            b'{"trial": ',
            _utf8(trial.trial),
            b', "version": ',
            _utf8(trial.version),
            b', "status": "',
            _ENUM_BYTES[trial.status],
            b'", "criteria": [',
        )
        for c, criterion in enumerate(trial.criteria):
            if c:
                parts.append(b", ")
            if criterion.evidence:
                parts += (
                    _criterion_head(criterion.id, criterion.kind, criterion.text),
                    _ENUM_BYTES[criterion.result],
                    b'", "evidence": [',
                    ", ".join(map(_string, criterion.evidence)).encode(),
                    b'], "explanation": ',
                    _utf8(criterion.explanation),
                    b"}",
                )
            else:
                parts.append(_no_evidence_json(criterion))
        parts.append(b"]}")
    parts.append(b"]}\n")
    return b"".join(parts)


def _utf8(text: str) -> bytes:
    """A JSON string literal as json.dumps(ensure_ascii=False) writes it, UTF-8 encoded."""
    return _string(text).encode()


_ENUM_BYTES: dict[Result | TrialStatus, bytes] = {
    member: str(member).encode() for member in (*Result, *TrialStatus)
}


# Results without evidence are mostly manual criteria, the same for every patient: each is
# encoded once (bounded, as a rule could word one per patient).
@functools.lru_cache(maxsize=4096)
def _no_evidence_json(criterion: CriterionResult) -> bytes:
    return (
        _criterion_head(criterion.id, criterion.kind, criterion.text)
        + _ENUM_BYTES[criterion.result]
        + b'", "evidence": [], "explanation": '
        + _utf8(criterion.explanation)
        + b"}"
    )


@functools.cache
def _criterion_head(criterion_id: str, kind: str, text: str) -> bytes:
    return (
        f'{{"id": {_string(criterion_id)}, "kind": {_string(kind)}, '
        f'"text": {_string(text)}, "result": "'
    ).encode()


def csv_rows(evaluation: PatientEvaluation) -> list[list[str]]:
    """Candidate and needs-review rows: what is unknown (with why) and what a person must check."""
    rows = []
    for trial in evaluation.trials:
        if trial.status not in CSV_STATUSES:
            continue
        unknown = trial.with_result(Result.UNKNOWN)
        manual = trial.with_result(Result.MANUAL)
        rows.append(
            [
                evaluation.patient,
                trial.trial,
                trial.status.value,
                str(len(unknown)),
                " | ".join(f"{c.label}: {c.explanation}" for c in unknown),
                str(len(manual)),
                " | ".join(c.label for c in manual),
            ]
        )
    return rows


@dataclass
class Tally:
    """Counts that add up across partitions: statuses per trial, and per criterion in protocol
    order both the attrition funnel (among patients no earlier criterion excluded) and the
    plain totals. Unknown and manual are counted apart from fail, never folded into it."""

    #: trial id -> criterion ids in protocol order
    criteria: dict[str, list[str]]
    patients: int = 0
    errors: int = 0
    status: dict[str, dict[str, int]] = field(default_factory=dict)
    #: trial -> per criterion [entering, pass, fail, unknown, manual]
    funnel: dict[str, list[list[int]]] = field(default_factory=dict)
    #: trial -> per criterion [pass, fail, unknown, manual] over all patients
    totals: dict[str, list[list[int]]] = field(default_factory=dict)

    @classmethod
    def for_trials(cls, trials: TrialSet) -> Tally:
        return cls({t.id: [c.id for c in t.criteria] for t in trials})

    def __post_init__(self) -> None:
        for tid, ids in self.criteria.items():
            self.status.setdefault(tid, {s.value: 0 for s in STATUSES})
            self.funnel.setdefault(tid, [[0] * 5 for _ in ids])
            self.totals.setdefault(tid, [[0] * 4 for _ in ids])

    def add(self, evaluation: PatientEvaluation) -> None:
        self.patients += 1
        for trial in evaluation.trials:
            self.status[trial.trial][trial.status.value] += 1
            funnel = self.funnel[trial.trial]
            totals = self.totals[trial.trial]
            still_in = True
            for i, criterion in enumerate(trial.criteria):
                slot = _SLOT[criterion.result]
                totals[i][slot] += 1
                if still_in:
                    funnel[i][0] += 1
                    funnel[i][slot + 1] += 1
                    still_in = criterion.result is not Result.FAIL

    def merge(self, other: Tally) -> None:
        self.patients += other.patients
        self.errors += other.errors
        for tid in self.criteria:
            for key, n in other.status[tid].items():
                self.status[tid][key] += n
            for mine, theirs in zip(self.funnel[tid], other.funnel[tid], strict=True):
                for j, n in enumerate(theirs):
                    mine[j] += n
            for mine, theirs in zip(self.totals[tid], other.totals[tid], strict=True):
                for j, n in enumerate(theirs):
                    mine[j] += n

    def to_json(self) -> JSONDict:
        return {
            "criteria": self.criteria,
            "patients": self.patients,
            "errors": self.errors,
            "status": self.status,
            "funnel": self.funnel,
            "totals": self.totals,
        }

    @classmethod
    def from_json(cls, data: JSONDict) -> Tally:
        return cls(
            criteria={k: list(v) for k, v in data["criteria"].items()},
            patients=int(data["patients"]),
            errors=int(data["errors"]),
            status=data["status"],
            funnel=data["funnel"],
            totals=data["totals"],
        )


@dataclass
class PatientOutcome:
    """What one patient contributes to the outputs."""

    patient: str
    line: bytes | None  # results.ndjson line (UTF-8), None on error
    rows: list[list[str]]
    error: str | None = None


def evaluate_resources(
    resources: Iterable[JSONDict],
    trials: TrialSet,
    as_of: date,
    *,
    patient: JSONDict | None = None,
    warnings: list[str] | None = None,
    incomplete: dict[str, str] | None = None,
) -> PatientEvaluation:
    """The pure map function: one patient's FHIR resources, the trials and the date in.
    ``incomplete``: resource type -> why its data may be incomplete (see PatientRecord)."""
    record = PatientRecord.from_resources(
        resources, trials, patient=patient, warnings=warnings, incomplete=incomplete
    )
    return evaluate(record, trials, as_of)


def outcome_of(evaluation: PatientEvaluation) -> PatientOutcome:
    """What an evaluation puts in the outputs (its caller tallies the evaluation itself)."""
    return PatientOutcome(evaluation.patient, result_line(evaluation), csv_rows(evaluation))


def error_outcome(patient: str, reason: str) -> PatientOutcome:
    return PatientOutcome(patient, None, [], reason)
