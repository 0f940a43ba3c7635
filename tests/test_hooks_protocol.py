"""CDS Hooks protocol: discovery (D1-D5), request handling (S1-S8), CORS (C1-C2), healthz (O2)."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.hooks_data.support import (
    ORD,
    PV,
    StubFhir,
    check_any,
    check_discovery,
    dev_app,
    draft_bundle,
    fixture_resources,
    full_prefetch,
    hook_body,
    med_order,
    post,
    serve_stub,
    without_uuids,
)

_TOKEN_RE = re.compile(
    r"^\{\{(context\.(patientId|userId|encounterId)|userPractitionerId|userPractitionerRoleId"
    r"|userPatientId|userRelatedPersonId)\}\}$"
)


@pytest.fixture(scope="module")
def app() -> Flask:
    return dev_app()


@pytest.fixture()
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture(scope="module")
def candidate_prefetch() -> dict[str, Any]:
    return full_prefetch(fixture_resources("both-candidate.json"), "both-candidate")


# -- discovery -------------------------------------------------------------------------------


def test_d1_discovery_is_json_with_services(client: FlaskClient) -> None:
    response = client.get("/cds-services")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert isinstance(body["services"], list) and body["services"]


def test_d2_d2b_d5_services_are_complete_and_unique(client: FlaskClient) -> None:
    body = client.get("/cds-services").get_json()
    check_discovery(body)  # D2b: no null/empty anywhere; the project's discovery schema
    pairs = [(s["id"], s["hook"]) for s in body["services"]]
    assert len(pairs) == len(set(pairs))
    assert set(pairs) == {
        (PV, "patient-view"),
        (ORD["order-select"], "order-select"),
        (ORD["order-sign"], "order-sign"),
    }
    assert len({s["id"] for s in body["services"]}) == len(body["services"])  # one id, one hook
    for service in body["services"]:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", service["id"])
        assert service["description"] and service["title"] and service["usageRequirements"]
        assert all(
            isinstance(k, str) and isinstance(v, str) for k, v in service["prefetch"].items()
        )


def test_d3_d4_prefetch_templates_use_only_2_0_tokens_and_the_query_subset(
    client: FlaskClient,
) -> None:
    for service in client.get("/cds-services").get_json()["services"]:
        for template in service["prefetch"].values():
            for token in re.findall(r"\{\{[^}]*\}\}", template):
                assert _TOKEN_RE.match(token), token
            assert "today()" not in template
            parts = urlsplit(template)
            assert not parts.scheme and not parts.netloc and not template.startswith("/")
            assert re.fullmatch(r"[A-Z][A-Za-z]+(/\{\{context\.patientId\}\})?", parts.path)
            for name, _ in parse_qsl(parts.query):
                assert name in (
                    "patient",
                    "code",
                    "combo-code",
                    "_count",
                    "_sort",
                ) or name.endswith(":in")
            assert "sort:desc" not in template


def test_discovery_follows_the_enabled_trials() -> None:
    only_a = dev_app(trials=["NCT04339036"]).test_client().get("/cds-services").get_json()
    service = next(s for s in only_a["services"] if s["id"] == PV)
    assert "NCT04339036" in service["description"] and "NCT05610826" not in service["description"]
    none = dev_app(trials=[]).test_client().get("/cds-services").get_json()
    assert none == {"services": []}


# -- request handling ------------------------------------------------------------------------


def test_s1_full_prefetch_makes_no_fhir_call(
    client: FlaskClient, candidate_prefetch: dict[str, Any]
) -> None:
    stub = StubFhir(fixture_resources("both-candidate.json"))
    for running in serve_stub(stub):
        app = dev_app(fhir_trusted_servers=[running.base_url])
        body = hook_body(prefetch=candidate_prefetch, fhirServer=running.base_url)
        response = post(app.test_client(), f"/cds-services/{PV}", body)
        assert response.status_code == 200
        assert len(response.get_json()["cards"]) == 2
        assert running.requests == []


def test_s2_malformed_json_is_400_with_an_operation_outcome(client: FlaskClient) -> None:
    response = post(client, f"/cds-services/{PV}", None, raw=b'{"hook": "patient-view",')
    assert response.status_code == 400
    assert "not valid JSON" in response.get_json()["issue"][0]["diagnostics"]
    for raw in (b"", b"[]", b'"text"', b"\xff\xfe"):
        assert post(client, f"/cds-services/{PV}", None, raw=raw).status_code == 400


@pytest.mark.parametrize(
    ("drop", "expression"),
    [("hook", "hook"), ("hookInstance", "hookInstance"), ("context", "context")],
)
def test_s3_missing_required_fields_are_named(
    client: FlaskClient, drop: str, expression: str
) -> None:
    body = hook_body()
    del body[drop]
    response = post(client, f"/cds-services/{PV}", body)
    assert response.status_code == 400
    assert response.get_json()["issue"][0]["expression"] == [expression]


@pytest.mark.parametrize("field", ["patientId", "userId"])
def test_s3_patient_view_context_fields(client: FlaskClient, field: str) -> None:
    body = hook_body()
    del body["context"][field]
    response = post(client, f"/cds-services/{PV}", body)
    assert response.status_code == 400
    issue = response.get_json()["issue"][0]
    assert issue["expression"] == [f"context.{field}"]
    assert issue["code"] == "invalid"


def test_s3_wrong_types_are_400_without_echoing_the_value(client: FlaskClient) -> None:
    body = hook_body()
    body["context"]["patientId"] = "secret value with spaces"
    response = post(client, f"/cds-services/{PV}", body)
    assert response.status_code == 400
    assert "secret" not in response.get_data(as_text=True)
    body = hook_body(prefetch={"patient": "not-an-object"})
    assert post(client, f"/cds-services/{PV}", body).status_code == 400


def test_s4_hook_not_served_by_the_id_is_400(client: FlaskClient) -> None:
    response = post(client, f"/cds-services/{PV}", hook_body("order-sign"))
    assert response.status_code == 400
    assert response.get_json()["issue"][0]["expression"] == ["hook"]
    response = post(client, f"/cds-services/{PV}", hook_body("encounter-start"))
    assert response.status_code == 400


def test_s4_one_id_two_hooks_dispatches_on_body_hook(
    client: FlaskClient, candidate_prefetch: dict[str, Any]
) -> None:
    order = med_order("draft-1", "200328", "capecitabine 500 MG Oral Tablet")
    sign = hook_body("order-sign", prefetch=candidate_prefetch)
    sign["context"]["draftOrders"] = draft_bundle(order)
    select = hook_body("order-select", prefetch=candidate_prefetch)
    select["context"].update(
        draftOrders=draft_bundle(order), selections=["MedicationRequest/draft-1"]
    )
    for body in (sign, select):
        response = post(client, f"/cds-services/{ORD[body['hook']]}", body)
        assert response.status_code == 200, response.get_json()
        assert response.get_json()["cards"]
    # order-select without selections: its own context schema applies
    del select["context"]["selections"]
    response = post(client, f"/cds-services/{ORD['order-select']}", select)
    assert response.status_code == 400
    assert response.get_json()["issue"][0]["expression"] == ["context.selections"]


def test_s5_unknown_service_is_404_and_wrong_method_405(client: FlaskClient) -> None:
    response = post(client, "/cds-services/does-not-exist", hook_body())
    assert response.status_code == 404
    for response in (
        client.get(f"/cds-services/{PV}"),
        client.post("/cds-services"),
        client.put(f"/cds-services/{PV}"),
        client.get(f"/cds-services/{PV}/feedback"),
    ):
        check_any(response)
        assert response.status_code == 405
        assert "POST" in response.headers["Allow"] or "GET" in response.headers["Allow"]
    check_any(client.get("/nowhere"))


def test_s6_charset_parameter_is_accepted(
    client: FlaskClient, candidate_prefetch: dict[str, Any]
) -> None:
    body = hook_body(prefetch=candidate_prefetch)
    response = post(
        client, f"/cds-services/{PV}", body, content_type="application/json; charset=utf-8"
    )
    assert response.status_code == 200
    response = post(client, f"/cds-services/{PV}", body, content_type="text/html")
    assert response.status_code == 415


def test_s7_unknown_fields_and_extension_are_ignored(
    client: FlaskClient, candidate_prefetch: dict[str, Any]
) -> None:
    plain = post(client, f"/cds-services/{PV}", hook_body(prefetch=candidate_prefetch))
    body = hook_body(
        prefetch=candidate_prefetch, extension={"com.example.x": 1}, somethingNew={"a": [1]}
    )
    body["context"]["com.example.extra"] = "ignored"
    body["prefetch"]["unrequested"] = {"resourceType": "Bundle", "type": "searchset"}
    extended = post(client, f"/cds-services/{PV}", body)
    assert extended.status_code == 200
    assert without_uuids(extended.get_json()) == without_uuids(plain.get_json())


def test_s8_fhir_authorization_without_fhir_server_is_400(client: FlaskClient) -> None:
    body = hook_body(
        fhirAuthorization={
            "access_token": "abc",
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/*.read",
            "subject": "cds-service",
        }
    )
    response = post(client, f"/cds-services/{PV}", body)
    assert response.status_code == 400
    issue = response.get_json()["issue"][0]
    assert issue["expression"] == ["fhirServer"]
    assert "fhirAuthorization" in issue["diagnostics"]


def test_fhir_authorization_fields_are_checked(client: FlaskClient) -> None:
    body = hook_body(
        fhirServer="https://fhir.example.org",
        fhirAuthorization={
            "access_token": "abc",
            "token_type": "MAC",
            "expires_in": 300,
            "scope": "x",
            "subject": "y",
        },
    )
    response = post(client, f"/cds-services/{PV}", body)
    assert response.status_code == 400
    assert response.get_json()["issue"][0]["expression"] == ["fhirAuthorization.token_type"]


def test_oversized_body_is_413_outcome() -> None:
    client = dev_app(max_request_bytes=1000).test_client()
    response = post(client, f"/cds-services/{PV}", hook_body(padding="x" * 2000))
    assert response.status_code == 413


# -- CORS and operations ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/cds-services", f"/cds-services/{PV}", f"/cds-services/{PV}/feedback"]
)
def test_c1_preflight_from_an_allowed_origin(client: FlaskClient, path: str) -> None:
    response = client.options(
        path,
        headers={
            "Origin": "http://localhost:8080",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert 200 <= response.status_code < 300
    assert response.headers["Access-Control-Allow-Origin"] == "http://localhost:8080"
    methods = response.headers["Access-Control-Allow-Methods"]
    assert "GET" in methods and "POST" in methods
    allowed = response.headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed


def test_c1_actual_responses_carry_the_origin(client: FlaskClient) -> None:
    response = client.get("/cds-services", headers={"Origin": "http://localhost:8080"})
    assert response.headers["Access-Control-Allow-Origin"] == "http://localhost:8080"
    response = post(client, "/cds-services/nope", {}, {"Origin": "http://localhost:8080"})
    assert response.headers["Access-Control-Allow-Origin"] == "http://localhost:8080"


def test_c2_disallowed_origin_gets_no_cors_headers(client: FlaskClient) -> None:
    response = client.options(
        "/cds-services",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert "Access-Control-Allow-Origin" not in response.headers
    response = client.get("/cds-services", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in response.headers


def test_c2_star_only_in_development() -> None:
    from cds.errors import InputError
    from tests.hooks_data.support import Signer, secure_app

    with pytest.raises(InputError, match="cors_origins"):
        secure_app(Signer(), cors_origins=["*"])
    client = dev_app(cors_origins=["*"]).test_client()
    response = client.get("/cds-services", headers={"Origin": "https://any.example"})
    assert response.headers["Access-Control-Allow-Origin"] == "https://any.example"


def test_o2_healthz(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200 and response.get_json() == {"status": "ok"}


def test_an_engine_failure_is_a_logged_500_never_an_empty_answer(
    monkeypatch: pytest.MonkeyPatch,
    candidate_prefetch: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    import cds.hooks.screening as screening

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("engine bug")

    monkeypatch.setattr(screening, "evaluate", broken)
    client = dev_app().test_client()
    response = post(client, f"/cds-services/{PV}", hook_body(prefetch=candidate_prefetch))
    # Issue 13 item 7: "{"cards": []}" would read as "all clear" in the EHR.
    assert response.status_code == 500
    body = response.get_json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == "exception"
    assert "engine bug" in caplog.text and "unexpected error" in caplog.text
