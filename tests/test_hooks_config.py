"""Configuration (cds/config.py) and `cds serve`: sources, validation before I/O, warnings."""

from __future__ import annotations

import argparse
import json
import logging
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from cds.cli import build_parser
from cds.config import Settings, load_config
from cds.errors import InputError
from cds.hooks.serve import serve_config
from tests.hooks_data.support import Signer, dev_app


def _jwks() -> dict[str, Any]:
    return Signer().jwks


def _secure(**extra: Any) -> dict[str, Any]:
    return {
        "public_base_url": "https://cds.example.org",
        "trusted_issuers": {"https://ehr.example.org": {"jwks": _jwks()}},
        **extra,
    }


def test_defaults_are_secure_and_need_an_issuer_and_public_url() -> None:
    with pytest.raises(InputError, match="public_base_url"):
        load_config({}, env={})
    with pytest.raises(InputError, match="trusted_issuers"):
        load_config({"public_base_url": "https://cds.example.org"}, env={})
    settings = load_config(_secure(), env={})
    assert settings.auth_required and not settings.dev
    assert settings.time_budget_s == 1.5 and settings.trials is None
    assert settings.as_of is None


def test_auth_off_requires_dev() -> None:
    with pytest.raises(InputError, match="development mode"):
        load_config(_secure(auth_required=False), env={})
    with pytest.raises(InputError, match="CDS_AUTH_REQUIRED"):
        load_config(_secure(), env={"CDS_AUTH_REQUIRED": "0"})
    assert not load_config({"dev": True, "auth_required": False}, env={}).auth_required


def test_environment_variables() -> None:
    env = {
        "CDS_DEV": "1",
        "CDS_AUTH_REQUIRED": "false",
        "CDS_TRIALS": "NCT04339036",
        "CDS_TRUSTED_ISSUERS": json.dumps(
            {
                "https://sandbox.cds-hooks.org": {
                    "jwks": _jwks(),
                    "jku": ["https://sandbox.cds-hooks.org/.well-known/jwks.json"],
                    "fhir_servers": ["http://127.0.0.1:8080/fhir/"],
                }
            }
        ),
        "CDS_FHIR_TRUSTED_SERVERS": '["https://fhir.example.org/r4/"]',
        "CDS_CORS_ORIGINS": "http://localhost:8080, https://sandbox.cds-hooks.org",
        "CDS_FEEDBACK_DB": "/tmp/x.sqlite3",
        "CDS_SUPPRESS_DAYS": "14",
        "CDS_TIME_BUDGET_S": "0.8",
        "CDS_AS_OF": "2026-11-01",
        "CDS_UNRELATED": "ignored",
        "OTHER": "ignored",
    }
    s = load_config(None, env=env)
    assert s.dev and not s.auth_required and s.trials == ("NCT04339036",)
    assert s.fhir_trusted_servers == ("https://fhir.example.org/r4",)
    assert s.cors_origins == ("http://localhost:8080", "https://sandbox.cds-hooks.org")
    assert (s.feedback_db, s.suppress_days, s.time_budget_s) == ("/tmp/x.sqlite3", 14, 0.8)
    assert s.as_of == date(2026, 11, 1)
    assert s.trusted_fhir_servers("https://sandbox.cds-hooks.org") == (
        "https://fhir.example.org/r4",
        "http://127.0.0.1:8080/fhir",
    )
    assert s.trusted_fhir_servers("https://other") == ("https://fhir.example.org/r4",)
    assert s.trusted_fhir_servers(None) == ("https://fhir.example.org/r4",)


def test_mapping_overrides_environment() -> None:
    s = load_config(
        {"dev": True, "auth_required": False, "time_budget_s": 2}, env={"CDS_TIME_BUDGET_S": "0.5"}
    )
    assert s.time_budget_s == 2.0


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_config_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"cds{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps({"dev": True, "auth_required": False, "suppress_days": 7}))
    else:
        path.write_text("dev = true\nauth_required = false\nsuppress_days = 7\n")
    s = load_config({"config_file": str(path)}, env={})
    assert s.suppress_days == 7
    s = load_config(None, env={"CDS_CONFIG": str(path), "CDS_SUPPRESS_DAYS": "3"})
    assert s.suppress_days == 7  # the file is read after the environment


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"bogus": 1}, "unknown setting"),
        ({"time_budget_s": "fast"}, "number"),
        ({"time_budget_s": 0}, "positive"),
        ({"suppress_days": -1}, "negative"),
        ({"as_of": "01/11/2026"}, "ISO date"),
        ({"prefetch_oo_policy": "fail"}, "refetch"),
        ({"fhir_trusted_servers": ["http://fhir.example.org"]}, "https"),
        ({"fhir_trusted_servers": ["ftp://x"]}, "http"),
        ({"cors_origins": ["*"]}, "development"),
        ({"cors_origins": ["https://a.example/path"]}, "origin"),
        ({"public_base_url": "http://cds.example.org"}, "https"),
        ({"trusted_issuers": {"https://i": {}}}, "jwks"),
        ({"trusted_issuers": {"https://i": {"jwks": {"nokeys": 1}}}}, "keys"),
        ({"trusted_issuers": {"https://i": {"jwks_url": "x"}}}, "unknown keys"),
        ({"trusted_issuers": {"https://i": {"jku": ["http://10.0.0.1/jwks"]}}}, "https"),
        ({"dev": "maybe"}, "boolean"),
    ],
)
def test_bad_settings_are_refused_naming_them(config: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError, match=message):
        load_config(_secure(**config), env={})


def test_dev_allows_http_only_on_loopback() -> None:
    base = {"dev": True, "auth_required": False}
    load_config({**base, "fhir_trusted_servers": ["http://127.0.0.1:8080/fhir"]}, env={})
    load_config({**base, "fhir_trusted_servers": ["http://localhost:8080/fhir"]}, env={})
    with pytest.raises(InputError, match="loopback"):
        load_config({**base, "fhir_trusted_servers": ["http://10.1.2.3/fhir"]}, env={})


def test_settings_are_frozen() -> None:
    s = load_config({"dev": True, "auth_required": False}, env={})
    assert isinstance(s, Settings)
    with pytest.raises(AttributeError):
        s.dev = False  # type: ignore[misc]


def test_insecure_modes_log_a_warning_at_start(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    dev_app()
    assert "DEVELOPMENT MODE" in caplog.text
    assert "authentication is OFF" in caplog.text


def test_unknown_trial_is_refused_at_start() -> None:
    with pytest.raises(InputError, match="NCT00000000"):
        dev_app(trials=["NCT00000000"])


def test_cds_serve_arguments(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["serve", "--host", "127.0.0.1", "--port", "9999", "--config", "x.toml", "--dev"]
    )
    assert args.func.__module__ == "cds.hooks.serve"
    assert (args.host, args.port) == ("127.0.0.1", 9999)
    assert serve_config(args) == {"config_file": "x.toml", "dev": True, "auth_required": False}
    plain = argparse.Namespace(config=None, dev=False)
    assert serve_config(plain) == {}


def test_cds_serve_refuses_bad_settings_before_binding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cds.cli import main

    for key in list(__import__("os").environ):
        if key.startswith("CDS_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    assert main(["serve", "--port", "1"]) == 2  # no issuers, no public URL: exit, not serve
    assert "public_base_url" in capsys.readouterr().err
