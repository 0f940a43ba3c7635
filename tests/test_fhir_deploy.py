"""The container's gunicorn command and health check, run here since no Docker engine runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tests.hooks_data.support import GUNICORN_CMD, container_command, free_port

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
EXPECTED = "gunicorn --config python:cds.hooks.gunicorn_conf cds.hooks.app:create_app()"


def _dockerfile_instruction(name: str) -> str:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    [line] = [ln for ln in text.splitlines() if ln.startswith(f"{name} ")]
    return line[len(name) + 1 :].strip()


def test_the_gunicorn_command_line() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("CDS_BIND", "CDS_WORKERS")}
    printed = subprocess.run(
        [str(GUNICORN_CMD), "--print"], capture_output=True, text=True, check=True, env=env
    )
    assert printed.stdout.strip() == EXPECTED


def test_cds_serve_and_the_container_use_one_set_of_gunicorn_settings() -> None:
    """Issue 13 item 9: one source (threads were 4 in one, 8 in the other)."""
    import cds.hooks.gunicorn_conf as conf
    from cds.cli import build_parser
    from cds.config import server_options
    from cds.hooks.serve import gunicorn_settings

    args = build_parser("serve").parse_args(["serve"])
    served = gunicorn_settings("127.0.0.1:8080", args.workers, args.threads)
    container = gunicorn_settings(**server_options({}))
    assert {k: v for k, v in served.items() if k != "bind"} == {
        k: v for k, v in container.items() if k != "bind"
    }
    for name, value in container.items():
        if name != "bind":
            assert getattr(conf, name) == value, name


def test_the_dockerfile_runs_that_script_as_a_non_root_user() -> None:
    assert "COPY scripts/gunicorn-cmd /usr/local/bin/cds-gunicorn" in DOCKERFILE.read_text()
    assert json.loads(_dockerfile_instruction("CMD")) == ["cds-gunicorn"]
    assert _dockerfile_instruction("USER") == "cds"
    assert _dockerfile_instruction("FROM").startswith("python:3.11-slim")
    assert "pip install ." in DOCKERFILE.read_text()


def test_the_service_starts_with_that_command_and_passes_the_health_check(tmp_path: Path) -> None:
    port = free_port()
    settings = {
        "CDS_DEV": "1",
        "CDS_AUTH_REQUIRED": "0",
        "CDS_FEEDBACK_DB": str(tmp_path / "feedback.sqlite3"),
    }
    env = {**os.environ, "CDS_BIND": f"127.0.0.1:{port}", **settings}
    with container_command(settings, tmp_path, port):
        # The image's command answers CDS Hooks discovery with the patient-view service.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/cds-services", timeout=5) as r:
            services = json.loads(r.read())["services"]
        assert {s["hook"] for s in services} >= {"patient-view", "order-select", "order-sign"}
        health = json.loads(_dockerfile_instruction("HEALTHCHECK").split(" CMD ", 1)[1])
        assert health[:2] == ["python", "-c"]
        check = subprocess.run([sys.executable, "-c", health[2]], env=env, timeout=10, check=False)
        assert check.returncode == 0
        env["CDS_BIND"] = f"127.0.0.1:{free_port()}"  # nothing there: the check must fail
        check = subprocess.run(
            [sys.executable, "-c", health[2]], env=env, timeout=10, check=False, capture_output=True
        )
        assert check.returncode == 1
