"""The service as the container runs it (scripts/gunicorn-cmd, two workers, client auth on):
the jti replay check across processes, logging, and gunicorn's own error answers."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.hooks_data.support import Signer, container_command, free_port


@dataclass
class Served:
    base: str
    signer: Signer
    log: Path

    def token(self, path: str = "/cds-services", **claims: object) -> str:
        return self.signer.token(self.base + path, **claims)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("gunicorn")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    signer = Signer()
    settings = {
        "CDS_WORKERS": "2",
        # dev only for the plain-http public URL on loopback; authentication stays on
        "CDS_DEV": "1",
        "CDS_AUTH_REQUIRED": "1",
        "CDS_PUBLIC_BASE_URL": base,
        "CDS_TRUSTED_ISSUERS": json.dumps({signer.iss: {"jwks": signer.jwks}}),
        "CDS_FEEDBACK_DB": str(tmp / "store.sqlite3"),
        "CDS_MAX_REQUEST_BYTES": str(1_000_000),
    }
    with container_command(settings, tmp, port) as log:
        yield Served(base, signer, log)


def test_a_jti_is_accepted_once_across_two_workers(served: Served) -> None:
    """Issue 13 item 1: each token sent 8 times at once, to two worker processes sharing the
    SQLite store: exactly one of the 8 is accepted."""
    tokens, copies = 30, 8
    accepted: dict[str, int] = {}
    statuses: list[int] = []
    lock = threading.Lock()

    def send(token: str, barrier: threading.Barrier, session: requests.Session) -> None:
        barrier.wait()
        response = session.get(
            served.base + "/cds-services", headers={"Authorization": f"Bearer {token}"}
        )
        with lock:
            statuses.append(response.status_code)
            if response.status_code == 200:
                accepted[token] = accepted.get(token, 0) + 1

    sessions = [requests.Session() for _ in range(copies)]
    for _ in range(tokens):
        token = served.token()
        barrier = threading.Barrier(copies)
        threads = [
            threading.Thread(target=send, args=(token, barrier, sessions[i])) for i in range(copies)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert set(statuses) <= {200, 401}
    twice = sum(1 for n in accepted.values() if n > 1)
    assert twice == 0, f"{twice} of {tokens} tokens accepted more than once"
    assert len(accepted) == tokens  # and none refused outright: each exactly once


def test_the_container_command_logs_calls_and_401_reasons_without_tokens(served: Served) -> None:
    """Item 9: under scripts/gunicorn-cmd the per-call line and the 401 reason are logged."""
    bad = served.signer.token("https://elsewhere.example/cds-services")
    response = requests.get(
        served.base + "/cds-services", headers={"Authorization": f"Bearer {bad}"}
    )
    assert response.status_code == 401
    response = requests.get(
        served.base + "/cds-services", headers={"Authorization": f"Bearer {served.token()}"}
    )
    assert response.status_code == 200
    time.sleep(0.3)  # the worker's stderr reaches the file
    text = served.log_text()
    assert "client authentication failed" in text
    assert '"event":"cds-call"' in text and '"status":401' in text and '"status":200' in text
    assert bad not in text and bad.split(".")[1] not in text


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /cds-services?" + b"a" * 6000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET /cds-services HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
        (b"GET /cds-services HTTP/9.9\r\nHost: x\r\n\r\n", 400),
    ],
)
def test_gunicorns_own_refusals_are_json_operation_outcomes(
    served: Served, request_bytes: bytes, status: int
) -> None:
    """Item 8: what gunicorn refuses before the app sees it is no HTML page."""
    host, port = served.base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(request_bytes)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode())
    assert b"content-type: application/json" in head.lower()
    outcome = json.loads(body)
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["severity"] == "error"


@pytest.mark.parametrize("auth", [True, False])
def test_a_large_body_refused_early_is_drained_so_the_answer_is_read(
    served: Served, auth: bool
) -> None:
    """Item 8: a body over the limit (413), or sent without a valid JWT (401, refused before
    the body is read), still gets its answer: the client is not reset mid-send."""
    headers = {"Content-Type": "application/json", "Connection": "close"}
    if auth:
        headers["Authorization"] = f"Bearer {served.token('/cds-services/trial-screening')}"
    body = b"{" + b" " * 8_000_000 + b"}"
    response = requests.post(
        served.base + "/cds-services/trial-screening", data=body, headers=headers, timeout=30
    )
    assert response.status_code == (413 if auth else 401)
    assert response.json()["resourceType"] == "OperationOutcome"
