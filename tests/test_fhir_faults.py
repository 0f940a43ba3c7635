"""Faults a real FHIR server cannot be made to produce, served by a fault-injecting HTTP server."""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from cds.criteria.reads import CLINICAL_TYPES
from cds.errors import (
    FhirAuthError,
    FhirBadResponse,
    FhirError,
    FhirFatalError,
    FhirNotFound,
    FhirRejected,
    FhirTemporaryError,
    InputError,
    UntrustedFhirServer,
)
from cds.fhir.auth import JWT_BEARER_ASSERTION, SmartBackendAuth
from cds.fhir.bulk import BulkExporter
from cds.fhir.client import FhirClient, RetryPolicy, Timeouts, parse_retry_after
from cds.fhir.queries import build_patient_queries, fetch_patient_resources

SECRET = "s3cr3t-access-token-DO-NOT-LEAK"


# -- the fault injector ----------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """One scripted answer: a status and body, or a failure of the connection itself."""

    status: int = 200
    body: bytes | dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    #: seconds to wait before answering (longer than the client's read timeout = a timeout)
    delay: float = 0.0
    #: "reset": close the socket without answering; "truncate": announce more than is sent;
    #: "trickle": a 200 whose body comes a byte every 50 ms (for a minute); "trickle-headers":
    #: the same with the header lines
    breakage: str | None = None


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class FaultInjector:
    """A real HTTP server on 127.0.0.1 that plays scripted faults, standing in for a FHIR server.

    Answers come from ``script`` (in order, one per request), then from ``route`` (a function of
    the request) or a 200 empty searchset Bundle. Every request is recorded in ``seen``.
    """

    def __init__(self) -> None:
        self.script: list[Fault] = []
        self.route: Callable[[Seen], Fault] | None = None
        self.seen: list[Seen] = []
        #: exceptions raised while answering (a broken script): reported by the fixture
        self.errors: list[BaseException] = []
        #: answers being trickled right now (each ends when its client hangs up)
        self.trickling = 0
        self._lock = threading.Lock()
        injector = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                seen = Seen(self.command, self.path, dict(self.headers), self.rfile.read(length))
                with injector._lock:
                    injector.seen.append(seen)
                    fault = injector.script.pop(0) if injector.script else None
                if fault is None:
                    fault = injector.route(seen) if injector.route else Fault(body=searchset([]))
                if fault.delay:
                    time.sleep(fault.delay)
                if fault.breakage == "reset":
                    # SO_LINGER 0: the close sends a TCP RST, as a crashed proxy would.
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    )
                    self.close_connection = True
                    return
                body = fault.body
                if isinstance(body, dict):
                    body = json.dumps(body).encode()
                body = body or b""
                if fault.breakage in ("trickle", "trickle-headers"):
                    injector.trickle(self.wfile, headers=fault.breakage == "trickle-headers")
                    self.close_connection = True
                    return
                self.send_response(fault.status)
                headers = {"Content-Type": "application/fhir+json", **fault.headers}
                for name, value in headers.items():
                    self.send_header(name, value)
                if fault.breakage == "truncate":
                    self.send_header("Content-Length", str(len(body) + 500))
                    self.end_headers()
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = _handle  # noqa: N815

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                error = sys.exc_info()[1]
                # The client giving up (a timeout test) breaks the pipe: expected, not a failure.
                if not isinstance(error, ConnectionError) and error is not None:
                    injector.errors.append(error)

        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/fhir"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()

    def trickle(self, out: Any, *, headers: bool) -> None:
        """Answer so slowly that no read ever times out (a byte every 50 ms)."""
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\n"
        data = (
            head + b"X-Slow: " + b"s" * 2000
            if headers
            else head + b"Content-Length: 100000\r\n\r\n"
        )
        if not headers:
            out.write(data)
            out.flush()
            data = b" " * 2000
        with self._lock:
            self.trickling += 1
        try:
            for byte in data:
                out.write(bytes([byte]))
                out.flush()
                time.sleep(0.05)
        except OSError:
            pass  # the client gave up: what a deadline should make it do
        finally:
            with self._lock:
                self.trickling -= 1

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def searchset(
    resources: list[dict[str, Any]],
    next_url: str | None = None,
    outcome_entries: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources],
        "link": [{"relation": "self", "url": "ignored"}],
    }
    for entry in outcome_entries or []:
        bundle["entry"].append({"resource": entry, "search": {"mode": "outcome"}})
    if next_url:
        bundle["link"].append({"relation": "next", "url": next_url})
    return bundle


def outcome(text: str, *, details: bool = True, severity: str = "error") -> dict[str, Any]:
    issue: dict[str, Any] = {"severity": severity, "code": "processing"}
    if details:
        issue["details"] = {"text": text}
    else:
        issue["diagnostics"] = text
    return {"resourceType": "OperationOutcome", "issue": [issue]}


HTML = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"


@pytest.fixture
def injector() -> Iterator[FaultInjector]:
    server = FaultInjector()
    yield server
    server.close()
    assert not server.errors, f"the fault injector itself failed: {server.errors!r}"


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def make_client(
    injector: FaultInjector, sleeps: list[float]
) -> Iterator[Callable[..., FhirClient]]:
    clients: list[FhirClient] = []

    def make(**kwargs: Any) -> FhirClient:
        options: dict[str, Any] = {
            "base_url": injector.base_url,
            "trusted_base_urls": [injector.base_url],
            "allow_insecure_loopback": True,
            "timeouts": Timeouts(connect=1, read=0.5),
            "retry": RetryPolicy(
                attempts=3, backoff_base=0.01, backoff_cap=0.05, retry_after_cap=5
            ),
            "sleep": sleeps.append,  # recorded, not slept: the tests stay fast
        }
        options.update(kwargs)
        client = FhirClient(**options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


PATIENT = {"resourceType": "Patient", "id": "p1"}


# -- retries ---------------------------------------------------------------------------------


def test_503_with_retry_after_seconds_is_waited_for_then_succeeds(injector, make_client, sleeps):
    injector.script = [Fault(503, outcome("down for maintenance"), {"Retry-After": "2"})]
    injector.route = lambda seen: Fault(body=PATIENT)
    assert make_client().read("Patient", "p1") == PATIENT
    assert sleeps == [2.0]
    assert len(injector.seen) == 2


def test_retry_after_as_http_date_and_its_cap(injector, make_client, sleeps):
    soon = format_datetime(datetime.now(UTC) + timedelta(seconds=3), usegmt=True)
    injector.script = [
        Fault(503, headers={"Retry-After": soon}),
        Fault(429, headers={"Retry-After": "3600"}),  # an hour: capped at retry_after_cap
    ]
    injector.route = lambda seen: Fault(body=PATIENT)
    make_client().read("Patient", "p1")
    assert 1.0 < sleeps[0] <= 3.0
    assert sleeps[1] == 5.0


def test_parse_retry_after() -> None:
    now = datetime(2026, 11, 1, 12, 0, tzinfo=UTC).timestamp()
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("Sun, 01 Nov 2026 12:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Sun, 01 Nov 2026 11:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_429_then_success_uses_jittered_backoff(injector, make_client, sleeps):
    injector.script = [Fault(429), Fault(429)]
    injector.route = lambda seen: Fault(body=PATIENT)
    make_client().read("Patient", "p1")
    assert len(sleeps) == 2
    assert 0.005 <= sleeps[0] <= 0.01 and 0.01 <= sleeps[1] <= 0.02  # equal jitter, doubling


def test_503_until_attempts_run_out_is_a_temporary_error_with_the_outcome_text(
    injector, make_client, sleeps
):
    injector.route = lambda seen: Fault(503, outcome("database is restarting"))
    with pytest.raises(FhirTemporaryError) as caught:
        make_client().read("Patient", "p1")
    assert len(injector.seen) == 3 and len(sleeps) == 2
    error = caught.value
    assert error.status == 503
    assert "database is restarting" in str(error)
    assert "after 3 attempt(s)" in str(error)
    assert error.outcome is not None


def test_timeout_ends_in_a_temporary_error_not_a_hang(injector, make_client):
    injector.route = lambda seen: Fault(body=PATIENT, delay=1.0)
    started = time.monotonic()
    with pytest.raises(FhirTemporaryError) as caught:
        make_client(timeouts=Timeouts(connect=1, read=0.2)).read("Patient", "p1")
    assert time.monotonic() - started < 3
    assert isinstance(caught.value.__cause__, requests.Timeout)
    assert "ReadTimeout" in str(caught.value)


def test_connection_reset_is_retried(injector, make_client, sleeps):
    injector.script = [Fault(breakage="reset")]
    injector.route = lambda seen: Fault(body=PATIENT)
    assert make_client().read("Patient", "p1") == PATIENT
    assert len(sleeps) == 1


def test_connection_reset_every_time_is_a_temporary_error(injector, make_client):
    injector.route = lambda seen: Fault(breakage="reset")
    with pytest.raises(FhirTemporaryError) as caught:
        make_client().read("Patient", "p1")
    assert isinstance(caught.value.__cause__, requests.ConnectionError)


def test_nothing_listening_is_a_temporary_error(make_client):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    base = f"http://127.0.0.1:{port}/fhir"
    with pytest.raises(FhirTemporaryError) as caught:
        make_client(base_url=base, trusted_base_urls=[base]).read("Patient", "p1")
    assert isinstance(caught.value.__cause__, requests.ConnectionError)


def test_truncated_body_is_retried_then_reported(injector, make_client, sleeps):
    injector.route = lambda seen: Fault(body=PATIENT, breakage="truncate")
    with pytest.raises(FhirTemporaryError) as caught:
        make_client().read("Patient", "p1")
    assert len(injector.seen) == 3
    assert isinstance(caught.value.__cause__, requests.RequestException)
    injector.route = None
    injector.script = [Fault(body=PATIENT, breakage="truncate"), Fault(body=PATIENT)]
    assert make_client().read("Patient", "p1") == PATIENT


def test_html_error_page_with_200_is_a_bad_response_and_not_retried(injector, make_client):
    injector.route = lambda seen: Fault(200, HTML, {"Content-Type": "text/html"})
    with pytest.raises(FhirBadResponse) as caught:
        make_client().read("Patient", "p1")
    assert len(injector.seen) == 1
    assert "not JSON" in str(caught.value) and "text/html" in str(caught.value)
    assert isinstance(caught.value.__cause__, ValueError)


def test_html_502_from_a_proxy_is_retried_then_temporary(injector, make_client):
    injector.route = lambda seen: Fault(502, HTML, {"Content-Type": "text/html"})
    with pytest.raises(FhirTemporaryError) as caught:
        make_client().read("Patient", "p1")
    assert len(injector.seen) == 3
    assert "HTTP 502" in str(caught.value) and "text/html" in str(caught.value)


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, FhirRejected),
        (401, FhirAuthError),
        (403, FhirAuthError),
        (404, FhirNotFound),
        (410, FhirNotFound),
        (409, FhirRejected),
        (422, FhirRejected),
        (500, FhirFatalError),
    ],
)
def test_4xx_other_than_429_and_500_are_not_retried(injector, make_client, sleeps, status, error):
    injector.route = lambda seen: Fault(status, outcome("the server's own words", details=False))
    with pytest.raises(error) as caught:
        make_client().read("Patient", "p1")
    assert len(injector.seen) == 1 and sleeps == []
    assert caught.value.status == status
    assert str(caught.value).endswith(": the server's own words")
    assert caught.value.url == f"{injector.base_url}/Patient/p1"


def test_outcome_details_text_wins_over_diagnostics(injector, make_client):
    body = outcome("Unknown search parameter 'foo'")
    body["issue"][0]["diagnostics"] = "java.lang.IllegalArgumentException at line 42"
    injector.route = lambda seen: Fault(400, body)
    with pytest.raises(FhirRejected, match="Unknown search parameter 'foo'$"):
        make_client().search("Observation", "foo=1")


def test_500_html_is_a_bad_response(injector, make_client):
    injector.route = lambda seen: Fault(500, b"<h1>oops</h1>", {"Content-Type": "text/html"})
    with pytest.raises(FhirBadResponse):
        make_client().read("Patient", "p1")


def test_json_that_is_not_a_resource_is_a_bad_response(injector, make_client):
    injector.route = lambda seen: Fault(200, b'["not", "a", "resource"]')
    with pytest.raises(FhirBadResponse, match="not a FHIR resource"):
        make_client().read("Patient", "p1")


def test_a_non_idempotent_transaction_is_retried_only_on_429(injector, make_client):
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": PATIENT, "request": {"method": "POST", "url": "Patient"}}],
    }
    response = {"resourceType": "Bundle", "type": "transaction-response", "entry": []}
    injector.script = [Fault(503)]
    with pytest.raises(FhirTemporaryError):
        make_client().transaction(bundle)
    assert len(injector.seen) == 1
    injector.script = [Fault(429)]
    injector.route = lambda seen: Fault(body=response)
    assert make_client().transaction(bundle) == response


# -- paging ----------------------------------------------------------------------------------


def test_next_links_are_followed_as_given_including_hapi_getpages(injector, make_client):
    base = injector.base_url
    pages = {
        "/fhir/Observation?patient=p1": searchset(
            [{"resourceType": "Observation", "id": "o1"}], f"{base}?_getpages=abc&_getpagesoffset=1"
        ),
        "/fhir?_getpages=abc&_getpagesoffset=1": searchset(
            [{"resourceType": "Observation", "id": "o2"}], "Observation?page=3-relative"
        ),
        "/fhir/Observation?page=3-relative": searchset(
            [{"resourceType": "Observation", "id": "o3"}]
        ),
    }
    injector.route = lambda seen: Fault(body=pages[seen.path])
    result = make_client().search("Observation", [("patient", "p1")])
    assert [r["id"] for r in result.resources] == ["o1", "o2", "o3"]
    assert result.pages == 3
    assert [s.path for s in injector.seen] == list(pages)


def test_bundle_total_is_never_trusted(injector, make_client):
    page = searchset([{"resourceType": "Condition", "id": "c1"}])
    page["total"] = 0  # wrong, as servers may be (HAPI omits it unless _total=accurate)
    injector.route = lambda seen: Fault(body=page)
    assert len(make_client().search("Condition", "patient=p1").resources) == 1


def test_a_next_link_to_another_host_is_refused_before_it_is_requested(injector, make_client):
    injector.route = lambda seen: Fault(
        body=searchset([], "http://127.0.0.2:9/fhir/Observation?page=2")
    )
    with pytest.raises(UntrustedFhirServer, match="outside the trusted FHIR base"):
        make_client().search("Observation", "patient=p1")
    assert len(injector.seen) == 1


def test_a_next_link_to_another_path_on_the_same_host_is_refused(injector, make_client):
    injector.route = lambda seen: Fault(
        body=searchset([], f"http://127.0.0.1:{injector.port}/other-fhir/Observation?page=2")
    )
    with pytest.raises(UntrustedFhirServer):
        make_client().search("Observation", "patient=p1")


def test_a_redirect_out_of_the_base_is_refused(injector, make_client):
    injector.route = lambda seen: Fault(302, headers={"Location": "http://example.org/fhir/x"})
    with pytest.raises(UntrustedFhirServer):
        make_client().read("Patient", "p1")
    assert len(injector.seen) == 1


def test_outcome_entries_are_warnings_not_data(injector, make_client, caplog):
    page = searchset(
        [{"resourceType": "Observation", "id": "o1"}],
        outcome_entries=[outcome("Some codes were not recognised", severity="warning")],
    )
    page["entry"].append(
        {"resource": outcome("mode-less outcome", details=False, severity="information")}
    )
    injector.route = lambda seen: Fault(body=page)
    with caplog.at_level(logging.WARNING, logger="cds.fhir.client"):
        result = make_client().search("Observation", "patient=p1")
    assert [r["id"] for r in result.resources] == ["o1"]
    assert len(result.outcomes) == 2
    assert "Some codes were not recognised" in result.warnings[0]
    assert "mode-less outcome" in caplog.text


def test_page_cap_and_link_loops_end_in_a_clear_error(injector, make_client):
    counter = iter(range(1000))
    injector.route = lambda seen: Fault(
        body=searchset([], f"{injector.base_url}/Observation?page={next(counter)}")
    )
    with pytest.raises(FhirBadResponse, match="more than 4 pages"):
        make_client(max_pages=4).search("Observation", "patient=p1")
    injector.route = lambda seen: Fault(body=searchset([], f"{injector.base_url}/Observation?x=1"))
    with pytest.raises(FhirBadResponse, match="repeats a page"):
        make_client().search("Observation", "x=1")


def test_a_search_answered_with_something_else_than_a_bundle(injector, make_client):
    injector.route = lambda seen: Fault(body=outcome("no"))
    with pytest.raises(FhirBadResponse, match="expected a Bundle"):
        make_client().search("Observation", "patient=p1")


# -- trust -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "trusted", "loopback_ok"),
    [
        ("https://ehr.example.org/fhir", ["https://other.example.org/fhir"], False),
        ("https://ehr.example.org/fhir", ["https://ehr.example.org/fhir/R4"], False),
        ("https://ehr.example.org/fhir-evil", ["https://ehr.example.org/fhir"], False),
        ("http://ehr.example.org/fhir", ["http://ehr.example.org/fhir"], True),
        ("http://127.0.0.1:8080/fhir", ["http://127.0.0.1:8080/fhir"], False),
        ("ftp://127.0.0.1/fhir", ["ftp://127.0.0.1/fhir"], True),
        ("https://user:pw@ehr.example.org/fhir", ["https://user:pw@ehr.example.org/fhir"], False),
    ],
)
def test_untrusted_servers_are_refused_before_any_io(base, trusted, loopback_ok):
    with pytest.raises(UntrustedFhirServer) as caught:
        FhirClient(
            base_url=base,
            trusted_base_urls=trusted,
            allow_insecure_loopback=loopback_ok,
            session_factory=_no_session,
        )
    assert "pw" not in str(caught.value)


def _no_session() -> requests.Session:
    raise AssertionError("no session may be created for an untrusted server")


@pytest.mark.parametrize(
    ("base", "trusted"),
    [
        ("https://ehr.example.org/fhir/", ["https://ehr.example.org/fhir"]),
        ("https://EHR.example.org/fhir", ["https://ehr.example.org/fhir/"]),
        ("http://localhost:8080/fhir", ["http://localhost:8080/fhir"]),
        ("http://[::1]:8080/fhir", ["http://[::1]:8080/fhir"]),
        ("http://127.8.9.10/fhir", ["http://127.8.9.10/fhir"]),
    ],
)
def test_trusted_servers_are_accepted(base, trusted):
    with FhirClient(base_url=base, trusted_base_urls=trusted, allow_insecure_loopback=True) as c:
        assert not c.base_url.endswith("/")


def test_closed_client_refuses_work(make_client):
    client = make_client()
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        client.read("Patient", "p1")


# -- tokens never leak -----------------------------------------------------------------------


def _all_text(error: BaseException) -> str:
    """Everything an exception chain can show: str and repr of each link and its args."""
    parts: list[str] = []
    current: BaseException | None = error
    while current is not None:
        parts += [str(current), repr(current), repr(current.args)]
        current = current.__cause__ or current.__context__
    return "\n".join(parts)


@pytest.mark.parametrize(
    "fault",
    [
        Fault(401, outcome("token expired")),
        Fault(503),
        Fault(breakage="reset"),
        Fault(body=PATIENT, delay=1.0),
        Fault(200, HTML),
    ],
)
def test_the_access_token_never_appears_in_errors_logs_or_reprs(
    injector, make_client, caplog, fault
):
    injector.route = lambda seen: fault
    client = make_client(access_token=SECRET, timeouts=Timeouts(connect=1, read=0.2))
    with caplog.at_level(logging.DEBUG), pytest.raises(FhirError) as caught:
        client.read("Patient", "p1")
    logging.getLogger("cds").exception("logged with its traceback", exc_info=caught.value)
    formatted = "\n".join(logging.Formatter().format(r) for r in caplog.records)
    assert injector.seen[0].headers["Authorization"] == f"Bearer {SECRET}"  # it was sent
    for text in (_all_text(caught.value), formatted, repr(client)):
        assert SECRET not in text


def test_token_and_access_token_together_are_refused():
    with pytest.raises(ValueError, match="not both"):
        FhirClient(
            base_url="https://x.example/fhir",
            trusted_base_urls=["https://x.example/fhir"],
            access_token=SECRET,
            auth=object(),
        )  # type: ignore[arg-type]


# -- SMART Backend Services ------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class TokenEndpoint:
    """The token endpoint on the fault injector: checks the assertion, hands out tokens."""

    def __init__(self, injector: FaultInjector, public_key: Any, algorithm: str) -> None:
        self.issued: list[str] = []
        self.assertions: list[dict[str, Any]] = []
        self.token_url = f"http://127.0.0.1:{injector.port}/auth/token"
        self.public_key = public_key
        self.algorithm = algorithm
        self.expires_in = 300

    def __call__(self, seen: Seen) -> Fault:
        if seen.path == "/auth/token":
            from urllib.parse import parse_qs

            form = {k: v[0] for k, v in parse_qs(seen.body.decode()).items()}
            assert form["grant_type"] == "client_credentials"
            assert form["client_assertion_type"] == JWT_BEARER_ASSERTION
            header = jwt.get_unverified_header(form["client_assertion"])
            # exp is checked by the test against its frozen clock, not against real time here.
            claims = jwt.decode(
                form["client_assertion"],
                self.public_key,
                algorithms=[self.algorithm],
                audience=self.token_url,
                options={"verify_exp": False},
            )
            self.assertions.append({"header": header, "claims": claims, "scope": form["scope"]})
            token = f"{SECRET}-{len(self.issued)}"
            self.issued.append(token)
            return Fault(
                body={
                    "access_token": token,
                    "token_type": "bearer",
                    "expires_in": self.expires_in,
                    "scope": form["scope"],
                },
                headers={"Content-Type": "application/json"},
            )
        auth = seen.headers.get("Authorization")
        if auth != f"Bearer {self.issued[-1]}":
            return Fault(401, outcome("invalid token"))
        return Fault(body=PATIENT)


@pytest.mark.parametrize("algorithm", ["RS384", "ES384"])
def test_smart_backend_services_token_is_obtained_cached_and_renewed(
    injector, make_client, rsa_key, algorithm, caplog
):
    key: Any = rsa_key if algorithm == "RS384" else ec.generate_private_key(ec.SECP384R1())
    endpoint = TokenEndpoint(injector, key.public_key(), algorithm)
    injector.route = endpoint
    now = [1_000_000.0]
    auth = SmartBackendAuth(
        token_url=endpoint.token_url,
        client_id="cds-sweep",
        private_key=_pem(key),
        key_id="k1",
        algorithm=algorithm,
        allow_insecure_loopback=True,
        clock=lambda: now[0],
    )
    client = make_client(auth=auth)
    with caplog.at_level(logging.DEBUG):
        client.read("Patient", "p1")
        client.read("Patient", "p1")
        assert len(endpoint.issued) == 1  # cached
        now[0] += 300 - 59  # within the 60 s refresh margin: renewed before it expires
        client.read("Patient", "p1")
        assert len(endpoint.issued) == 2
    first = endpoint.assertions[0]
    assert first["header"]["alg"] == algorithm and first["header"]["kid"] == "k1"
    assert first["claims"]["iss"] == first["claims"]["sub"] == "cds-sweep"
    assert first["claims"]["exp"] - 1_000_000 <= 300
    assert first["claims"]["jti"] != endpoint.assertions[1]["claims"]["jti"]
    assert SECRET not in caplog.text and SECRET not in repr(auth) + repr(client)


def test_smart_token_rejected_by_the_fhir_server_is_renewed_once(injector, make_client, rsa_key):
    endpoint = TokenEndpoint(injector, rsa_key.public_key(), "RS384")
    injector.route = endpoint
    auth = SmartBackendAuth(
        token_url=endpoint.token_url,
        client_id="c",
        private_key=_pem(rsa_key),
        key_id="k1",
        allow_insecure_loopback=True,
    )
    client = make_client(auth=auth)
    client.read("Patient", "p1")
    endpoint.issued.append("revoked-on-the-server-side")  # the FHIR server now wants another
    injector.script = [Fault(401, outcome("token revoked"))]
    assert client.read("Patient", "p1") == PATIENT
    injector.route = lambda seen: (
        endpoint(seen) if seen.path == "/auth/token" else Fault(401, outcome("no"))
    )
    with pytest.raises(FhirAuthError, match="HTTP 401"):
        client.read("Patient", "p1")


def test_smart_token_endpoint_refusal_is_an_auth_error_without_secrets(
    injector, make_client, rsa_key
):
    injector.route = lambda seen: Fault(
        400,
        {"error": "invalid_client", "error_description": "unknown kid"},
        {"Content-Type": "application/json"},
    )
    auth = SmartBackendAuth(
        token_url=f"http://127.0.0.1:{injector.port}/auth/token",
        client_id="c",
        private_key=_pem(rsa_key),
        key_id="k1",
        allow_insecure_loopback=True,
    )
    with pytest.raises(FhirAuthError, match="unknown kid") as caught:
        make_client(auth=auth).read("Patient", "p1")
    assertion = json.dumps(injector.seen[0].body.decode())
    assert "client_assertion=" in assertion
    assert "eyJ" not in _all_text(caught.value)  # no JWT in the error


def test_smart_token_endpoint_outage_is_retried(injector, make_client, rsa_key, sleeps):
    endpoint = TokenEndpoint(injector, rsa_key.public_key(), "RS384")
    injector.script = [Fault(503)]
    injector.route = endpoint
    auth = SmartBackendAuth(
        token_url=endpoint.token_url,
        client_id="c",
        private_key=_pem(rsa_key),
        key_id="k1",
        allow_insecure_loopback=True,
    )
    assert make_client(auth=auth).read("Patient", "p1") == PATIENT
    assert len(sleeps) == 1


def test_smart_auth_validates_its_arguments_before_io(rsa_key):
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    common = {"client_id": "c", "key_id": "k"}
    with pytest.raises(InputError, match="2048"):
        SmartBackendAuth(token_url="https://a.example/token", private_key=_pem(small), **common)
    with pytest.raises(InputError, match="P-384"):
        SmartBackendAuth(
            token_url="https://a.example/token",
            private_key=_pem(rsa_key),
            algorithm="ES384",
            **common,
        )
    with pytest.raises(InputError, match="PEM"):
        SmartBackendAuth(token_url="https://a.example/token", private_key="nope", **common)
    with pytest.raises(UntrustedFhirServer):
        SmartBackendAuth(token_url="http://a.example/token", private_key=_pem(rsa_key), **common)
    with pytest.raises(ValueError, match="RS384 or ES384"):
        SmartBackendAuth(
            token_url="https://a.example/token",
            private_key=_pem(rsa_key),
            algorithm="HS256",
            **common,
        )  # type: ignore[arg-type]


# -- concurrent fetch ------------------------------------------------------------------------


class Trials:
    def types_read(self) -> tuple[str, ...]:
        return CLINICAL_TYPES

    def codes_for(self, resource_type: str) -> frozenset[tuple[str, str]]:
        if resource_type == "Observation":
            return frozenset({("http://loinc.org", "9811-1")})
        return frozenset()


def test_concurrent_fetch_overlaps_slow_queries_and_uses_one_session_per_thread(
    injector, make_client
):
    sessions: list[requests.Session] = []

    def factory() -> requests.Session:
        sessions.append(requests.Session())
        return sessions[-1]

    def route(seen: Seen) -> Fault:
        if seen.path.startswith("/fhir/Patient/"):
            return Fault(body=PATIENT, delay=0.2)
        rtype = seen.path.split("?")[0].rsplit("/", 1)[1]
        return Fault(body=searchset([{"resourceType": rtype, "id": "x1"}]), delay=0.2)

    injector.route = route
    client = make_client(session_factory=factory, timeouts=Timeouts(connect=1, read=2))
    started = time.monotonic()
    planned = len(build_patient_queries(Trials()))
    result = fetch_patient_resources(client, "p1", Trials(), concurrency=planned)
    elapsed = time.monotonic() - started
    assert len(result.queries) == planned == 1 + len(CLINICAL_TYPES)
    # overlapped: several queries start before the first could end (each takes 0.2 s), and
    # the whole fetch takes less than a sequential one (>= 0.2 s a query)
    assert sum(q.started < 0.19 for q in result.queries) >= 2
    assert elapsed < 0.2 * planned
    assert 1 < len(sessions) <= planned
    assert {r["resourceType"] for r in result.resources} == {"Patient", *CLINICAL_TYPES}
    # Sessions are returned to the pool and reused, not created per request.
    fetch_patient_resources(client, "p1", Trials(), concurrency=planned)
    assert len(sessions) <= planned


def test_a_failing_query_fails_the_fetch_with_its_own_error(injector, make_client):
    def route(seen: Seen) -> Fault:
        if "MedicationStatement" in seen.path:
            return Fault(403, outcome("scope does not cover MedicationStatement"))
        if seen.path.startswith("/fhir/Patient/"):
            return Fault(body=PATIENT)
        return Fault(body=searchset([]))

    injector.route = route
    with pytest.raises(FhirAuthError, match="scope does not cover MedicationStatement"):
        fetch_patient_resources(make_client(), "p1", Trials())


def test_a_bad_patient_id_is_refused_before_any_request(injector, make_client):
    with pytest.raises(InputError):
        fetch_patient_resources(make_client(), "../Observation", Trials())
    assert injector.seen == []


# -- Bulk Data $export through the same client ---------------------------------------------


def test_bulk_export_polls_with_retry_after_survives_a_503_and_downloads(
    injector, make_client, sleeps, tmp_path
):
    base = injector.base_url
    manifest = {
        "transactionTime": "2026-11-01T00:00:00Z",
        "request": f"{base}/$export",
        "requiresAccessToken": False,
        "output": [{"type": "Patient", "url": f"{base}/files/patient.ndjson"}],
        "error": [],
    }
    ndjson = json.dumps(PATIENT).encode() + b"\n"
    injector.script = [
        Fault(202, None, {"Content-Location": f"{base}/jobs/1"}),  # kick-off accepted
        Fault(503, outcome("busy"), {"Retry-After": "1"}),  # a passing fault while polling
        Fault(202, None, {"Retry-After": "2", "X-Progress": "50%"}),  # still running
        Fault(200, manifest),
        Fault(200, ndjson, {"Content-Type": "application/fhir+ndjson"}),
        Fault(202),  # DELETE of the finished job
    ]
    result = BulkExporter(make_client(), sleep=sleeps.append).export(tmp_path, types=["Patient"])
    assert [(f.type, f.path.read_bytes()) for f in result.files] == [("Patient", ndjson)]
    assert sleeps == [1.0, 2.0]  # the 503's and the status answer's Retry-After, in order
    kickoff = injector.seen[0]
    assert kickoff.path.startswith("/fhir/$export?_type=Patient")
    assert kickoff.headers["Prefer"] == "respond-async"
    assert [s.method for s in injector.seen] == ["GET"] * 5 + ["DELETE"]


def test_bulk_export_refuses_a_status_url_outside_the_trusted_base(injector, make_client, tmp_path):
    injector.script = [Fault(202, None, {"Content-Location": "http://127.0.0.2:9/elsewhere"})]
    with pytest.raises(UntrustedFhirServer):
        BulkExporter(make_client()).export(tmp_path, types=["Patient"])
    assert len(injector.seen) == 1  # nothing was sent to the other address


def test_bulk_export_kickoff_without_content_location_is_a_clear_error(
    injector, make_client, tmp_path
):
    injector.script = [Fault(202)]
    with pytest.raises(FhirBadResponse, match="202 without Content-Location"):
        BulkExporter(make_client()).export(tmp_path, types=["Patient"])
