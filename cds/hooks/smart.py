"""The screening page: a SMART on FHIR app (SMART App Launch 2.x) served by the service.

EHR launch: ``/smart/launch?iss=…&launch=…`` → ``{iss}/.well-known/smart-configuration`` →
authorization code with PKCE (S256) and ``state`` → token exchanged and kept server-side (the
browser holds only an opaque session cookie) → ``/smart/page`` reads the patient's record with the
same trial-derived queries and evaluator as the hooks and the sweeps, and shows it.
Standalone launch (no ``launch``): the same flow with user scopes and a patient picker.
A server whose SMART configuration offers no authorization-code grant is read without OAuth,
in development mode only (the local demo server).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import Any
from urllib.parse import urlencode

import requests
from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    has_request_context,
    redirect,
    render_template,
    request,
)
from flask.blueprints import BlueprintSetupState
from werkzeug.wrappers import Response as BaseResponse

from cds.config import Settings
from cds.criteria.model import CriterionResult, PatientEvaluation, Result, TrialEvaluation
from cds.errors import FhirError, InputError, UntrustedFhirServer
from cds.fhir.client import FhirClient, Timeouts
from cds.fhir.queries import check_patient_id, fetch_patient_resources
from cds.fhir.trust import check_transport, normalise_base_url
from cds.hooks.cards import TrialInfo, open_items
from cds.hooks.evidence import EvidenceItem, describe, index_resources, without_ids
from cds.hooks.state import EXTENSION, HooksState, state
from cds.sweep.core import evaluate_resources

__all__ = ["PREFIX", "blueprint", "launch_url", "smart_scopes"]

log = logging.getLogger("cds.hooks.smart")

PREFIX = "/smart"
_COOKIE = "cds_smart_session"
_PENDING_TTL_S = 600  # an authorization round trip that takes longer starts again
_HTTP_TIMEOUT = (5, 15)

blueprint = Blueprint(
    "smart",
    __name__,
    url_prefix=PREFIX,
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)


class LaunchError(Exception):
    """A launch that cannot go on; shown to the user as a page (never with a token in it)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# -- sessions (server-side: the token never reaches the browser) --------------------------------


@dataclass
class Session:
    iss: str
    created: float
    #: the authorization round trip in progress: state, PKCE verifier, endpoints
    state: str | None = None
    verifier: str | None = None
    token_endpoint: str | None = None
    launch: str | None = None
    #: after the token exchange (None on an open server in development mode)
    access_token: str | None = field(default=None, repr=False)
    expires_at: float | None = None
    patient: str | None = None
    scope: str = ""
    open_server: bool = False
    authorized: bool = False


class SessionStore:
    """Sessions keyed by a random 256-bit id (only its SHA-256 is stored); expired ones are
    dropped on access. In the service's SQLite file (``feedback_db``) so that every gunicorn
    worker sees the session the launch started (the callback may reach another worker); in
    process for ``:memory:`` (tests, one process). A session is never changed once stored."""

    def __init__(self, path: str) -> None:
        self._path = None if path == ":memory:" else path
        self._memory: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()
        if self._path is not None:
            with self._db() as db, db:
                db.execute(
                    "CREATE TABLE IF NOT EXISTS smart_sessions"
                    " (sid TEXT PRIMARY KEY, created REAL NOT NULL, data TEXT NOT NULL)"
                )

    def _db(self) -> contextlib.closing[sqlite3.Connection]:
        assert self._path is not None  # noqa: S101 - only called for a file store
        return contextlib.closing(sqlite3.connect(self._path, timeout=10))

    @staticmethod
    def _key(sid: str) -> str:
        return hashlib.sha256(sid.encode("ascii", "replace")).hexdigest()

    def new(self, session: Session) -> str:
        sid = secrets.token_urlsafe(32)
        data = json.dumps(dataclasses.asdict(session))
        if self._path is None:
            with self._lock:
                self._memory[self._key(sid)] = (session.created, data)
        else:
            with self._db() as db, db:
                db.execute(
                    "INSERT INTO smart_sessions (sid, created, data) VALUES (?, ?, ?)",
                    (self._key(sid), session.created, data),
                )
        return sid

    def get(self, sid: str | None, ttl_s: float) -> Session | None:
        if not sid:
            return None
        oldest = time.time() - ttl_s
        key = self._key(sid)
        if self._path is None:
            with self._lock:
                for k in [k for k, (created, _) in self._memory.items() if created < oldest]:
                    del self._memory[k]
                found = self._memory.get(key)
            data = found[1] if found else None
        else:
            with self._db() as db, db:
                db.execute("DELETE FROM smart_sessions WHERE created < ?", (oldest,))
                row = db.execute("SELECT data FROM smart_sessions WHERE sid = ?", (key,)).fetchone()
            data = row[0] if row else None
        return Session(**json.loads(data)) if data else None

    def drop(self, sid: str | None) -> None:
        key = self._key(sid or "")
        if self._path is None:
            with self._lock:
                self._memory.pop(key, None)
        else:
            with self._db() as db, db:
                db.execute("DELETE FROM smart_sessions WHERE sid = ?", (key,))


_SESSIONS = "cds.smart.sessions"


@blueprint.record_once
def _create_store(setup: BlueprintSetupState) -> None:
    # Created with the app (not on first use), so concurrent first requests share one store.
    st = setup.app.extensions[EXTENSION]
    setup.app.extensions[_SESSIONS] = SessionStore(st.settings.feedback_db)


def _store(st: HooksState) -> SessionStore:
    """The app's session store."""
    store = current_app.extensions[_SESSIONS]
    assert isinstance(store, SessionStore)  # noqa: S101 - only this module puts it there
    return store


# -- what the app asks for ---------------------------------------------------------------------


def smart_scopes(st: HooksState, *, ehr_launch: bool) -> str:
    """The narrowest scopes: read and search (SMART 2.x ``.rs``) of exactly the resource types the
    trial-derived queries read, in the patient compartment for an EHR launch and as the user
    for a standalone launch (whose patient is picked in the app)."""
    types = sorted({q.resource_type for q in st.queries})
    if ehr_launch:
        return " ".join(["launch", *(f"patient/{t}.rs" for t in types)])
    return " ".join(f"user/{t}.rs" for t in types)


def launch_url(settings: Settings) -> str | None:
    """The absolute URL the EHR launches for a card's ``smart`` link."""
    if settings.public_base_url:
        return settings.public_base_url.rstrip("/") + PREFIX + "/launch"
    if has_request_context():  # development: the URL the service was called at
        return request.host_url.rstrip("/") + PREFIX + "/launch"
    return None


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _ttl_s(settings: Settings) -> float:
    return settings.smart_session_minutes * 60.0


def _client(st: HooksState, iss: str, token: str | None) -> FhirClient:
    return FhirClient(
        base_url=iss,
        trusted_base_urls=st.settings.smart_servers(),
        allow_insecure_loopback=st.settings.dev,
        access_token=token,
        timeouts=Timeouts(connect=5, read=20),
    )


def _trusted_iss(st: HooksState, iss: str | None) -> str:
    if not iss:
        raise LaunchError("The launch names no FHIR server (iss).")
    try:
        wanted = normalise_base_url(iss)
    except UntrustedFhirServer as exc:
        raise LaunchError("The launch's FHIR server (iss) is not a FHIR base URL.") from exc
    for server in st.settings.smart_servers():
        if normalise_base_url(server) == wanted:
            return server
    # SMART App Launch 2.x: the app "MUST" check iss against the servers it trusts before
    # following any of its endpoints.
    raise LaunchError("This FHIR server is not one this service is configured to trust.")


def _smart_configuration(st: HooksState, iss: str) -> dict[str, Any] | None:
    """``{iss}/.well-known/smart-configuration`` (SMART App Launch 2.x discovery), None when the
    server has none. ``iss`` is a trusted server already; redirects are not followed."""
    url = iss.rstrip("/") + "/.well-known/smart-configuration"
    check_transport(url, allow_insecure_loopback=st.settings.dev)
    try:
        answer = requests.get(
            url,
            headers={"Accept": "application/json"},
            timeout=_HTTP_TIMEOUT,
            allow_redirects=False,
        )
    except requests.RequestException as exc:
        raise LaunchError("The FHIR server could not be reached.", status=502) from exc
    if answer.status_code in (404, 410):
        return None
    try:
        config = answer.json() if answer.status_code == 200 else None
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise LaunchError("The FHIR server's SMART configuration could not be read.", status=502)
    return config


# -- responses ---------------------------------------------------------------------------------


def _secure_headers(response: Response) -> Response:
    st = state()
    ancestors = " ".join(st.settings.smart_frame_ancestors) or "'self'"
    # Strict CSP: no script at all, styles from this service only; framing only by the EHR
    # origins of the configuration (frame-ancestors, CSP Level 2).
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self';"
        f" base-uri 'none'; frame-ancestors {ancestors}"
    )
    response.headers["X-Content-Type-Options"] = "nosniff"
    # The callback URL carries the authorization code: never send it on as a Referer.
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"
    return response


blueprint.after_request(_secure_headers)


def _with_cookie(response: BaseResponse, sid: str) -> BaseResponse:
    # Secure + HttpOnly; SameSite=None so the cookie also travels inside the EHR's iframe (a
    # cross-site frame), Partitioned (CHIPS) so browsers blocking third-party cookies keep it
    # per embedding site. CSRF on the launch is stopped by the OAuth state bound to the session.
    response.set_cookie(
        _COOKIE,
        sid,
        max_age=int(_ttl_s(state().settings)),
        path=PREFIX,
        secure=True,
        httponly=True,
        samesite="None",
        partitioned=True,
    )
    return response


def _error(message: str, status: int) -> Response:
    response = Response(render_template("smart/error.html", message=message), status=status)
    response.mimetype = "text/html"
    return response


@blueprint.errorhandler(LaunchError)
def _launch_error(exc: LaunchError) -> Response:
    return _error(str(exc), exc.status)


@blueprint.errorhandler(FhirError)
def _fhir_error(exc: FhirError) -> Response:
    log.warning("screening page: FHIR server error: %s", exc)
    return _error("The FHIR server could not be read. Launch the page again.", 502)


# -- the launch --------------------------------------------------------------------------------


@blueprint.get("/launch")
def launch() -> BaseResponse:
    st = state()
    iss = _trusted_iss(st, request.args.get("iss"))
    launch_token = request.args.get("launch") or None
    config = _smart_configuration(st, iss) or {}
    grants = config.get("grant_types_supported") or []
    store = _store(st)
    if not config.get("authorization_endpoint") or "authorization_code" not in grants:
        if not st.settings.dev:
            raise LaunchError("This FHIR server offers no SMART user launch.")
        # Development only: an open server (the local demo server) is read without OAuth.
        patient = request.args.get("patient")
        session = Session(iss=iss, created=time.time(), open_server=True, authorized=True)
        if patient:
            session.patient = _patient_id(patient)
        sid = store.new(session)
        return _with_cookie(redirect(f"{PREFIX}/page", code=303), sid)

    authorize = str(config["authorization_endpoint"])
    token_endpoint = str(config.get("token_endpoint") or "")
    for url in (authorize, token_endpoint):
        try:
            check_transport(url, allow_insecure_loopback=st.settings.dev)
        except FhirError as exc:
            raise LaunchError("The FHIR server's authorization endpoints are not secure.") from exc
    methods = config.get("code_challenge_methods_supported") or []
    if "S256" not in methods:
        # SMART 2.x: servers "SHALL" support S256; the app refuses a server that does not say so.
        raise LaunchError("The authorization server does not support PKCE (S256).")
    verifier = _b64url(secrets.token_bytes(48))
    session = Session(
        iss=iss,
        created=time.time(),
        state=secrets.token_urlsafe(32),
        verifier=verifier,
        token_endpoint=token_endpoint,
        launch=launch_token,
    )
    sid = store.new(session)
    params = {
        "response_type": "code",
        "client_id": st.settings.smart_client_id,
        "redirect_uri": _redirect_uri(st.settings),
        "scope": smart_scopes(st, ehr_launch=launch_token is not None),
        "state": session.state,
        "aud": iss,
        "code_challenge": _b64url(hashlib.sha256(verifier.encode("ascii")).digest()),
        "code_challenge_method": "S256",
    }
    if launch_token:
        params["launch"] = launch_token
    sep = "&" if "?" in authorize else "?"
    return _with_cookie(redirect(f"{authorize}{sep}{urlencode(params)}", code=303), sid)


def _patient_id(text: str) -> str:
    try:
        return check_patient_id(text)
    except InputError as exc:
        raise LaunchError("That is not a patient id.") from exc


def _redirect_uri(settings: Settings) -> str:
    base = settings.public_base_url.rstrip("/") if settings.public_base_url else None
    return f"{base or request.host_url.rstrip('/')}{PREFIX}/callback"


@blueprint.get("/callback")
def callback() -> BaseResponse:
    st = state()
    store = _store(st)
    sid = request.cookies.get(_COOKIE)
    session = store.get(sid, _ttl_s(st.settings))
    if session is None or session.state is None or session.verifier is None:
        raise LaunchError("This sign-in is not one this page started. Launch the page again.")
    returned = request.args.get("state") or ""
    if not secrets.compare_digest(returned, session.state):
        store.drop(sid)
        raise LaunchError("The sign-in answer does not match this launch. Launch the page again.")
    if time.time() - session.created > _PENDING_TTL_S:
        store.drop(sid)
        raise LaunchError("The sign-in took too long. Launch the page again.")
    if request.args.get("error"):
        store.drop(sid)
        raise LaunchError("Access was not granted.", status=403)
    code = request.args.get("code")
    if not code or not session.token_endpoint:
        raise LaunchError("The sign-in answer carries no authorization code.")
    try:
        answer = requests.post(
            session.token_endpoint,
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": _redirect_uri(st.settings),
                "client_id": st.settings.smart_client_id,
                "code_verifier": session.verifier,
            },
            headers={"Accept": "application/json"},
            timeout=_HTTP_TIMEOUT,
            allow_redirects=False,
        )
        token = answer.json() if answer.status_code == 200 else None
    except (requests.RequestException, ValueError):
        token = None
    if not isinstance(token, dict) or not isinstance(token.get("access_token"), str):
        store.drop(sid)
        raise LaunchError("The authorization server did not issue a token.", status=502)
    store.drop(sid)  # a fresh session id after sign-in (no session fixation)
    expires_in = token.get("expires_in")
    fresh = Session(
        iss=session.iss,
        created=time.time(),
        access_token=token["access_token"],
        expires_at=time.time() + float(expires_in) if isinstance(expires_in, int) else None,
        scope=str(token.get("scope") or ""),
        authorized=True,
    )
    patient = token.get("patient")
    if isinstance(patient, str):
        fresh.patient = _patient_id(patient)
    new_sid = store.new(fresh)
    log.info("screening page: signed in to %s (scope %s)", fresh.iss, fresh.scope)
    return _with_cookie(redirect(f"{PREFIX}/page", code=303), new_sid)


# -- the page ----------------------------------------------------------------------------------


def _session() -> Session:
    st = state()
    session = _store(st).get(request.cookies.get(_COOKIE), _ttl_s(st.settings))
    if session is None or not session.authorized:
        raise LaunchError("No screening session: launch the page from the EHR.", status=401)
    if session.expires_at is not None and time.time() > session.expires_at:
        raise LaunchError("The EHR session has expired: launch the page again.", status=401)
    return session


@dataclass(frozen=True)
class CriterionView:
    label: str
    sentence: str
    protocol: str
    kind: str
    evidence: tuple[EvidenceItem, ...]


@dataclass(frozen=True)
class TrialView:
    id: str
    title: str
    status: str
    registry_status: str
    enrolling: bool
    version: str
    registry_url: str
    settle: tuple[str, ...]
    open: tuple[CriterionView, ...]
    exclusions_found: tuple[CriterionView, ...]
    met: tuple[CriterionView, ...]
    manual: tuple[CriterionView, ...]


_STATUS_TEXT = {
    "candidate": "Possible candidate",
    "needs-review": "Needs review",
    "excluded": "Not eligible on record",
}


#: rule types that read the Patient's own elements (birth date, sex): only their evidence shows
#: the Patient; elsewhere it is cited as the record that was searched and would be noise
_PATIENT_RULES = frozenset({"age", "creatinine_clearance", "pregnancy"})


def _view(
    c: CriterionResult,
    resources: Mapping[str, Mapping[str, Any]],
    info: TrialInfo,
    *,
    protocol: bool = False,
) -> CriterionView:
    shows_patient = info.rules.get(c.id, ("", None))[0] in _PATIENT_RULES
    cited = [r for r in c.evidence if shows_patient or not r.startswith("Patient/")]
    return CriterionView(
        # An exclusion checked and not found is said as a fact about the patient; its name
        # ("Cirrhosis") stays beside the protocol text, not as a heading.
        label=c.label,
        sentence=without_ids(c.explanation or c.text),
        protocol=c.text if protocol else "",
        kind=c.kind,
        evidence=tuple(describe(ref, resources.get(ref)) for ref in cited),
    )


def _settle_lines(
    evaluation: TrialEvaluation, info: TrialInfo, as_of: date, resources: Any
) -> tuple[str, ...]:
    items = open_items(evaluation, info, as_of, resources)
    since = items.labs_from.isoformat()
    lines = []
    if items.labs_to_repeat:
        last = ", ".join(d.isoformat() for d in items.last_drawn)
        lines.append(
            f"Repeat labs (results dated {since} or later; last drawn {last}): "
            + ", ".join(items.labs_to_repeat)
        )
    return tuple(lines)


def _trial_view(
    evaluation: TrialEvaluation, info: TrialInfo, as_of: date, resources: Mapping[str, Any]
) -> TrialView:
    unknown = evaluation.with_result(Result.UNKNOWN)
    return TrialView(
        id=evaluation.trial,
        title=evaluation.title or info.title,
        status=_STATUS_TEXT.get(evaluation.status.value, evaluation.status.value),
        registry_status=info.registry_status.upper().replace("_", " "),
        enrolling=info.enrolling,
        version=evaluation.version,
        registry_url=info.registry_url,
        settle=_settle_lines(evaluation, info, as_of, resources),
        open=tuple(_view(c, resources, info) for c in unknown),
        exclusions_found=tuple(
            _view(c, resources, info) for c in evaluation.with_result(Result.FAIL)
        ),
        met=tuple(_view(c, resources, info) for c in evaluation.with_result(Result.PASS)),
        manual=tuple(
            _view(c, resources, info, protocol=True) for c in evaluation.with_result(Result.MANUAL)
        ),
    )


def _patient_name(patient: Mapping[str, Any]) -> str:
    for name in patient.get("name") or []:
        if isinstance(name, Mapping):
            if isinstance(name.get("text"), str):
                return str(name["text"])
            given = " ".join(str(g) for g in name.get("given") or [])
            return f"{given} {name.get('family') or ''}".strip() or "Unnamed patient"
    return "Unnamed patient"


def _evaluate(
    st: HooksState, client: FhirClient, patient_id: str
) -> tuple[PatientEvaluation, dict[str, Any], dict[str, Any]]:
    fetched = fetch_patient_resources(
        client,
        patient_id,
        st.trials,
        queries=st.queries,
        concurrency=st.settings.fhir_concurrency,
        incomplete_on_refusal=True,
    )
    patient = (
        fetched.resources[0] if fetched.resources else {"resourceType": "Patient", "id": patient_id}
    )
    as_of = st.settings.as_of or date.today()
    # Exactly as the REST sweep evaluates a fetched patient (cds.sweep.remote).
    evaluation = evaluate_resources(
        fetched.resources,
        st.trials,
        as_of,
        warnings=list(fetched.warnings),
        incomplete=fetched.incomplete,
    )
    return evaluation, patient, index_resources(fetched.resources)


@blueprint.get("/page")
def page() -> Response:
    st = state()
    session = _session()
    patient_id = session.patient
    if patient_id is None:
        chosen = request.args.get("patient")
        if not chosen:
            return _picker(st, session)
        patient_id = _patient_id(chosen)
    with _client(st, session.iss, session.access_token) as client:
        evaluation, patient, resources = _evaluate(st, client, patient_id)
    trials = [
        _trial_view(t, st.infos[t.trial], evaluation.as_of, resources) for t in evaluation.trials
    ]
    html = render_template(
        "smart/page.html",
        patient_name=_patient_name(patient),
        patient_birth=patient.get("birthDate"),
        patient_ref=f"Patient/{patient_id}",
        as_of=evaluation.as_of.isoformat(),
        trials=trials,
        warnings=[without_ids(w) for w in evaluation.warnings],
        can_pick=session.patient is None,
    )
    return Response(html, mimetype="text/html")


def _picker(st: HooksState, session: Session) -> Response:
    """Standalone launch: the coordinator picks the patient (by name, or the first page)."""
    query = (request.args.get("name") or "").strip()[:100]
    params = [("_count", "50")] + ([("name", query)] if query else [])
    with _client(st, session.iss, session.access_token) as client:
        bundle = client.get("Patient?" + urlencode(params))
    patients = [
        {
            "id": r.get("id"),
            "name": _patient_name(r),
            "birth": r.get("birthDate") or "",
            "gender": r.get("gender") or "",
        }
        for e in bundle.get("entry") or []
        if isinstance(r := e.get("resource"), dict) and r.get("resourceType") == "Patient"
    ]
    html = render_template("smart/picker.html", patients=patients, query=query)
    return Response(html, mimetype="text/html")


@blueprint.get("/source/<resource_type>/<resource_id>")
def source(resource_type: str, resource_id: str) -> Response:
    """The cited resource itself, one click from its evidence line (read with the session's
    token, so the EHR's own access rules apply)."""
    st = state()
    session = _session()
    readable = {q.resource_type for q in st.queries}
    if resource_type not in readable:
        abort(404)
    try:
        check_patient_id(resource_id)
    except InputError:
        abort(404)
    with _client(st, session.iss, session.access_token) as client:
        resource = client.read(resource_type, resource_id)
    if session.patient is not None and not _belongs_to(resource, session.patient):
        abort(404)
    html = render_template(
        "smart/source.html",
        reference=f"{resource_type}/{resource_id}",
        item=describe(f"{resource_type}/{resource_id}", resource),
        text=json.dumps(resource, indent=2, ensure_ascii=False),
    )
    return Response(html, mimetype="text/html")


def _belongs_to(resource: Mapping[str, Any], patient_id: str) -> bool:
    if resource.get("resourceType") == "Patient":
        return resource.get("id") == patient_id
    for key in ("subject", "patient"):
        ref = resource.get(key)
        if isinstance(ref, Mapping) and ref.get("reference") == f"Patient/{patient_id}":
            return True
    return False
