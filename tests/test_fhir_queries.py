"""The patient queries derived from the trials' codes, and their CDS Hooks prefetch form."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from cds.criteria.reads import CLINICAL_TYPES
from cds.errors import InputError
from cds.fhir.queries import (
    PATIENT_PLACEHOLDER,
    build_patient_queries,
    check_patient_id,
    escape_token,
    prefetch_templates,
)

LOINC = "http://loinc.org"


class StandInTrials:
    """Stands in for cds.criteria's TrialSet: only codes_for() and types_read() are used."""

    def __init__(self, observation_codes: set[tuple[str, str]]) -> None:
        self.observation_codes = frozenset(observation_codes)
        self.asked: list[str] = []

    def types_read(self) -> tuple[str, ...]:
        return CLINICAL_TYPES

    def codes_for(self, resource_type: str) -> frozenset[tuple[str, str]]:
        self.asked.append(resource_type)
        return self.observation_codes if resource_type == "Observation" else frozenset()


def test_the_query_set_and_its_prefetch_form() -> None:
    trials = StandInTrials({(LOINC, "9811-1"), (LOINC, "2160-0")})
    assert prefetch_templates(trials) == {
        "patient": "Patient/{{context.patientId}}",
        "conditions": "Condition?patient={{context.patientId}}",
        "procedures": "Procedure?patient={{context.patientId}}",
        "observations": "Observation?patient={{context.patientId}}"
        "&combo-code=http://loinc.org|2160-0,http://loinc.org|9811-1",
        "medication-requests": "MedicationRequest?patient={{context.patientId}}",
        "medication-statements": "MedicationStatement?patient={{context.patientId}}",
        "medication-administrations": "MedicationAdministration?patient={{context.patientId}}",
        "medication-dispenses": "MedicationDispense?patient={{context.patientId}}",
        "allergy-intolerances": "AllergyIntolerance?patient={{context.patientId}}",
        "research-subjects": "ResearchSubject?patient={{context.patientId}}",
    }
    assert "Observation" in trials.asked


def test_no_observation_query_when_no_criterion_reads_observations() -> None:
    keys = [q.key for q in build_patient_queries(StandInTrials(set()))]
    assert not any(k.startswith("observations") for k in keys)


def test_many_codes_are_split_so_every_url_stays_under_the_limit() -> None:
    codes = {(LOINC, f"{n}-{n % 10}") for n in range(10000, 10400)}
    queries = build_patient_queries(StandInTrials(codes))
    observation_queries = [q for q in queries if q.resource_type == "Observation"]
    assert len(observation_queries) > 1
    assert [q.key for q in observation_queries][:2] == ["observations-1", "observations-2"]
    longest_id = "x" * 64
    base = "https://" + "b" * 192  # the 200 characters allowed for the base URL
    sent: set[str] = set()
    for query in observation_queries:
        url = f"{base}/{query.for_patient(longest_id)}"
        assert len(quote(url, safe="/:?=&,.-_~")) <= 1800
        sent.update(query.template.partition("&combo-code=")[2].split(","))
    assert sent == {f"{s}|{c}" for s, c in codes}  # every code asked for exactly once


def test_special_characters_in_codes_are_escaped() -> None:
    assert escape_token("a,b|c$d\\e") == "a\\,b\\|c\\$d\\\\e"
    [query] = [
        q
        for q in build_patient_queries(StandInTrials({("urn:x", "1,2")}))
        if q.resource_type == "Observation"
    ]
    assert query.template.endswith("code=urn:x|1\\,2")


def test_patient_ids_are_checked_and_substituted() -> None:
    [patient, conditions] = build_patient_queries(StandInTrials(set()))[:2]
    assert patient.is_read and not conditions.is_read
    assert conditions.for_patient("abc-1.2") == "Condition?patient=abc-1.2"
    assert PATIENT_PLACEHOLDER not in patient.for_patient("p1")
    for bad in ("", "a/b", "a b", "x" * 65, "p1&_tag=x"):
        with pytest.raises(InputError):
            check_patient_id(bad)
