"""The official CDS Hooks sandbox as a client: its preflights, JWT, truncated prefetch, feedback."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient

from cds.config import load_config
from tests.hooks_data.support import (
    DATA,
    REPO,
    Signer,
    StubFhir,
    fixture_resources,
    full_prefetch,
    post,
    searchset,
    secure_app,
    serve_stub,
)

SANDBOX_ISS = "https://sandbox.cds-hooks.org"
SANDBOX_JKU = "https://sandbox.cds-hooks.org/.well-known/jwks.json"
ORIGIN = "http://localhost:8080"
BASE = "http://127.0.0.1:8085"
PID = "both-candidate"


@pytest.fixture()
def stub() -> Iterator[StubFhir]:
    yield from serve_stub(StubFhir(fixture_resources("both-candidate.json")))


@pytest.fixture()
def sandbox() -> Signer:
    return Signer(iss=SANDBOX_ISS, alg="ES384")


@pytest.fixture()
def client(sandbox: Signer, stub: StubFhir) -> FlaskClient:
    issuers = {
        SANDBOX_ISS: {"jwks": sandbox.jwks, "jku": [SANDBOX_JKU], "fhir_servers": [stub.base_url]}
    }
    return secure_app(
        sandbox, dev=True, public_base_url=BASE, trusted_issuers=issuers, cors_origins=[ORIGIN]
    ).test_client()


def _jwt(sandbox: Signer, path: str) -> dict[str, str]:
    # The sandbox's header and claims: ES384, typ JWT, kid, jku; iss, aud (exact URL), exp =
    # iat + 300, a v4 jti; no sub, no tenant.
    token = sandbox.token(BASE + path, headers={"jku": SANDBOX_JKU})
    return {"Authorization": f"Bearer {token}", "Origin": ORIGIN}


def _preflight(client: FlaskClient, path: str, method: str) -> None:
    response = client.options(
        path,
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert 200 <= response.status_code < 300
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "authorization" in response.headers["Access-Control-Allow-Headers"].lower()


def test_the_sandbox_call_sequence(client: FlaskClient, sandbox: Signer, stub: StubFhir) -> None:
    _preflight(client, "/cds-services", "GET")
    response = client.get("/cds-services", headers=_jwt(sandbox, "/cds-services"))
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    services = response.get_json()["services"]
    service = next(s for s in services if s["hook"] == "patient-view")
    path = f"/cds-services/{service['id']}"
    _preflight(client, path, "POST")

    # First page only: the Observation key is truncated, its next link the only sign of it.
    prefetch = full_prefetch(fixture_resources("both-candidate.json"), PID)
    key = next(k for k, v in prefetch.items() if k.startswith("observations") and v.get("entry"))
    observations = [e["resource"] for e in prefetch[key]["entry"]]
    stub.pages["Observation?page=2"] = searchset(observations[5:])
    prefetch[key] = searchset(observations[:5], next_url=f"{stub.base_url}/Observation?page=2")
    del prefetch["procedures"]  # a key whose fetch failed is left out
    body = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "fhirServer": stub.base_url,
        "context": {"userId": "Practitioner/COREPRACTITIONER1", "patientId": PID},
        "prefetch": prefetch,
    }
    response = post(client, path, body, _jwt(sandbox, path))
    assert response.status_code == 200, response.get_json()
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    cards = response.get_json()["cards"]
    assert len(cards) == 2
    asked = sorted(f"{r['path']}?{r['query']}" for r in stub.requests)
    assert asked[0] == "/fhir/Observation?page=2"
    assert asked[1].startswith("/fhir/Procedure?patient=both-candidate")
    assert all(r["authorization"] is None for r in stub.requests)  # an open FHIR server

    # "Dismiss": reason code and system only, no display, no userComment.
    feedback_path = f"{path}/feedback"
    _preflight(client, feedback_path, "POST")
    reason = cards[0]["overrideReasons"][0]
    feedback = {
        "feedback": [
            {
                "card": cards[0]["uuid"],
                "outcome": "overridden",
                "overrideReason": {"reason": {"code": reason["code"], "system": reason["system"]}},
                "outcomeTimestamp": "2026-11-01T09:00:00.000Z",
            }
        ]
    }
    response = post(client, feedback_path, feedback, _jwt(sandbox, feedback_path))
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN


def test_the_sandbox_jwks_is_not_fetched_when_given_out_of_band(
    client: FlaskClient, sandbox: Signer
) -> None:
    # jku is allowlisted, but the kid is in the configured key set: no network needed.
    assert client.get("/cds-services", headers=_jwt(sandbox, "/cds-services")).status_code == 200


def test_demo_configuration_loads_with_the_sandbox_public_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(REPO)
    settings = load_config({"config_file": str(DATA / "sandbox-demo.toml")}, env={})
    issuer = settings.trusted_issuers[SANDBOX_ISS]
    assert issuer.jku == (SANDBOX_JKU,) and settings.auth_required and settings.dev
    assert issuer.jwks_file is not None
    keys: Any = json.loads((REPO / issuer.jwks_file).read_text())["keys"]
    assert [k["kid"] for k in keys] == ["44823f3d-0b01-4a6c-a80e-b9d3e8a7226f"]
    assert keys[0]["crv"] == "P-384" and keys[0]["alg"] == "ES384"
