"""Result types of an evaluation: per criterion, per trial, per patient, and their JSON form."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from enum import StrEnum
from typing import Any, NamedTuple


class Result(StrEnum):
    """What the record shows for one criterion."""

    PASS = "pass"  # noqa: S105 - a result, not a password. The record positively meets the criterion
    FAIL = "fail"  # the record positively breaks it
    UNKNOWN = "unknown"  # computable, but data is missing, stale, ambiguous or unconvertible
    MANUAL = "manual"  # not computable from structured data: a person must check


class TrialStatus(StrEnum):
    """Overall screening status of one patient for one trial."""

    CANDIDATE = "candidate"  # nothing fails, nothing unknown (manual items may remain)
    NEEDS_REVIEW = "needs-review"  # nothing fails, something unknown
    EXCLUDED = "excluded"  # at least one criterion fails


class CriterionResult(NamedTuple):
    """One criterion's result with the evidence behind it and a checkable sentence.

    A named tuple (immutable, like the frozen dataclasses beside it) because an evaluation
    makes dozens per patient and a named tuple is built in a third of the time.
    """

    id: str
    kind: str  # "inclusion" | "exclusion"
    text: str  # the protocol's sentence, verbatim
    label: str  # a short name for cards and reports ("Total bilirubin")
    result: Result
    evidence: tuple[str, ...]  # FHIR references, "Observation/abc"
    explanation: str

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "text": self.text,
            "result": self.result.value,
            "evidence": list(self.evidence),
            "explanation": self.explanation,
        }


#: ClinicalTrials.gov overall recruitment statuses under which a study takes patients; any other
#: (NOT_YET_RECRUITING, ACTIVE_NOT_RECRUITING, SUSPENDED, TERMINATED, COMPLETED, WITHDRAWN, ...)
#: means a card or report must say the trial is not open to enrolment (issue 12 section 6).
ENROLLING_STATUSES = frozenset({"RECRUITING", "ENROLLING_BY_INVITATION"})


def is_enrolling(registry_status: str) -> bool:
    """Whether a registry status (API form ``ENROLLING_BY_INVITATION`` or the web page's
    "Enrolling by invitation") means the trial takes patients."""
    return registry_status.strip().upper().replace(" ", "_") in ENROLLING_STATUSES


def registry_phrase(registry_status: str) -> str:
    """The registry status as reports show it, saying so when the trial does not enrol."""
    if is_enrolling(registry_status):
        return registry_status
    return f"{registry_status}, not open to enrolment"


@dataclass(frozen=True, slots=True)
class TrialEvaluation:
    """All criteria of one trial for one patient, in protocol order, and the overall status."""

    trial: str  # NCT number
    version: str  # trial definition version
    title: str
    url: str  # ClinicalTrials.gov record
    registry_status: str
    criteria: tuple[CriterionResult, ...]
    status: TrialStatus = field(init=False)

    def __post_init__(self) -> None:
        results = {c.result for c in self.criteria}
        if Result.FAIL in results:
            status = TrialStatus.EXCLUDED
        elif Result.UNKNOWN in results:
            status = TrialStatus.NEEDS_REVIEW
        else:
            status = TrialStatus.CANDIDATE
        object.__setattr__(self, "status", status)

    @property
    def enrolling(self) -> bool:
        """Whether the registry says the trial takes patients (a card for one that does not
        must say so; sweeps screen it all the same)."""
        return is_enrolling(self.registry_status)

    def with_result(self, result: Result) -> tuple[CriterionResult, ...]:
        return tuple(c for c in self.criteria if c.result is result)

    def to_json(self) -> dict[str, Any]:
        return {
            "trial": self.trial,
            "version": self.version,
            "status": self.status.value,
            "criteria": [c.to_json() for c in self.criteria],
        }


@dataclass(frozen=True, slots=True)
class PatientEvaluation:
    """One patient's evaluation against every requested trial on one as-of date."""

    patient: str  # "Patient/ID"
    as_of: date
    trials: tuple[TrialEvaluation, ...]
    #: non-fatal problems met while reading the record (a malformed resource skipped, ...)
    warnings: tuple[str, ...] = ()

    def trial(self, trial_id: str) -> TrialEvaluation:
        for evaluation in self.trials:
            if evaluation.trial == trial_id:
                return evaluation
        raise KeyError(trial_id)

    def to_json(self) -> dict[str, Any]:
        """The `cds evaluate --format json` object (one per patient, one per line)."""
        return {
            "patient": self.patient,
            "as_of": self.as_of.isoformat(),
            "trials": [t.to_json() for t in self.trials],
        }
