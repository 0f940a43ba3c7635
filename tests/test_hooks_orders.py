"""order-select / order-sign: a warning when a draft order would end a trial at stake."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient

from cds.criteria import load_trials
from cds.hooks.orders import draft_orders, trials_at_stake
from tests.hooks_data.support import (
    ORD,
    StubFhir,
    dev_app,
    draft_bundle,
    fixture_resources,
    full_prefetch,
    hook_body,
    med_order,
    post,
    serve_stub,
    service_order,
)


def service(hook: str) -> str:
    return f"/cds-services/{ORD[hook]}"


CPT = "http://www.ama-assn.org/go/cpt"
SNOMED = "http://snomed.info/sct"
CAPECITABINE = ("200328", "capecitabine 500 MG Oral Tablet")
TEMOZOLOMIDE = ("313210", "temozolomide 100 MG Oral Capsule")
Y90 = (CPT, "79445", "Radiopharmaceutical therapy, by intra-arterial particulate administration")
OCTREOTIDE = ("1606204", "octreotide")


@pytest.fixture(scope="module")
def client() -> FlaskClient:
    return dev_app().test_client()


def _sign(
    client: FlaskClient,
    patient: str,
    *orders: dict[str, Any],
    hook: str = "order-sign",
    selections: list[str] | None = None,
) -> list[dict[str, Any]]:
    body = hook_body(
        hook,
        patient_id=patient,
        prefetch=full_prefetch(fixture_resources(f"{patient}.json"), patient),
    )
    body["context"]["draftOrders"] = draft_bundle(*orders)
    if hook == "order-select":
        body["context"]["selections"] = selections or [
            f"{o['resourceType']}/{o['id']}" for o in orders
        ]
    response = post(client, service(body["hook"]), body)
    assert response.status_code == 200, response.get_json()
    cards: list[dict[str, Any]] = response.get_json()["cards"]
    return cards


def test_capecitabine_order_warns_for_both_trials_of_a_candidate(client: FlaskClient) -> None:
    cards = _sign(client, "both-candidate", med_order("m1", *CAPECITABINE, pid="both-candidate"))
    assert {c["summary"].split(" ", 1)[0] for c in cards} == {
        "NCT04339036",
        "NCT05610826",
    }
    for card in cards:
        assert card["indicator"] == "warning"
        assert "capecitabine 500 MG Oral Tablet" in card["detail"]
        assert "**possible candidate**" in card["detail"]
    b = next(c for c in cards if "NCT05610826" in c["summary"])
    assert "capecitabine" in b["detail"].lower() and "temozolomide" in b["detail"].lower()


def test_y90_order_names_the_embolization_criterion(client: FlaskClient) -> None:
    cards = _sign(client, "both-candidate", service_order("s1", *Y90, pid="both-candidate"))
    a = next(c for c in cards if "NCT04339036" in c["summary"])
    assert "Prior TACE/TAE or Y90" in a["detail"]


def test_order_select_checks_only_the_selected_orders(client: FlaskClient) -> None:
    cards = _sign(
        client,
        "both-candidate",
        med_order("m1", *CAPECITABINE, pid="both-candidate"),
        med_order("m2", *OCTREOTIDE, pid="both-candidate"),
        hook="order-select",
        selections=["MedicationRequest/m2"],
    )
    assert cards == []
    cards = _sign(
        client,
        "both-candidate",
        med_order("m1", *CAPECITABINE, pid="both-candidate"),
        med_order("m2", *OCTREOTIDE, pid="both-candidate"),
        hook="order-select",
        selections=["MedicationRequest/m1"],
    )
    assert len(cards) == 2


def test_nothing_when_no_trial_is_at_stake(client: FlaskClient) -> None:
    assert _sign(client, "both-candidate", med_order("m2", *OCTREOTIDE)) == []
    # excluded already: nothing to lose
    assert _sign(client, "prior-tace", service_order("s1", *Y90, pid="prior-tace")) == []


def test_irrelevant_orders_need_no_patient_data_at_all() -> None:
    stub = StubFhir(fixture_resources("both-candidate.json"))
    for running in serve_stub(stub):
        client = dev_app(fhir_trusted_servers=[running.base_url]).test_client()
        body = hook_body("order-sign", fhirServer=running.base_url)
        body["context"]["draftOrders"] = draft_bundle(med_order("m2", *OCTREOTIDE))
        response = post(client, service(body["hook"]), body)
        assert response.status_code == 200 and response.get_json() == {"cards": []}
        assert running.requests == []
        # a relevant one fetches what it needs, and only for the trials at stake
        body["context"]["draftOrders"] = draft_bundle(med_order("m1", *TEMOZOLOMIDE))
        response = post(client, service(body["hook"]), body)
        assert response.status_code == 200 and len(response.get_json()["cards"]) == 2
        assert running.requests


def test_draft_orders_reads_medication_references() -> None:
    contained = {
        "resourceType": "MedicationRequest",
        "id": "m3",
        "status": "draft",
        "intent": "order",
        "contained": [
            {
                "resourceType": "Medication",
                "id": "med",
                "code": {
                    "coding": [
                        {
                            "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                            "code": CAPECITABINE[0],
                        }
                    ]
                },
            }
        ],
        "medicationReference": {"reference": "#med"},
    }
    bundled = {
        "resourceType": "MedicationRequest",
        "id": "m4",
        "status": "draft",
        "intent": "order",
        "medicationReference": {"reference": "Medication/tmz"},
    }
    medication = {
        "resourceType": "Medication",
        "id": "tmz",
        "code": {
            "coding": [
                {"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": TEMOZOLOMIDE[0]}
            ]
        },
    }
    orders = draft_orders(draft_bundle(contained, bundled, medication))
    assert [o.reference for o in orders] == ["MedicationRequest/m3", "MedicationRequest/m4"]
    trials = load_trials()
    assert trials_at_stake(trials, trials.ids, orders[:1]) == set(trials.ids)
    assert trials_at_stake(trials, trials.ids, orders[1:]) == set(trials.ids)


def test_biliary_stent_only_concerns_the_trial_that_excludes_it() -> None:
    trials = load_trials()
    stent_codes = sorted(trials.valueset("biliary-stent").codes)
    system, code = stent_codes[0]
    orders = draft_orders(draft_bundle(service_order("s2", system, code, "biliary stent")))
    assert trials_at_stake(trials, trials.ids, orders) == {"NCT04339036"}


NDC = "http://hl7.org/fhir/sid/ndc"
XELODA_BRANDED = {
    "213293": "capecitabine 500 MG Oral Tablet",
    "213292": "capecitabine 150 MG Oral Tablet",
}


def _ndc_order(oid: str, code: str) -> dict[str, Any]:
    """A draft order coded only with an NDC, without text or display."""
    return med_order(oid, code, None, system=NDC)


@pytest.mark.parametrize(("hook", "rxcui"), [("order-sign", "213293"), ("order-select", "213292")])
def test_xeloda_by_branded_rxcui_warns_for_both_trials(
    client: FlaskClient, hook: str, rxcui: str
) -> None:
    name = f"{XELODA_BRANDED[rxcui]} [Xeloda]"
    cards = _sign(client, "both-candidate", med_order("x1", rxcui, name), hook=hook)
    assert {c["summary"].split(" ", 1)[0] for c in cards} == {"NCT04339036", "NCT05610826"}
    for card in cards:
        assert card["indicator"] == "warning"
        # Markdown escapes the brackets of the RxNorm name
        assert f"{XELODA_BRANDED[rxcui]} \\[Xeloda\\]" in card["detail"]


@pytest.mark.parametrize("code", ["0004-1100-20", "00004110020"])
def test_xeloda_by_ndc_warns_and_names_the_drug(client: FlaskClient, code: str) -> None:
    cards = _sign(client, "both-candidate", _ndc_order("x2", code))
    assert {c["summary"].split(" ", 1)[0] for c in cards} == {"NCT04339036", "NCT05610826"}
    for card in cards:
        assert card["indicator"] == "warning"
        # named from the NDC map, not as a system URL
        assert "Xeloda (capecitabine) 150 mg oral tablet (NDC 0004-1100-20)" in card["detail"]
        assert "hl7.org/fhir/sid/ndc" not in card["detail"]


def test_an_ndc_outside_the_map_gives_no_warning(client: FlaskClient) -> None:
    assert _sign(client, "both-candidate", _ndc_order("x3", "12345-6789-01")) == []
