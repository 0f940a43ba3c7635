"""A fixture patient fetched from a real FHIR server evaluates exactly like its bundle file."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from cds.criteria import load_trials
from cds.criteria.engine import evaluate
from cds.criteria.record import PatientRecord
from cds.evaluate_command import read_bundle_file
from cds.fhir.queries import fetch_patient_resources
from tests.plugins.fhir_server import FhirTestServer

FIXTURES = Path(__file__).resolve().parent.parent / "fhir_fixtures"
AS_OF = date(2026, 11, 1)
CASES = [
    (path.name, record.patient_id)
    for path in sorted(FIXTURES.glob("*.json"))
    for record in read_bundle_file(path)
]


@pytest.mark.integration
@pytest.mark.parametrize(("fixture", "patient_id"), CASES)
def test_fetched_patient_evaluates_like_its_bundle_file(
    fhir_server: FhirTestServer, loaded_fhir_base_url: str, fixture: str, patient_id: str
) -> None:
    trials = load_trials()
    from_file = next(r for r in read_bundle_file(FIXTURES / fixture) if r.patient_id == patient_id)
    with fhir_server.client() as client:
        fetched = fetch_patient_resources(client, patient_id, trials, tag=fhir_server.tag)
    patient = next(r for r in fetched.resources if r["resourceType"] == "Patient")
    from_server = PatientRecord.from_resources(fetched.resources, trials, patient=patient)
    expected = evaluate(from_file, trials, AS_OF).to_json()
    assert evaluate(from_server, trials, AS_OF).to_json() == expected
