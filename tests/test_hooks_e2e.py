"""End to end against a real FHIR server with the fixtures: fetched and prefetched cards agree."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from flask.testing import FlaskClient

from cds.criteria import load_trials
from cds.fhir.client import FhirClient, Timeouts
from cds.fhir.queries import build_patient_queries
from tests.hooks_data.support import (
    ORD,
    PV,
    draft_bundle,
    hook_body,
    med_order,
    post,
    without_uuids,
)

pytestmark = pytest.mark.integration

PATIENTS = {
    "both-candidate": ["NCT04339036", "NCT05610826"],
    "ileal-net-a-only": ["NCT04339036"],
    "grade-1-b-only": ["NCT05610826"],
    "non-net": [],
    "prior-tace": [],
    "grade-unrecorded": ["NCT04339036", "NCT05610826"],
    "recent-capecitabine": [],
    "biliary-stent-b-only": ["NCT05610826"],
}


@pytest.fixture(scope="module")
def client(loaded_fhir_base_url: str) -> FlaskClient:
    from tests.hooks_data.support import dev_app

    return dev_app(fhir_trusted_servers=[loaded_fhir_base_url], time_budget_s=10).test_client()


def _prefetch_from_server(base_url: str, patient_id: str) -> dict[str, Any]:
    """What a client honouring every template sends: each query run, all pages merged."""
    prefetch: dict[str, Any] = {}
    with FhirClient(
        base_url=base_url,
        trusted_base_urls=[base_url],
        allow_insecure_loopback=True,
        timeouts=Timeouts(connect=5, read=30),
    ) as fhir:
        for query in build_patient_queries(load_trials()):
            url = query.for_patient(patient_id)
            if query.is_read:
                prefetch[query.key] = fhir.get(url)
                continue
            rtype, _, params = url.partition("?")
            found = fhir.search(rtype, params).resources
            bundle: dict[str, Any] = {
                "resourceType": "Bundle",
                "type": "searchset",
                "total": len(found),
            }
            if found:
                bundle["entry"] = [{"resource": r} for r in found]
            prefetch[query.key] = bundle
    return prefetch


def _trials(cards: list[dict[str, Any]]) -> list[str]:
    return sorted(c["summary"].split(" ", 1)[0] for c in cards)


@pytest.mark.parametrize("patient", sorted(PATIENTS))
def test_fetched_and_prefetched_give_the_same_cards(
    client: FlaskClient,
    loaded_fhir_base_url: str,
    patient: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="cds.hooks.calls")
    fetched = post(
        client,
        f"/cds-services/{PV}",
        hook_body(patient_id=patient, fhirServer=loaded_fhir_base_url),
    )
    assert fetched.status_code == 200, fetched.get_json()
    prefetch = _prefetch_from_server(loaded_fhir_base_url, patient)
    caplog.clear()
    prefetched = post(
        client,
        f"/cds-services/{PV}",
        hook_body(patient_id=patient, prefetch=prefetch, fhirServer=loaded_fhir_base_url),
    )
    assert prefetched.status_code == 200
    line = json.loads(caplog.records[-1].getMessage())
    assert "fhir_calls" not in line and "prefetch_fetched" not in line  # S1: no FHIR call
    assert without_uuids(fetched.get_json()) == without_uuids(prefetched.get_json())
    assert _trials(fetched.get_json()["cards"]) == PATIENTS[patient]


def test_unknown_patient_on_the_server_is_412(
    client: FlaskClient, loaded_fhir_base_url: str
) -> None:
    response = post(
        client,
        f"/cds-services/{PV}",
        hook_body(patient_id="no-such-patient", fhirServer=loaded_fhir_base_url),
    )
    assert response.status_code == 412


def test_order_sign_against_the_server(client: FlaskClient, loaded_fhir_base_url: str) -> None:
    body = hook_body("order-sign", patient_id="ileal-net-a-only", fhirServer=loaded_fhir_base_url)
    body["context"]["draftOrders"] = draft_bundle(
        med_order("d1", "200328", "capecitabine 500 MG Oral Tablet", pid="ileal-net-a-only")
    )
    response = post(client, f"/cds-services/{ORD['order-sign']}", body)
    assert response.status_code == 200
    assert _trials(response.get_json()["cards"]) == ["NCT04339036"]
