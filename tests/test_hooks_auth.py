"""CDS client authentication (checklist J1-J10, D6, F7, S10) and the logs it leaves."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import jwt
import pytest
from flask.testing import FlaskClient

from tests.hooks_data.support import (
    PUBLIC,
    PV,
    Signer,
    check_any,
    fixture_resources,
    full_prefetch,
    hook_body,
    post,
    secure_app,
    serve_json,
)

DISCOVERY = "/cds-services"
SERVICE = f"/cds-services/{PV}"


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer()


@pytest.fixture(scope="module")
def rsa_signer() -> Signer:
    return Signer(iss="https://other-ehr.example.org", alg="RS384")


@pytest.fixture()
def client(signer: Signer, rsa_signer: Signer) -> FlaskClient:
    issuers = {
        signer.iss: {"jwks": signer.jwks, "fhir_servers": ["https://fhir.example.org/r4"]},
        rsa_signer.iss: {"jwks": rsa_signer.jwks, "tenants": ["hospital-a"]},
    }
    return secure_app(signer, trusted_issuers=issuers).test_client()


def _prefetch() -> dict[str, Any]:
    return full_prefetch(fixture_resources("both-candidate.json"), "both-candidate")


def _get(client: FlaskClient, path: str, token: str | None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = client.get(path, headers=headers)
    check_any(response)
    return response


def _assert_401(response: Any) -> None:
    assert response.status_code == 401
    body = response.get_json()
    assert body["issue"][0]["code"] == "login"
    assert "diagnostics" not in body["issue"][0]  # "without any additional information"


def test_d6_j1_discovery_needs_a_jwt(client: FlaskClient, signer: Signer) -> None:
    _assert_401(_get(client, DISCOVERY, None))
    _assert_401(client.get(DISCOVERY, headers={"Authorization": "Basic dXNlcjpwdw=="}))
    assert _get(client, DISCOVERY, signer.token(PUBLIC + DISCOVERY)).status_code == 200


def test_j1_every_endpoint_but_healthz_needs_a_jwt(client: FlaskClient) -> None:
    _assert_401(post(client, SERVICE, hook_body()))
    _assert_401(post(client, f"{SERVICE}/feedback", {"feedback": []}))
    _assert_401(post(client, "/cds-services/unknown", hook_body()))
    assert client.get("/healthz").status_code == 200


def test_j2_alg_none_is_rejected(client: FlaskClient) -> None:
    now = int(time.time())
    token = jwt.encode(
        {
            "iss": "https://ehr.example.org",
            "aud": PUBLIC + DISCOVERY,
            "iat": now,
            "exp": now + 60,
            "jti": "n1",
        },
        None,
        algorithm="none",
        headers={"kid": "x", "typ": "JWT"},
    )
    _assert_401(_get(client, DISCOVERY, token))


def test_j2_hmac_is_rejected_even_with_the_public_key_as_secret(
    client: FlaskClient, signer: Signer
) -> None:
    now = int(time.time())
    claims = {"iss": signer.iss, "aud": PUBLIC + DISCOVERY, "iat": now, "exp": now + 60}
    pem = json.dumps(signer.jwk).encode()
    # PyJWT refuses asymmetric-looking HMAC secrets, so sign the confusion token by hand.
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": signer.kid}).encode())
    payload = b64(json.dumps({**claims, "jti": "h1"}).encode())
    signature = b64(hmac.new(pem, header + b"." + payload, hashlib.sha256).digest())
    _assert_401(_get(client, DISCOVERY, (header + b"." + payload + b"." + signature).decode()))
    token = jwt.encode(
        {**claims, "jti": "h2"}, "s" * 64, algorithm="HS384", headers={"kid": signer.kid}
    )
    _assert_401(_get(client, DISCOVERY, token))


def test_j3_es384_and_rs384_are_accepted(
    client: FlaskClient, signer: Signer, rsa_signer: Signer
) -> None:
    assert _get(client, DISCOVERY, signer.token(PUBLIC + DISCOVERY)).status_code == 200
    token = rsa_signer.token(PUBLIC + DISCOVERY, tenant="hospital-a")
    assert _get(client, DISCOVERY, token).status_code == 200
    assert jwt.get_unverified_header(token)["alg"] == "RS384"


def test_j3_other_asymmetric_algorithms_are_rejected(client: FlaskClient, signer: Signer) -> None:
    es256 = Signer(iss=signer.iss, alg="ES384")
    from cryptography.hazmat.primitives.asymmetric import ec

    es256.private = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    token = jwt.encode(
        {"iss": signer.iss, "aud": PUBLIC + DISCOVERY, "iat": now, "exp": now + 60, "jti": "e1"},
        es256.private,
        algorithm="ES256",
        headers={"kid": signer.kid},
    )
    _assert_401(_get(client, DISCOVERY, token))


def test_an_audience_mismatch_logs_both_audiences_and_not_the_token(
    client: FlaskClient, signer: Signer, caplog: pytest.LogCaptureFixture
) -> None:
    token = signer.token("http://localhost:8085/cds-services")
    with caplog.at_level(logging.INFO):
        _assert_401(_get(client, DISCOVERY, token))
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert "'http://localhost:8085/cds-services'" in said
    assert f"'{PUBLIC}{DISCOVERY}'" in said
    assert token not in said and token.split(".")[2] not in said


def test_j4_audience(client: FlaskClient, signer: Signer) -> None:
    _assert_401(_get(client, DISCOVERY, signer.token(f"{PUBLIC}/cds-services/other")))
    _assert_401(_get(client, DISCOVERY, signer.token("https://evil.example/cds-services")))
    listed = signer.token(["https://x.example", PUBLIC + DISCOVERY])
    assert _get(client, DISCOVERY, listed).status_code == 200
    response = post(client, SERVICE, hook_body(prefetch=_prefetch()), signer.auth(SERVICE))
    assert response.status_code == 200
    _assert_401(post(client, SERVICE, hook_body(), signer.auth(DISCOVERY)))


@pytest.mark.parametrize(
    "tamper",
    [
        {"exp": int(time.time()) - 3600},  # expired
        {"iat": int(time.time()) + 3600, "exp": int(time.time()) + 3900},  # iat in the future
        {"drop": ("jti",)},
        {"drop": ("exp",)},
        {"drop": ("iat",)},
        {"drop": ("iss",)},
        {"drop": ("aud",)},
        {"headers": {"kid": None}},  # no kid
        {"headers": {"typ": "at+jwt"}},
        {"iat": int(time.time()), "exp": int(time.time()) + 86400},  # lives a day
        {"nbf": int(time.time()) + 3600},
    ],
)
def test_j5_claims_and_header(client: FlaskClient, signer: Signer, tamper: dict[str, Any]) -> None:
    _assert_401(_get(client, DISCOVERY, signer.token(PUBLIC + DISCOVERY, **tamper)))


def test_small_clock_skew_is_tolerated(client: FlaskClient, signer: Signer) -> None:
    now = int(time.time())
    token = signer.token(PUBLIC + DISCOVERY, iat=now + 10, exp=now + 300)
    assert _get(client, DISCOVERY, token).status_code == 200


def test_j6_replayed_jti_is_rejected(client: FlaskClient, signer: Signer) -> None:
    token = signer.token(PUBLIC + DISCOVERY)
    assert _get(client, DISCOVERY, token).status_code == 200
    _assert_401(_get(client, DISCOVERY, token))


def test_j7_unknown_issuer_and_unlisted_jku(client: FlaskClient, signer: Signer) -> None:
    stranger = Signer(iss="https://stranger.example")
    _assert_401(_get(client, DISCOVERY, stranger.token(PUBLIC + DISCOVERY)))
    # a jku not allowlisted for the issuer: refused before any fetch
    documents = {"/jwks.json": signer.jwks}
    for base, hits in serve_json(documents):
        token = signer.token(PUBLIC + DISCOVERY, headers={"jku": f"{base}/jwks.json"})
        _assert_401(_get(client, DISCOVERY, token))
        assert hits == []


def test_j8_unknown_kid_refetches_the_allowlisted_jku_once_then_rotates(signer: Signer) -> None:
    old, new = Signer(iss=signer.iss), Signer(iss=signer.iss)
    documents: dict[str, Any] = {"/jwks.json": old.jwks}
    for base, hits in serve_json(documents):
        jku = f"{base}/jwks.json"
        app = secure_app(
            signer,
            dev=True,  # a plain-http jku on loopback: development mode only
            trusted_issuers={signer.iss: {"jku": [jku]}},
            jwks_refetch_interval_s=0,
        )
        client = app.test_client()
        assert (
            _get(client, DISCOVERY, old.token(PUBLIC + DISCOVERY, headers={"jku": jku})).status_code
            == 200
        )
        assert len(hits) == 1
        # cached: a second call with a known kid fetches nothing
        assert (
            _get(client, DISCOVERY, old.token(PUBLIC + DISCOVERY, headers={"jku": jku})).status_code
            == 200
        )
        assert len(hits) == 1
        rotated = new.token(PUBLIC + DISCOVERY, headers={"jku": jku})
        _assert_401(_get(client, DISCOVERY, rotated))
        assert len(hits) == 2  # exactly one refresh for the unknown kid
        documents["/jwks.json"] = {"keys": [old.jwk, new.jwk]}
        assert _get(client, DISCOVERY, rotated).status_code == 200  # same token, now known
        assert len(hits) == 3


def test_j8_refetch_is_rate_limited(signer: Signer) -> None:
    documents: dict[str, Any] = {"/jwks.json": signer.jwks}
    for base, hits in serve_json(documents):
        jku = f"{base}/jwks.json"
        app = secure_app(
            signer,
            dev=True,
            trusted_issuers={signer.iss: {"jku": [jku]}},
            jwks_refetch_interval_s=600,
        )
        client = app.test_client()
        for _ in range(5):
            bogus = Signer(iss=signer.iss).token(PUBLIC + DISCOVERY, headers={"jku": jku})
            _assert_401(_get(client, DISCOVERY, bogus))
        assert len(hits) == 1


def test_jku_in_production_must_be_https(signer: Signer) -> None:
    from cds.errors import InputError

    with pytest.raises(InputError, match="https"):
        secure_app(signer, trusted_issuers={signer.iss: {"jku": ["http://127.0.0.1:1/j"]}})


def test_jwks_file_is_reread_on_unknown_kid(signer: Signer, tmp_path: Any) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(signer.jwks))
    client = secure_app(
        signer, trusted_issuers={signer.iss: {"jwks_file": str(path)}}, jwks_refetch_interval_s=0
    ).test_client()
    assert _get(client, DISCOVERY, signer.token(PUBLIC + DISCOVERY)).status_code == 200
    newer = Signer(iss=signer.iss)
    _assert_401(_get(client, DISCOVERY, newer.token(PUBLIC + DISCOVERY)))
    path.write_text(json.dumps({"keys": [signer.jwk, newer.jwk]}))
    assert _get(client, DISCOVERY, newer.token(PUBLIC + DISCOVERY)).status_code == 200


def test_key_of_another_type_than_alg_is_rejected(signer: Signer) -> None:
    rsa = Signer(iss=signer.iss, alg="RS384", kid=signer.kid)
    client = secure_app(signer).test_client()
    _assert_401(_get(client, DISCOVERY, rsa.token(PUBLIC + DISCOVERY)))


def test_j9_tenant(client: FlaskClient, rsa_signer: Signer) -> None:
    _assert_401(_get(client, DISCOVERY, rsa_signer.token(PUBLIC + DISCOVERY, tenant="other")))
    _assert_401(_get(client, DISCOVERY, rsa_signer.token(PUBLIC + DISCOVERY)))
    ok = rsa_signer.token(PUBLIC + DISCOVERY, tenant="hospital-a")
    assert _get(client, DISCOVERY, ok).status_code == 200


def test_j10_p9_logs_carry_iss_jti_tenant_but_never_the_token(
    client: FlaskClient, rsa_signer: Signer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = rsa_signer.token(PUBLIC + SERVICE, tenant="hospital-a", jti="jti-for-the-log")
    access_token = "fhir-access-token-SECRET"
    body = hook_body(
        prefetch=_prefetch(),
        fhirServer="https://fhir.example.org/r4",
        fhirAuthorization={
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": 60,
            "scope": "patient/*.read",
            "subject": "cds",
        },
    )
    response = post(client, SERVICE, body, {"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    _assert_401(post(client, SERVICE, body, {"Authorization": f"Bearer {token}"}))  # replay
    text = caplog.text
    assert token not in text and token.split(".")[1] not in text and token.split(".")[2] not in text
    assert access_token not in text
    assert "both-candidate" not in text  # the patient id
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "cds.hooks.calls"]
    ok = next(line for line in lines if line["status"] == 200)
    assert ok["iss"] == rsa_signer.iss and ok["tenant"] == "hospital-a"
    assert ok["jti"] == "jti-for-the-log"
    assert ok["hookInstance"] == body["hookInstance"] and ok["service"] == PV
    assert ok["card_count"] == 2 and set(ok["trials"]) == {"NCT04339036", "NCT05610826"}
    assert "latency_ms" in ok and ok["prefetch_used"]
    assert any(line["status"] == 401 for line in lines)


def test_s10_fhir_server_not_allowlisted_for_the_issuer_is_never_contacted(
    client: FlaskClient, rsa_signer: Signer, signer: Signer
) -> None:
    from tests.hooks_data.support import StubFhir, serve_stub

    stub = StubFhir(fixture_resources("both-candidate.json"))
    for running in serve_stub(stub):
        for server in (
            running.base_url,
            "http://169.254.169.254/latest",
            "https://fhir.example.org/r4-other",
        ):
            body = hook_body(fhirServer=server)
            response = post(client, SERVICE, body, signer.auth(SERVICE))
            assert response.status_code == 412, server
            assert "not a trusted FHIR server" in response.get_json()["issue"][0]["diagnostics"]
        # the other issuer's allowlist does not extend to this one
        token = rsa_signer.token(PUBLIC + SERVICE, tenant="hospital-a")
        body = hook_body(fhirServer="https://fhir.example.org/r4")
        response = post(client, SERVICE, body, {"Authorization": f"Bearer {token}"})
        assert response.status_code == 412
        assert running.requests == []


def test_s9_plain_http_fhir_server_in_production_is_never_contacted(signer: Signer) -> None:
    from tests.hooks_data.support import StubFhir, serve_stub

    stub = StubFhir(fixture_resources("both-candidate.json"))
    for running in serve_stub(stub):
        client = secure_app(signer).test_client()
        response = post(
            client, SERVICE, hook_body(fhirServer=running.base_url), signer.auth(SERVICE)
        )
        assert response.status_code == 412
        assert running.requests == []
