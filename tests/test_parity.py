"""One answer per patient: every fixture, through all five doors, against the real local FHIR
server. `cds evaluate` of the fixture files is the reference; the NDJSON sweep, the REST sweep
and the Bulk `$export` sweep must print the same result lines byte for byte, and the CDS Hooks
service must show the cards that reference evaluation gives, whether the EHR prefetches every
page, only the first page of each search, or nothing at all."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from cds.criteria import load_trials
from cds.criteria.model import CriterionResult, Result, TrialEvaluation
from cds.evaluate_command import evaluate_files
from cds.fhir.bulk import BulkExporter
from cds.fhir.client import FhirClient
from cds.fhir.loader import DEFAULT_TAG, bundle_files, prepare_entries
from cds.fhir.queries import build_patient_queries, fetch_patient_resources
from cds.hooks.cards import CardContext, screening_card, trial_infos
from cds.hooks.evidence import index_resources
from cds.sweep.remote import RestOptions, sweep_export, sweep_rest
from cds.sweep.runner import sweep_ndjson
from tests.helpers import (
    AS_OF,
    assert_export_matches,
    put_group,
    sweep_lines,
    sweep_options,
    write_ndjson,
)
from tests.hooks_data.support import PV, hook_body, post, without_uuids
from tests.plugins.fhir_server import FhirTestServer

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parent.parent / "fhir_fixtures"
#: fixtures whose point cannot travel through a FHIR server or an NDJSON export: a failed
#: search is a property of the Bundle that reported it, not data a server holds
BUNDLE_ONLY = {"search-outcome-error.json"}


def _reference() -> dict[str, str]:
    """Patient reference -> the line `cds evaluate` prints for it, over every fixture file."""
    evaluations = evaluate_files([str(FIXTURES)], load_trials(), AS_OF)
    return {e.patient: json.dumps(e.to_json(), ensure_ascii=False) + "\n" for e in evaluations}


def _patients_of(names: set[str]) -> set[str]:
    found = set()
    for path in bundle_files(FIXTURES):
        if path.name in names:
            for e in prepare_entries(json.loads(path.read_text()), file=str(path), tag=DEFAULT_TAG):
                if e.resource_type == "Patient":
                    found.add(e.reference)
    return found


REFERENCE = _reference()
CARRIED = {ref: line for ref, line in REFERENCE.items() if ref not in _patients_of(BUNDLE_ONLY)}


def _by_patient(lines: list[str]) -> dict[str, str]:
    """The lines of the patients compared (a server also holds the bundle-only fixtures'
    patients, without the failure their Bundle reported)."""
    found = {json.loads(line)["patient"]: line for line in lines}
    assert set(found) >= set(CARRIED)
    return {ref: line for ref, line in found.items() if ref in CARRIED}


def test_every_fixture_patient_is_compared() -> None:
    assert len(REFERENCE) == len(list(FIXTURES.glob("*.json"))) + 1  # one holds two patients
    assert set(REFERENCE) - set(CARRIED) == {"Patient/search-outcome-error"}


def test_ndjson_sweep_prints_what_cds_evaluate_prints(tmp_path: Path) -> None:
    files = [p for p in bundle_files(FIXTURES) if p.name not in BUNDLE_ONLY]
    source = write_ndjson(files, DEFAULT_TAG, tmp_path / "ndjson")
    out = tmp_path / "out"
    summary = sweep_ndjson(source, sweep_options(out))
    assert summary["complete"] and summary["errors"] == 0
    assert _by_patient(sweep_lines(out)) == CARRIED


def test_rest_sweep_prints_what_cds_evaluate_prints(
    fhir_server: FhirTestServer, loaded_fhir_base_url: str, tmp_path: Path
) -> None:
    with fhir_server.client() as client:
        summary = sweep_rest(
            client, sweep_options(tmp_path), RestOptions(tag=fhir_server.tag, page_size=7)
        )
    assert summary["complete"] and summary["errors"] == 0
    assert _by_patient(sweep_lines(tmp_path)) == CARRIED


def test_export_sweep_prints_what_cds_evaluate_prints(
    fhir_server: FhirTestServer, loaded_fhir_base_url: str, tmp_path: Path
) -> None:
    group = f"{fhir_server.id_prefix}parity-group"
    with fhir_server.client() as client:
        put_group(client, group, sorted(CARRIED))
        summary = sweep_export(
            BulkExporter(client), fhir_server.base_url, sweep_options(tmp_path), group=group
        )
    assert summary["complete"] and summary["errors"] == 0
    got = _by_patient(sweep_lines(tmp_path))
    assert_export_matches(list(got.values()), list(CARRIED.values()))
    # the gap is real for the one fixture about it, and for it only
    assert got["Patient/other-study-enrolment"] != CARRIED["Patient/other-study-enrolment"]


# -- the CDS Hooks service ---------------------------------------------------------------


@pytest.fixture(scope="module")
def hooks(loaded_fhir_base_url: str) -> FlaskClient:
    from tests.hooks_data.support import dev_app

    return dev_app(fhir_trusted_servers=[loaded_fhir_base_url], time_budget_s=20).test_client()


def _expected_cards(patient_ref: str, patient_id: str, base_url: str) -> list[dict[str, Any]]:
    """The cards the reference evaluation gives, built by the service's own card function (it
    reads the dates of cited labs from the resources, and links to the screening page)."""
    trials = load_trials()
    evaluation = json.loads(REFERENCE[patient_ref])
    infos = trial_infos(trials)
    user = hook_body()["context"]["userId"]
    with FhirClient(
        base_url=base_url, trusted_base_urls=[base_url], allow_insecure_loopback=True
    ) as fhir:
        cited = index_resources(fetch_patient_resources(fhir, patient_id, trials).resources)
    ctx = CardContext(
        patient_id=patient_id,
        user_id=user,
        encounter_id=None,
        as_of=AS_OF,
        resources=cited,
        launch_url="http://localhost/smart/launch",  # the test client's host (dev mode)
    )
    cards = []
    for trial in evaluation["trials"]:
        definition = trials[trial["trial"]]
        labels = {c.id: c.label for c in definition.criteria}
        rebuilt = TrialEvaluation(
            trial=trial["trial"],
            version=trial["version"],
            title=definition.title,
            url=definition.url,
            registry_status=definition.registry_status,
            criteria=tuple(
                CriterionResult(
                    c["id"],
                    c["kind"],
                    c["text"],
                    labels[c["id"]],
                    Result(c["result"]),
                    tuple(c["evidence"]),
                    c["explanation"],
                )
                for c in trial["criteria"]
            ),
        )
        card = screening_card(rebuilt, infos[trial["trial"]], ctx)
        if card is not None:
            cards.append(card)
    return without_uuids({"cards": cards})


def _prefetch(base_url: str, patient_id: str, *, first_page_only: bool) -> dict[str, Any]:
    """What an EHR honouring every template sends: every page merged, or only the first page
    of each search with its ``next`` link (the service fetches the rest)."""
    prefetch: dict[str, Any] = {}
    with FhirClient(
        base_url=base_url, trusted_base_urls=[base_url], allow_insecure_loopback=True
    ) as fhir:
        for query in build_patient_queries(load_trials()):
            url = query.for_patient(patient_id)
            if query.is_read:
                prefetch[query.key] = fhir.get(url)
            elif first_page_only:
                prefetch[query.key] = fhir.get(url + "&_count=2")
            else:
                rtype, _, params = url.partition("?")
                found = fhir.search(rtype, params).resources
                prefetch[query.key] = {
                    "resourceType": "Bundle",
                    "type": "searchset",
                    "total": len(found),
                    "entry": [{"resource": r} for r in found],
                }
    return prefetch


@pytest.mark.parametrize("mode", ["full-prefetch", "first-page-prefetch", "no-prefetch"])
def test_hooks_show_the_cards_of_the_reference_evaluation(
    hooks: FlaskClient, loaded_fhir_base_url: str, mode: str
) -> None:
    compared = 0
    for patient_ref in sorted(CARRIED):
        patient_id = patient_ref.removeprefix("Patient/")
        body = hook_body(patient_id=patient_id, fhirServer=loaded_fhir_base_url)
        if mode != "no-prefetch":
            body["prefetch"] = _prefetch(
                loaded_fhir_base_url, patient_id, first_page_only=mode == "first-page-prefetch"
            )
        response = post(hooks, f"/cds-services/{PV}", body)
        assert response.status_code == 200, (patient_ref, response.get_json())
        shown = without_uuids(response.get_json())
        expected = _expected_cards(patient_ref, patient_id, loaded_fhir_base_url)
        assert shown == expected, (mode, patient_ref)
        compared += 1
    assert compared == len(CARRIED)
