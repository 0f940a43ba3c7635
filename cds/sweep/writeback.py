"""--write-back: a ResearchStudy per trial and a ResearchSubject per candidate, created once.

Each resource carries a business identifier and is sent as a conditional create (FHIR R4
3.1.0.8: POST with ``ifNoneExist: identifier=system|value`` in a transaction entry), so the
server creates it only if no resource with that identifier exists: a second sweep adds nothing.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cds.criteria import Trial, TrialSet
from cds.errors import FhirBadResponse
from cds.fhir.client import FhirClient
from cds.fhir.queries import escape_token

log = logging.getLogger(__name__)

JSONDict = dict[str, Any]

STUDY_SYSTEM = "https://clinicaltrials.gov"
SUBJECT_SYSTEM = "urn:cds-trial-screening:research-subject"
BATCH = 100

#: engine status -> R4 ResearchSubject.status: a candidate (nothing fails, nothing unknown) is
#: a "candidate"; one with unknown items is a "potential-candidate" until someone checks
SUBJECT_STATUS = {"candidate": "candidate", "needs-review": "potential-candidate"}

#: ClinicalTrials.gov overall status -> R4 research-study-status
_STUDY_STATUS = {
    "RECRUITING": "active",
    "NOT_YET_RECRUITING": "approved",
    "ENROLLING_BY_INVITATION": "active",
    "ACTIVE_NOT_RECRUITING": "closed-to-accrual",
    "SUSPENDED": "temporarily-closed-to-accrual",
    "TERMINATED": "administratively-completed",
    "COMPLETED": "completed",
    "WITHDRAWN": "withdrawn",
}


@dataclass
class WriteBackReport:
    studies_created: int = 0
    studies_existing: int = 0
    subjects_created: int = 0
    subjects_existing: int = 0

    def to_json(self) -> dict[str, int]:
        return dict(self.__dict__)


def research_study(trial: Trial) -> JSONDict:
    return {
        "resourceType": "ResearchStudy",
        "meta": {"tag": [{"system": STUDY_SYSTEM, "code": trial.id}]},
        "identifier": [{"system": STUDY_SYSTEM, "value": trial.id}],
        "title": trial.title,
        "status": _STUDY_STATUS.get(trial.registry_status.upper(), "active"),
        "relatedArtifact": [{"type": "documentation", "url": trial.url}],
    }


def research_subject(trial_id: str, study_ref: str, patient_ref: str, status: str) -> JSONDict:
    key = subject_key(trial_id, patient_ref)
    return {
        "resourceType": "ResearchSubject",
        "meta": {"tag": [{"system": SUBJECT_SYSTEM, "code": key}]},
        "identifier": [{"system": SUBJECT_SYSTEM, "value": key}],
        "status": SUBJECT_STATUS[status],
        "study": {"reference": study_ref},
        "individual": {"reference": patient_ref},
    }


def subject_key(trial_id: str, patient_ref: str) -> str:
    return f"{trial_id}:{patient_ref.removeprefix('Patient/')}"


def identifier_searchable(capability: JSONDict | None, resource_type: str) -> bool:
    """Whether the server lists an ``identifier`` search parameter for the type (assumed
    when there is no CapabilityStatement to ask)."""
    if capability is None:
        return True
    for rest in capability.get("rest") or []:
        for resource in rest.get("resource") or []:
            if isinstance(resource, dict) and resource.get("type") == resource_type:
                return any(
                    isinstance(p, dict) and p.get("name") == "identifier"
                    for p in resource.get("searchParam") or []
                )
    return False


def _conditional(resource: JSONDict, by_identifier: bool) -> JSONDict:
    ident = resource["identifier"][0]
    token = f"{escape_token(ident['system'])}|{escape_token(ident['value'])}"
    # The identifier is the business key. A server that does not index identifiers for this
    # type (sekmet-fhir has no ResearchStudy/ResearchSubject search parameters) still indexes
    # _tag on every type, and the tag mirrors the identifier exactly.
    condition = f"identifier={token}" if by_identifier else f"_tag={token}"
    return {
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"], "ifNoneExist": condition},
    }


def _send(
    client: FhirClient, resources: Sequence[JSONDict], capability: JSONDict | None
) -> list[tuple[str, bool]]:
    """One transaction of conditional creates; (Type/id, created?) per entry."""
    entries = [
        _conditional(r, identifier_searchable(capability, r["resourceType"])) for r in resources
    ]
    response = client.transaction(
        {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    )
    out = []
    entries = response.get("entry") or []
    if len(entries) != len(resources):
        raise FhirBadResponse("write-back: the transaction response has the wrong entry count")
    for entry, sent in zip(entries, resources, strict=True):
        answer = entry.get("response") or {}
        status = str(answer.get("status", ""))
        location = str(answer.get("location") or "")
        rid = (entry.get("resource") or {}).get("id")
        if location:
            ref = "/".join(location.split("/_history/")[0].rstrip("/").split("/")[-2:])
        elif rid:
            ref = f"{sent['resourceType']}/{rid}"
        else:
            raise FhirBadResponse("write-back: a transaction entry without location or id")
        out.append((ref, status.startswith("201")))
    return out


def candidate_rows(csv_path: Path) -> Iterable[tuple[str, str, str]]:
    """(patient, trial, status) from candidates.csv."""
    with open(csv_path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            yield row["patient"], row["trial"], row["status"]


def write_back(
    client: FhirClient,
    trials: TrialSet,
    csv_path: Path,
    capability: JSONDict | None = None,
) -> WriteBackReport:
    """Create the trials' ResearchStudy and the candidates' ResearchSubject resources that do
    not exist yet; ``capability`` (the server's CapabilityStatement) decides the condition."""
    report = WriteBackReport()
    study_refs: dict[str, str] = {}
    for (ref, created), trial in zip(
        _send(client, [research_study(t) for t in trials], capability), trials, strict=True
    ):
        study_refs[trial.id] = ref
        if created:
            report.studies_created += 1
        else:
            report.studies_existing += 1
    batch: list[JSONDict] = []

    def flush() -> None:
        for _, created in _send(client, batch, capability):
            if created:
                report.subjects_created += 1
            else:
                report.subjects_existing += 1
        batch.clear()

    for patient, trial_id, status in candidate_rows(csv_path):
        if trial_id not in study_refs or status not in SUBJECT_STATUS:
            continue
        batch.append(research_subject(trial_id, study_refs[trial_id], patient, status))
        if len(batch) >= BATCH:
            flush()
    if batch:
        flush()
    log.info("write-back: %s", report.to_json())
    return report
