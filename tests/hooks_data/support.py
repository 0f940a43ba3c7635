"""Helpers of the CDS Hooks tests: JWTs, apps, requests, a stub FHIR server, response checks."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from flask import Flask
from flask.testing import FlaskClient
from jsonschema import Draft202012Validator

from cds.criteria import load_trials
from cds.fhir.queries import build_patient_queries
from cds.hooks.app import create_app
from cds.hooks.validation import load_schema

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "fhir_fixtures"
DATA = Path(__file__).resolve().parent
AS_OF = "2026-11-01"
A, B = "NCT04339036", "NCT05610826"
PUBLIC = "https://cds.example.org"
ISS = "https://ehr.example.org"
PV = "trial-screening"
ORD_SELECT = "trial-order-select"
ORD_SIGN = "trial-order-sign"
ORD = {"order-select": ORD_SELECT, "order-sign": ORD_SIGN}
_UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


# -- keys and tokens -----------------------------------------------------------------------


class Signer:
    """A CDS client's key pair and its JWKS; mints CDS Hooks JWTs (ES384 or RS384)."""

    def __init__(self, iss: str = ISS, alg: str = "ES384", kid: str | None = None) -> None:
        self.iss, self.alg = iss, alg
        self.kid = kid or f"{alg.lower()}-{uuid.uuid4().hex[:8]}"
        if alg == "ES384":
            self.private = ec.generate_private_key(ec.SECP384R1())
            algo: Any = jwt.algorithms.ECAlgorithm
        else:
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            algo = jwt.algorithms.RSAAlgorithm
        self.public = self.private.public_key()
        self.jwk: dict[str, Any] = {
            **algo.to_jwk(self.public, as_dict=True),
            "kid": self.kid,
            "alg": alg,
            "use": "sig",
        }

    @property
    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.jwk]}

    def token(
        self,
        aud: str | list[str],
        *,
        headers: Mapping[str, Any] | None = None,
        drop: tuple[str, ...] = (),
        **claims: Any,
    ) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": self.iss,
            "aud": aud,
            "iat": now,
            "exp": now + 300,
            "jti": str(uuid.uuid4()),
        }
        payload.update(claims)
        for name in drop:
            payload.pop(name, None)
        header: dict[str, Any] = {"typ": "JWT", "kid": self.kid}
        header.update(headers or {})
        header = {k: v for k, v in header.items() if v is not None}
        return jwt.encode(payload, self.private, algorithm=self.alg, headers=header)

    def auth(self, path: str, **kwargs: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(PUBLIC + path, **kwargs)}"}


# -- apps ------------------------------------------------------------------------------------


def dev_app(**overrides: Any) -> Flask:
    """Development mode, client authentication off, in-memory store, pinned as-of date."""
    config: dict[str, Any] = {
        "dev": True,
        "auth_required": False,
        "feedback_db": ":memory:",
        "as_of": AS_OF,
        "cors_origins": ["http://localhost:8080"],
    }
    config.update(overrides)
    return create_app(config)


def secure_app(signer: Signer, **overrides: Any) -> Flask:
    """Production settings: authentication on, the signer's issuer trusted with its JWKS."""
    issuers = overrides.pop("trusted_issuers", None) or {
        signer.iss: {"jwks": signer.jwks, "fhir_servers": ["https://fhir.example.org/r4"]}
    }
    config: dict[str, Any] = {
        "public_base_url": PUBLIC,
        "trusted_issuers": issuers,
        "feedback_db": ":memory:",
        "as_of": AS_OF,
        "cors_origins": ["https://ehr.example.org"],
    }
    config.update(overrides)
    return create_app(config)


# -- requests --------------------------------------------------------------------------------


def fixture_resources(name: str) -> list[dict[str, Any]]:
    bundle = json.loads((FIXTURES / name).read_text())
    return [e["resource"] for e in bundle.get("entry", []) if "resource" in e]


def searchset(resources: list[dict[str, Any]], *, next_url: str | None = None) -> dict[str, Any]:
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources],
    }
    if not resources:
        del bundle["entry"]
    bundle["total"] = len(resources)
    if next_url:
        bundle["link"] = [{"relation": "next", "url": next_url}]
    return bundle


def full_prefetch(resources: list[dict[str, Any]], patient_id: str) -> dict[str, Any]:
    """Every discovery key satisfied, as a client running the templates itself would."""
    queries = build_patient_queries(load_trials())
    prefetch: dict[str, Any] = {}
    for q in queries:
        if q.is_read:
            found = [
                r
                for r in resources
                if r["resourceType"] == q.resource_type and r.get("id") == patient_id
            ]
            prefetch[q.key] = found[0] if found else None
            continue
        matching = [r for r in resources if r["resourceType"] == q.resource_type]
        if q.resource_type == "Observation":
            # combo-code: the Observation's code or any component's code
            wanted = set(parse_qs(urlsplit(q.template).query)["combo-code"][0].split(","))
            matching = [
                r
                for r in matching
                if any(
                    f"{c.get('system')}|{c.get('code')}" in wanted
                    for concept in (
                        r.get("code", {}),
                        *(k.get("code", {}) for k in r.get("component", ())),
                    )
                    for c in concept.get("coding", [])
                )
            ]
        prefetch[q.key] = searchset(matching)
    return prefetch


def prefetch_keys() -> list[str]:
    return [q.key for q in build_patient_queries(load_trials())]


def hook_body(
    hook: str = "patient-view",
    patient_id: str = "both-candidate",
    *,
    prefetch: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    context: dict[str, Any] = {"userId": "Practitioner/doc-1", "patientId": patient_id}
    body: dict[str, Any] = {"hook": hook, "hookInstance": str(uuid.uuid4()), "context": context}
    if prefetch is not None:
        body["prefetch"] = prefetch
    body.update(extra)
    return body


def draft_bundle(*resources: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": r} for r in resources],
    }


def med_order(
    oid: str,
    code: str,
    display: str | None,
    pid: str = "both-candidate",
    system: str = "http://www.nlm.nih.gov/research/umls/rxnorm",
) -> dict[str, Any]:
    """A draft MedicationRequest; without a display, coded only (as pharmacy-facing order
    entry may send an NDC)."""
    coding = {"system": system, "code": code}
    concept: dict[str, Any] = {"coding": [coding]}
    if display is not None:
        coding["display"] = concept["text"] = display
    return {
        "resourceType": "MedicationRequest",
        "id": oid,
        "status": "draft",
        "intent": "order",
        "subject": {"reference": f"Patient/{pid}"},
        "medicationCodeableConcept": concept,
    }


def service_order(
    oid: str, system: str, code: str, display: str, pid: str = "both-candidate"
) -> dict[str, Any]:
    return {
        "resourceType": "ServiceRequest",
        "id": oid,
        "status": "draft",
        "intent": "order",
        "subject": {"reference": f"Patient/{pid}"},
        "code": {"coding": [{"system": system, "code": code, "display": display}], "text": display},
    }


def post(
    client: FlaskClient,
    path: str,
    body: Any,
    headers: Mapping[str, str] | None = None,
    *,
    raw: bytes | None = None,
    content_type: str = "application/json",
) -> Any:
    data = raw if raw is not None else json.dumps(body).encode()
    response = client.post(path, data=data, headers=dict(headers or {}), content_type=content_type)
    check_any(response)
    if (
        response.status_code == 200
        and path.startswith("/cds-services/")
        and not path.endswith("/feedback")
    ):
        check_cards(response.get_json())
    return response


# -- response checks -------------------------------------------------------------------------


def check_any(response: Any) -> None:
    """Every answer: JSON (never HTML), no traceback; non-2xx carry an OperationOutcome."""
    assert response.mimetype == "application/json", response.get_data(as_text=True)[:300]
    text = response.get_data(as_text=True)
    assert "Traceback" not in text and "<html" not in text.lower()
    if response.status_code >= 400:
        body = response.get_json()
        assert body["resourceType"] == "OperationOutcome"
        assert body["issue"] and body["issue"][0]["severity"] == "error"


def no_empty(value: Any, path: str = "$") -> None:
    """R2: no null, "", [] or {} anywhere (the caller exempts cards: [])."""
    assert value is not None and value != "" and value != [] and value != {}, path
    if isinstance(value, dict):
        for k, v in value.items():
            no_empty(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            no_empty(v, f"{path}[{i}]")


_RESPONSE = Draft202012Validator(load_schema("response"))
_DISCOVERY = Draft202012Validator(load_schema("discovery"))


def check_cards(body: dict[str, Any]) -> None:
    """R1-R9 on one hook response."""
    errors = sorted(_RESPONSE.iter_errors(body), key=str)
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors]
    uuids = []
    for card in body["cards"]:
        no_empty(card)
        assert _UUID4.match(card["uuid"])
        uuids.append(card["uuid"])
        assert len(card["summary"]) < 140
        assert "<script" not in card.get("detail", "").lower()
        for s in card.get("suggestions", []):
            uuids.append(s["uuid"])
    assert len(uuids) == len(set(uuids))


def check_discovery(body: dict[str, Any]) -> None:
    errors = sorted(_DISCOVERY.iter_errors(body), key=str)
    assert not errors, [e.message for e in errors]
    for service in body["services"]:
        no_empty(service)


def without_uuids(body: dict[str, Any]) -> list[dict[str, Any]]:
    cards = json.loads(json.dumps(body["cards"]))
    for card in cards:
        card.pop("uuid", None)
        for s in card.get("suggestions", []):
            s.pop("uuid", None)
    return sorted(cards, key=lambda c: c["summary"])


# -- a stub FHIR server (records what it was asked) --------------------------------------------


@dataclass
class StubFhir:
    """An HTTP FHIR stub on 127.0.0.1 serving one patient's resources by type."""

    resources: list[dict[str, Any]]
    status: dict[str, int] = field(default_factory=dict)  # resource type -> HTTP status
    delay: dict[str, float] = field(default_factory=dict)  # resource type -> seconds
    pages: dict[str, dict[str, Any]] = field(default_factory=dict)  # path+query -> Bundle
    requests: list[dict[str, Any]] = field(default_factory=list)
    base_url: str = ""

    def handle(self, path: str, query: str, headers: Mapping[str, str]) -> tuple[int, Any]:
        self.requests.append(
            {"path": path, "query": query, "authorization": headers.get("Authorization")}
        )
        rel = path.split("/fhir/", 1)[-1]
        key = rel + ("?" + query if query else "")
        if key in self.pages:
            return 200, self.pages[key]
        rtype = rel.split("/")[0]
        time.sleep(self.delay.get(rtype, 0))
        if rtype in self.status:
            code = self.status[rtype]
            return code, {
                "resourceType": "OperationOutcome",
                "issue": [
                    {"severity": "error", "code": "processing", "diagnostics": f"stub {code}"}
                ],
            }
        if "/" in rel:
            rid = rel.split("/", 1)[1]
            found = [r for r in self.resources if r["resourceType"] == rtype and r["id"] == rid]
            if not found:
                return 404, {
                    "resourceType": "OperationOutcome",
                    "issue": [{"severity": "error", "code": "not-found"}],
                }
            return 200, found[0]
        return 200, searchset([r for r in self.resources if r["resourceType"] == rtype])


def _make_handler(stub: StubFhir) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server API
            parts = urlsplit(self.path)
            status, body = stub.handle(parts.path, parts.query, self.headers)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/fhir+json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            return

    return Handler


def serve_stub(stub: StubFhir) -> Iterator[StubFhir]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(stub))
    server.daemon_threads = True
    stub.base_url = f"http://127.0.0.1:{server.server_address[1]}/fhir"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield stub
    finally:
        server.shutdown()
        server.server_close()


def serve_json(documents: dict[str, Any]) -> Iterator[tuple[str, list[str]]]:
    """Serve JSON documents by path on 127.0.0.1 (a JWKS endpoint); yields (base, hits)."""
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            hits.append(self.path)
            body = documents.get(self.path)
            data = json.dumps(body).encode()
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


# -- the container's command (scripts/gunicorn-cmd), started for real ------------------------

GUNICORN_CMD = REPO / "scripts" / "gunicorn-cmd"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def container_command(settings: Mapping[str, str], workdir: Path, port: int) -> Iterator[Path]:
    """The container's command serving on 127.0.0.1:``port`` with these ``CDS_*`` settings,
    until ``/healthz`` answers; yields its log file, and stops it (its whole process group)."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "CDS_BIND": f"127.0.0.1:{port}",
        **settings,
    }
    log = workdir / "gunicorn.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(  # noqa: S603 - the project's own script
            [str(GUNICORN_CMD)],
            env=env,
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError) as exc:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"gunicorn did not serve /healthz:\n{log.read_text()[-3000:]}"
                    ) from exc
                time.sleep(0.2)
        yield log
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
