"""Evidence as the card and the page show it: facts read from the cited resources, sentences
without FHIR ids."""

from __future__ import annotations

from datetime import date

from cds.hooks.evidence import describe, index_resources, resource_date, without_ids


def test_without_ids_keeps_the_sentence_and_drops_the_ids() -> None:
    assert without_ids(
        "Latest ALT result: ALT 35 U/L on 2026-08-01 (Observation/labs-stale-obs5), older than"
        " the 30 days before 2026-11-01; a new one would decide it."
    ) == (
        "Latest ALT result: ALT 35 U/L on 2026-08-01, older than the 30 days before 2026-11-01;"
        " a new one would decide it."
    )
    assert without_ids("Age 58 on 2026-11-01 (born 1968-05-14, Patient/p-1) is > 18 years.") == (
        "Age 58 on 2026-11-01 (born 1968-05-14) is > 18 years."
    )
    assert without_ids("Not applicable: Patient/labs-stale is male.") == (
        "Not applicable: the patient is male."
    )
    assert without_ids(
        "The latest result could not be read (Observation/x: valueQuantity.value: bad);"
        " correct the record."
    ) == ("The latest result could not be read; correct the record.")
    assert without_ids("Ki-67 3-20 %, G1 < 3 %") == "Ki-67 3-20 %, G1 < 3 %"


def test_describe_an_observation_as_a_clinician_reads_it() -> None:
    obs = {
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "1742-6", "display": "ALT"}]},
        "effectiveDateTime": "2026-08-01T09:30:00Z",
        "valueQuantity": {"value": 35, "unit": "U/L"},
        "referenceRange": [
            {"low": {"value": 7, "unit": "U/L"}, "high": {"value": 40, "unit": "U/L"}}
        ],
    }
    item = describe("Observation/o1", obs)
    assert (item.name, item.value, item.date, item.reference_range, item.status) == (
        "ALT",
        "35 U/L",
        "2026-08-01",
        "7–40 U/L",
        "final",
    )
    assert resource_date(obs) == date(2026, 8, 1)
    inr = describe(
        "Observation/o2",
        {"resourceType": "Observation", "valueQuantity": {"value": 1.0, "code": "{INR}"}},
    )
    assert inr.value == "1.0"
    assert describe("Condition/c9", None).name == "Condition"  # cited, not fetched: no guess
    assert index_resources([obs, {"resourceType": "Patient"}]) == {"Observation/o1": obs}


def test_the_patient_is_shown_by_birth_date_and_sex() -> None:
    item = describe(
        "Patient/p", {"resourceType": "Patient", "birthDate": "1968-05-14", "gender": "male"}
    )
    assert (item.name, item.value, item.date) == ("Patient", "born 1968-05-14, male", None)
