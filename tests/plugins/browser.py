"""pytest plugin: real parts for the screening page's tests.

- ``smart_as``: the test authorization server (npm oidc-provider, tests/smart_as/server.js) on
  127.0.0.1, with the loaded test FHIR server behind it at ``{root}/fhir`` (bearer tokens
  required) and ``/fhir/.well-known/smart-configuration`` beside it.
- ``cds_service``: this service (``create_app``) served by werkzeug on 127.0.0.1, trusting that
  FHIR base and the open test FHIR server (development mode).
- ``browser``: one headless Chromium (Debian ``chromium`` + ``chromium-driver``) for the session,
  driven by Selenium, with a fresh profile.
Screenshots go to ``test-artifacts/`` at the repository root (gitignored).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from werkzeug.serving import make_server

from cds.hooks.app import create_app

REPO_ROOT = Path(__file__).resolve().parents[2]
AS_DIR = REPO_ROOT / "tests" / "smart_as"
ARTIFACTS = REPO_ROOT / "test-artifacts"
CLIENT_ID = "cds-trial-screening-test"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class SmartAS:
    root: str
    fhir_base: str

    def launch(self, patient: str) -> str:
        """What the EHR does before an EHR launch: an opaque launch value for a patient."""
        url = f"{self.root}/ehr/launch?patient={patient}"
        with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - loopback test server
            return str(json.load(r)["launch"])

    def issued(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.root}/test/issued", timeout=10) as r:  # noqa: S310
            data: list[dict[str, Any]] = json.load(r)
            return data


@dataclass(frozen=True)
class CdsService:
    base: str
    fhir_open: str
    fhir_protected: str


def _wait_for(url: str, process: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{what} exited: {log.read_text(errors='replace')[-3000:]}", pytrace=False)
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 - loopback
                return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"{what} did not answer {url}: {log.read_text(errors='replace')[-3000:]}")


def _cds_port() -> int:
    return _CDS_PORT


_CDS_PORT = free_port()


@pytest.fixture(scope="session")
def smart_as(
    loaded_fhir_base_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SmartAS]:
    node = shutil.which("node")
    if node is None or not (AS_DIR / "node_modules" / "oidc-provider").is_dir():
        pytest.fail(
            "the test authorization server needs node and `npm ci` in tests/smart_as"
            " (make setup does it)",
            pytrace=False,
        )
    port = free_port()
    log = tmp_path_factory.mktemp("smart-as") / "server.log"
    env = {
        **os.environ,
        "AS_PORT": str(port),
        "FHIR_UPSTREAM": loaded_fhir_base_url,
        "CLIENT_ID": CLIENT_ID,
        "REDIRECT_URI": f"http://127.0.0.1:{_cds_port()}/smart/callback",
    }
    with open(log, "wb") as out:
        process = subprocess.Popen(  # noqa: S603 - fixed argv
            [node, str(AS_DIR / "server.js")],
            cwd=AS_DIR,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    root = f"http://127.0.0.1:{port}"
    try:
        _wait_for(f"{root}/fhir/.well-known/smart-configuration", process, "oidc-provider", log)
        yield SmartAS(root=root, fhir_base=f"{root}/fhir")
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def cds_service(smart_as: SmartAS, loaded_fhir_base_url: str) -> Iterator[CdsService]:
    port = _cds_port()
    app = create_app(
        {
            "dev": True,
            "auth_required": False,
            "feedback_db": ":memory:",
            "as_of": "2026-11-01",
            "public_base_url": f"http://127.0.0.1:{port}",
            "fhir_trusted_servers": [smart_as.fhir_base, loaded_fhir_base_url],
            "smart_client_id": CLIENT_ID,
            "smart_frame_ancestors": ["http://127.0.0.1:9"],
        }
    )
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield CdsService(
            base=f"http://127.0.0.1:{port}",
            fhir_open=loaded_fhir_base_url,
            fhir_protected=smart_as.fhir_base,
        )
    finally:
        server.shutdown()
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail(
            f"headless browser tests need {CHROMIUM} and {CHROMEDRIVER}"
            " (Debian chromium, chromium-driver: .ci/run installs them)",
            pytrace=False,
        )
    profile = tempfile.mkdtemp(prefix="cds-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1100,1400",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
