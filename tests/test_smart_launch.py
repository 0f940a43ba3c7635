"""The screening page's launch rules, without a browser: trusted iss only, PKCE and state, narrow
scopes, cookies and CSP. (The full flow against a real authorization server is in
test_smart_page.py.)"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import sqlite3
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

import cds.hooks.smart as smart_module
from cds.config import load_config
from cds.errors import InputError
from cds.hooks.smart import smart_scopes
from cds.hooks.state import EXTENSION
from tests.hooks_data.support import dev_app
from tests.hooks_data.support import serve_json as _serve_json

serve_json = contextlib.contextmanager(_serve_json)

FHIR = "https://ehr.example.org/fhir"


def _app(**overrides: Any) -> Any:
    config: dict[str, Any] = {"fhir_trusted_servers": [FHIR]}
    config.update(overrides)
    return dev_app(**config)


def test_an_untrusted_iss_is_refused_before_any_request() -> None:
    client = _app().test_client()
    response = client.get("/smart/launch?iss=https://evil.example.org/fhir&launch=x")
    assert response.status_code == 400
    assert "not one this service is configured to trust" in response.get_data(as_text=True)
    assert client.get("/smart/launch").status_code == 400  # no iss at all


def test_security_headers_on_every_page() -> None:
    client = _app(smart_frame_ancestors=["https://ehr.example.org"]).test_client()
    response = client.get("/smart/page")
    assert response.status_code == 401  # no session
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp
    assert csp.endswith("frame-ancestors https://ehr.example.org")
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert response.headers["Cache-Control"] == "no-store"
    assert (
        "frame-ancestors 'self'"
        in _app().test_client().get("/smart/page").headers["Content-Security-Policy"]
    )


def test_frame_ancestors_must_be_origins() -> None:
    with pytest.raises(InputError, match="smart_frame_ancestors"):
        load_config({"dev": True, "auth_required": False, "smart_frame_ancestors": ["ehr"]})
    with pytest.raises(InputError, match="https"):
        load_config(
            {
                "public_base_url": "https://cds.example.org",
                "trusted_issuers": {"https://ehr": {"jku": ["https://ehr/jwks"]}},
                "smart_frame_ancestors": ["http://ehr.example.org"],
            }
        )


def test_scopes_are_the_types_the_trials_read() -> None:
    st = _app().extensions[EXTENSION]
    types = sorted({q.resource_type for q in st.queries})
    assert smart_scopes(st, ehr_launch=True).split() == [
        "launch",
        *(f"patient/{t}.rs" for t in types),
    ]
    assert smart_scopes(st, ehr_launch=False).split() == [f"user/{t}.rs" for t in types]
    assert "Patient" in types and "Observation" in types


def test_launch_sends_pkce_state_and_aud_and_sets_a_safe_cookie() -> None:
    config = {
        "authorization_endpoint": "http://127.0.0.1:9/auth",
        "token_endpoint": "http://127.0.0.1:9/token",
        "grant_types_supported": ["authorization_code"],
        "code_challenge_methods_supported": ["S256"],
    }
    with serve_json({"/fhir/.well-known/smart-configuration": config}) as (base, _seen):
        fhir = f"{base}/fhir"
        client = _app(fhir_trusted_servers=[fhir]).test_client()
        response = client.get(f"/smart/launch?iss={fhir}&launch=abc")
    assert response.status_code == 303
    target = urlsplit(response.headers["Location"])
    assert f"{target.scheme}://{target.netloc}{target.path}" == "http://127.0.0.1:9/auth"
    params = {k: v[0] for k, v in parse_qs(target.query).items()}
    assert params["response_type"] == "code" and params["launch"] == "abc"
    assert params["aud"] == fhir and params["code_challenge_method"] == "S256"
    assert len(params["state"]) >= 32 and len(params["code_challenge"]) == 43
    assert params["redirect_uri"] == "http://localhost/smart/callback"
    cookie = response.headers["Set-Cookie"]
    for attribute in ("Secure", "HttpOnly", "SameSite=None", "Partitioned", "Path=/smart"):
        assert attribute in cookie
    # neither the verifier nor anything token-like travels in the URL
    assert "code_verifier" not in response.headers["Location"]
    assert base64.urlsafe_b64decode(params["code_challenge"] + "=") != hashlib.sha256(b"").digest()


def test_a_server_without_user_launch_is_open_only_in_development() -> None:
    config = {"token_endpoint": "https://x/token", "grant_types_supported": ["client_credentials"]}
    with serve_json({"/fhir/.well-known/smart-configuration": config}) as (base, _seen):
        fhir = f"{base}/fhir"
        dev = _app(fhir_trusted_servers=[fhir]).test_client()
        response = dev.get(f"/smart/launch?iss={fhir}&patient=both-candidate")
        assert response.status_code == 303
        assert response.headers["Location"].endswith("/smart/page")
        bad = dev.get(f"/smart/launch?iss={fhir}&patient=../Patient")
        assert bad.status_code == 400 and "not a patient id" in bad.get_data(as_text=True)


def test_outside_development_a_server_without_user_launch_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A named fake: an https FHIR server whose SMART configuration offers only backend services
    # (no loopback https server here to serve it for real).
    monkeypatch.setattr(
        smart_module,
        "_smart_configuration",
        lambda st, iss: {"grant_types_supported": ["client_credentials"]},
    )
    production = {
        "public_base_url": "https://cds.example.org",
        "trusted_issuers": {"https://ehr.example.org": {"jku": ["https://ehr.example.org/jwks"]}},
        "fhir_trusted_servers": [FHIR],
        "feedback_db": ":memory:",
    }
    from cds.hooks.app import create_app

    client = create_app(production).test_client()
    response = client.get(f"/smart/launch?iss={FHIR}&patient=both-candidate")
    assert response.status_code == 400
    assert "offers no SMART user launch" in response.get_data(as_text=True)


def test_callback_without_the_launch_session_is_refused() -> None:
    client = _app().test_client()
    response = client.get("/smart/callback?code=c&state=s")
    assert response.status_code == 400
    assert "not one this page started" in response.get_data(as_text=True)


def test_sessions_are_shared_by_workers_and_stored_hashed(tmp_path: Any) -> None:
    """gunicorn runs several workers: the callback may reach another one than the launch."""
    config = {
        "authorization_endpoint": "http://127.0.0.1:9/auth",
        "token_endpoint": "http://127.0.0.1:9/token",
        "grant_types_supported": ["authorization_code"],
        "code_challenge_methods_supported": ["S256"],
    }
    db = str(tmp_path / "cds.sqlite3")
    with serve_json({"/fhir/.well-known/smart-configuration": config}) as (base, _seen):
        fhir = f"{base}/fhir"
        one = _app(fhir_trusted_servers=[fhir], feedback_db=db).test_client()
        two = _app(fhir_trusted_servers=[fhir], feedback_db=db).test_client()
        launched = one.get(f"/smart/launch?iss={fhir}&launch=abc")
    sid = launched.headers["Set-Cookie"].split(";")[0].split("=", 1)[1]
    two.set_cookie("cds_smart_session", sid, path="/smart")
    answer = two.get("/smart/callback?code=c&state=wrong")
    # the other worker found the session (else: "not one this page started")
    assert "does not match this launch" in answer.get_data(as_text=True)
    with sqlite3.connect(db) as conn:
        stored = [row[0] for row in conn.execute("SELECT sid FROM smart_sessions")]
    assert sid not in stored
    assert two.get("/smart/callback?code=c&state=wrong").status_code == 400  # dropped
