"""pytest plugin: a real FHIR R4 server for integration tests (sekmet-fhir, or FHIR_BASE_URL)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cds.fhir.client import FhirClient, Timeouts
from cds.fhir.loader import (
    DEFAULT_TAG,
    DEFAULT_TAG_SYSTEM,
    FIXTURES_DIR,
    bundle_files,
    load_fixtures,
)

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install-fhir-server"
SERVE_SCRIPT = REPO_ROOT / "scripts" / "serve-fhir-server"
SERVER_VENV = Path(os.environ.get("FHIR_SERVER_VENV", REPO_ROOT / ".fhir-server-venv"))
#: uvicorn workers: sekmet answers one request at a time per worker (see the reference notes)
WORKERS = 2
STARTUP_TIMEOUT = float(os.environ.get("FHIR_SERVER_STARTUP_TIMEOUT", "60"))


@dataclass(frozen=True)
class FhirTestServer:
    """The server the integration tests use, and how to reach it."""

    base_url: str
    #: the meta.tag the session's fixtures were loaded under (unique on an external server)
    tag: tuple[str, str]
    #: True when FHIR_BASE_URL named a shared server: ids the tests create must be unique
    external: bool
    #: prefix for ids the tests create (empty on a fresh local server)
    id_prefix: str

    def client(self, **kwargs: object) -> FhirClient:
        options: dict[str, object] = {
            "base_url": self.base_url,
            "trusted_base_urls": [self.base_url],
            "allow_insecure_loopback": True,
            "timeouts": Timeouts(connect=5, read=60 if self.external else 20),
        }
        options.update(kwargs)
        return FhirClient(**options)  # type: ignore[arg-type]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _ensure_installed() -> None:
    uvicorn = SERVER_VENV / "bin" / "uvicorn"
    result = subprocess.run(  # idempotent: returns at once when the pinned version is there
        [str(INSTALL_SCRIPT), str(SERVER_VENV)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0 or not uvicorn.exists():
        pytest.fail(
            f"could not install the test FHIR server with {INSTALL_SCRIPT}:\n"
            f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}",
            pytrace=False,
        )


def _wait_until_up(process: subprocess.Popen[bytes], metadata_url: str, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"the test FHIR server exited with status {process.returncode} before answering "
                f"{metadata_url}; log tail ({log_path}):\n{_tail(log_path)}",
                pytrace=False,
            )
        try:
            with urllib.request.urlopen(metadata_url, timeout=2) as response:  # noqa: S310
                if response.status == 200:
                    return
                last_error = f"HTTP {response.status}"
        except (urllib.error.URLError, OSError) as exc:
            last_error = str(exc)
        time.sleep(0.1)
    pytest.fail(
        f"the test FHIR server did not answer {metadata_url} within {STARTUP_TIMEOUT:.0f} s "
        f"(last: {last_error}); log tail ({log_path}):\n{_tail(log_path)}",
        pytrace=False,
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group (uvicorn and its workers), then SIGKILL."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass
    # Workers left behind by a parent that died first are in the same group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def fhir_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FhirTestServer]:
    """Start sekmet-fhir on 127.0.0.1 for the session (or use FHIR_BASE_URL) and stop it after."""
    external = os.environ.get("FHIR_BASE_URL")
    if external:
        run = uuid.uuid4().hex[:10]
        yield FhirTestServer(
            base_url=external.rstrip("/"),
            tag=(DEFAULT_TAG_SYSTEM, f"test-run-{run}"),
            external=True,
            id_prefix=f"cds{run}-",
        )
        return

    _ensure_installed()
    root = tmp_path_factory.mktemp("fhir-server")
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}/fhir"
    log_path = root / "server.log"
    env = {**os.environ, "FHIR_SERVER_VENV": str(SERVER_VENV)}
    with open(log_path, "wb") as log_file:
        # The script holds the server configuration (shared with scripts/demo and the bench)
        # and execs uvicorn, so this process is uvicorn, leader of its own process group.
        process = subprocess.Popen(
            [str(SERVE_SCRIPT), str(port), str(root / "state"), str(WORKERS)],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so the workers stop with it
        )
    try:
        _wait_until_up(process, f"{base_url}/metadata", log_path)
        log.info("test FHIR server at %s (log %s)", base_url, log_path)
        yield FhirTestServer(base_url=base_url, tag=DEFAULT_TAG, external=False, id_prefix="")
    finally:
        _stop(process)


@pytest.fixture(scope="session")
def fhir_base_url(fhir_server: FhirTestServer) -> str:
    """Base URL of a running FHIR R4 server (empty of data on the local one)."""
    return fhir_server.base_url


@pytest.fixture(scope="session")
def loaded_fhir_base_url(fhir_server: FhirTestServer) -> str:
    """Base URL of the server with fhir_fixtures/ loaded once per session, under fhir_server.tag."""
    files = bundle_files(FIXTURES_DIR) if FIXTURES_DIR.is_dir() else []
    if not files:
        print(f"note: no fixture bundles in {FIXTURES_DIR}; nothing loaded", file=sys.stderr)
    else:
        with fhir_server.client() as client:
            report = load_fixtures(client, FIXTURES_DIR, tag=fhir_server.tag, files=files)
        log.info("fixtures loaded: %s", report.summary())
    return fhir_server.base_url
