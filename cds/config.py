"""The one place configuration is read: a mapping, a JSON/TOML file, and ``CDS_`` env vars."""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import date
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from cds.errors import InputError, UntrustedFhirServer
from cds.fhir.trust import is_loopback_url, normalise_base_url

__all__ = [
    "ENV_PREFIX",
    "IssuerConfig",
    "Settings",
    "load_config",
    "load_config_file",
]

#: every environment variable this project reads starts with this
ENV_PREFIX = "CDS_"

PrefetchOoPolicy = Literal["refetch", "unknown"]


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    """One trusted CDS client (JWT ``iss``): where its keys come from and what it may reach.

    :param iss: the issuer, exactly as in the JWT ``iss`` claim
    :param jwks: its JSON Web Key Set exchanged out of band, inline
    :param jwks_file: the same, as a file path (re-read when an unknown ``kid`` appears)
    :param jku: the ``jku`` URLs this issuer may name; any other ``jku`` is refused unfetched
    :param tenants: when set, the ``tenant`` claim must be one of these
    :param fhir_servers: FHIR base URLs this issuer's calls may make us contact
    """

    iss: str
    jwks: Mapping[str, Any] | None = None
    jwks_file: str | None = None
    jku: tuple[str, ...] = ()
    tenants: tuple[str, ...] | None = None
    fhir_servers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Settings:
    """Validated service configuration. Build it with :func:`load_config`, never by hand."""

    #: explicit development mode: auth may be off, plain-http FHIR/jku on loopback, CORS "*"
    dev: bool = False
    #: CDS client JWT authentication; off only together with ``dev``
    auth_required: bool = True
    #: the public URL of this service without ``/cds-services`` (JWT ``aud`` is built from it)
    public_base_url: str | None = None
    #: NCT numbers of the trials to screen for; None = every shipped trial
    trials: tuple[str, ...] | None = None
    #: NCT numbers whose CDS Hooks cards this site turns off (e.g. a trial it does not run or
    #: that is not enrolling); `cds evaluate` and sweeps still screen them
    cards_off: tuple[str, ...] = ()
    trusted_issuers: Mapping[str, IssuerConfig] = field(default_factory=dict)
    #: FHIR base URLs trusted for every issuer (and the only ones when auth is off)
    fhir_trusted_servers: tuple[str, ...] = ()
    #: browser origins allowed by CORS ("*" only in development)
    cors_origins: tuple[str, ...] = ()
    #: SQLite file for feedback, issued cards and card suppression (":memory:" for tests)
    feedback_db: str = "cds-feedback.sqlite3"
    #: days a trial's card stays hidden after "already screened" / "patient declined"
    suppress_days: int = 30
    #: wall-clock budget of one hook call for FHIR fallback, seconds
    time_budget_s: float = 1.5
    #: the service's "today" (tests pin it); None = the real date at each call
    as_of: date | None = None
    #: at most this many ``next`` pages followed per prefetch key
    max_prefetch_pages: int = 20
    #: a prefetch key holding an OperationOutcome: fetch it again, or leave its criteria unknown
    prefetch_oo_policy: PrefetchOoPolicy = "refetch"
    #: concurrent FHIR queries per hook call
    fhir_concurrency: int = 4
    #: clock skew tolerated on JWT ``exp``/``iat``/``nbf``, seconds
    jwt_leeway_s: int = 30
    #: tokens living longer than this (exp - iat) are refused; bounds the jti replay store
    jwt_max_lifetime_s: int = 3600
    #: at most one JWKS refetch per key source in this many seconds
    jwks_refetch_interval_s: float = 30.0
    #: request bodies larger than this are refused with 413
    max_request_bytes: int = 64 * 1024 * 1024
    #: OAuth client id of the screening page (a SMART public client: PKCE, no secret)
    smart_client_id: str = "cds-trial-screening"
    #: CSP frame-ancestors of the screening page: the EHR origins that may frame it
    smart_frame_ancestors: tuple[str, ...] = ()
    #: minutes a screening-page session (server-side, holding the access token) lives
    smart_session_minutes: int = 60

    def smart_servers(self) -> tuple[str, ...]:
        """FHIR base URLs a SMART launch's ``iss`` may name: every trusted server."""
        servers = self.fhir_trusted_servers
        for issuer in self.trusted_issuers.values():
            servers += issuer.fhir_servers
        return tuple(dict.fromkeys(servers))

    def trusted_fhir_servers(self, iss: str | None) -> tuple[str, ...]:
        """FHIR base URLs a call from ``iss`` may make us contact (global ∪ per issuer)."""
        issuer = self.trusted_issuers.get(iss) if iss else None
        extra = issuer.fhir_servers if issuer else ()
        return tuple(dict.fromkeys(self.fhir_trusted_servers + extra))


# -- parsing ---------------------------------------------------------------------------------

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a ``--config`` file: JSON (``.json``) or TOML (anything else ending ``.toml``)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", source=str(p)) from exc
    try:
        if p.suffix.lower() == ".toml":
            data: Any = tomllib.loads(raw.decode("utf-8"))
        else:
            data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        kind = p.suffix.lstrip(".") or "JSON"
        raise InputError(f"not valid {kind}: {exc}", source=str(p)) from exc
    if not isinstance(data, dict):
        raise InputError("must hold an object of settings", source=str(p))
    return data


def load_config(
    mapping: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Merge defaults < ``CDS_*`` environment < ``mapping`` and validate the result.

    Keys are the :class:`Settings` field names (``time_budget_s``); the environment uses
    them upper-cased with the ``CDS_`` prefix (``CDS_TIME_BUDGET_S``). A ``config_file`` key
    (or ``CDS_CONFIG``) names a JSON/TOML file merged between the environment and ``mapping``.
    Every combination is checked here, before any file other than that one or the network is
    touched; a bad setting raises :class:`InputError` naming it.
    """
    known = {f.name for f in fields(Settings)}
    raw: dict[str, tuple[str, Any]] = {}  # name -> (where it came from, value)
    for key, value in (env or {}).items():
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX) :].lower()
            if name in known:
                raw[name] = (key, value)
    config_file = (mapping or {}).get("config_file") or (env or {}).get(f"{ENV_PREFIX}CONFIG")
    if config_file:
        for name, value in load_config_file(config_file).items():
            _check_known(name, known, str(config_file))
            raw[name] = (f"{config_file}: {name}", value)
    for name, value in (mapping or {}).items():
        if name == "config_file":
            continue
        _check_known(name, known, "config")
        raw[name] = (name, value)

    values: dict[str, Any] = {}
    for name, (source, value) in raw.items():
        values[name] = _PARSERS[name](value, source)
    settings = Settings(**values)
    _validate(settings, {name: source for name, (source, _) in raw.items()})
    return settings


def _check_known(name: str, known: set[str], source: str) -> None:
    if name not in known:
        raise InputError(f"unknown setting {name!r}", source=source)


def _bool(value: Any, source: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise InputError("expected a boolean (1/0, true/false)", source=source)


def _int(value: Any, source: str) -> int:
    if isinstance(value, bool):
        raise InputError("expected an integer", source=source)
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise InputError("expected an integer", source=source) from exc


def _float(value: Any, source: str) -> float:
    if isinstance(value, bool):
        raise InputError("expected a number", source=source)
    try:
        result = float(value)
    except (TypeError, ValueError) as exc:
        raise InputError("expected a number", source=source) from exc
    if not math.isfinite(result):
        raise InputError("expected a finite number", source=source)
    return result


def _str(value: Any, source: str) -> str:
    if not isinstance(value, str):
        raise InputError("expected a string", source=source)
    return value


def _opt_str(value: Any, source: str) -> str | None:
    return None if value is None or value == "" else _str(value, source)


def _str_list(value: Any, source: str) -> tuple[str, ...]:
    """A list of strings: a JSON/TOML array, or in the environment JSON or comma-separated."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError as exc:
                raise InputError("not a valid JSON array", source=source) from exc
        else:
            value = [part.strip() for part in text.split(",") if part.strip()]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise InputError("expected a list of strings", source=source)
    return tuple(value)


def _trials(value: Any, source: str) -> tuple[str, ...] | None:
    return None if value is None else _str_list(value, source)


def _as_of(value: Any, source: str) -> date | None:
    if value is None or value == "":
        return None
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(_str(value, source))
    except ValueError as exc:
        raise InputError("expected an ISO date (YYYY-MM-DD)", source=source) from exc


def _oo_policy(value: Any, source: str) -> PrefetchOoPolicy:
    if value == "refetch":
        return "refetch"
    if value == "unknown":
        return "unknown"
    raise InputError("expected 'refetch' or 'unknown'", source=source)


def _issuers(value: Any, source: str) -> dict[str, IssuerConfig]:
    """``{iss: {jwks|jwks_file, jku, tenants, fhir_servers}}`` (JSON text in the environment)."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError as exc:
            raise InputError("not valid JSON", source=source) from exc
    if not isinstance(value, Mapping):
        raise InputError("expected an object mapping each issuer to its settings", source=source)
    allowed = {"jwks", "jwks_file", "jku", "tenants", "fhir_servers"}
    issuers: dict[str, IssuerConfig] = {}
    for iss, spec in value.items():
        where = f"{source}[{iss}]"
        if not isinstance(iss, str) or not iss:
            raise InputError("issuer must be a non-empty string", source=source)
        if not isinstance(spec, Mapping):
            raise InputError("expected an object", source=where)
        unknown = set(spec) - allowed
        if unknown:
            raise InputError(f"unknown keys {sorted(unknown)}", source=where)
        jwks = spec.get("jwks")
        is_jwks = isinstance(jwks, Mapping) and isinstance(jwks.get("keys"), list)
        if jwks is not None and not is_jwks:
            raise InputError("jwks must be a JWKS object with a 'keys' array", source=where)
        tenants = spec.get("tenants")
        issuers[iss] = IssuerConfig(
            iss=iss,
            jwks=jwks,
            jwks_file=_opt_str(spec.get("jwks_file"), f"{where}.jwks_file"),
            jku=_str_list(spec.get("jku", []), f"{where}.jku"),
            tenants=None if tenants is None else _str_list(tenants, f"{where}.tenants"),
            fhir_servers=_servers(spec.get("fhir_servers", []), f"{where}.fhir_servers"),
        )
    return issuers


def _servers(value: Any, source: str) -> tuple[str, ...]:
    """FHIR base URLs in the one form every allowlist check compares (cds.fhir.trust)."""
    try:
        return tuple(normalise_base_url(u) for u in _str_list(value, source))
    except UntrustedFhirServer as exc:
        raise InputError(str(exc), source=source) from exc


_PARSERS: dict[str, Any] = {
    "dev": _bool,
    "auth_required": _bool,
    "public_base_url": _opt_str,
    "trials": _trials,
    "cards_off": _str_list,
    "trusted_issuers": _issuers,
    "fhir_trusted_servers": _servers,
    "cors_origins": _str_list,
    "feedback_db": _str,
    "suppress_days": _int,
    "time_budget_s": _float,
    "as_of": _as_of,
    "max_prefetch_pages": _int,
    "prefetch_oo_policy": _oo_policy,
    "fhir_concurrency": _int,
    "jwt_leeway_s": _int,
    "jwt_max_lifetime_s": _int,
    "jwks_refetch_interval_s": _float,
    "max_request_bytes": _int,
    "smart_client_id": _str,
    "smart_frame_ancestors": _str_list,
    "smart_session_minutes": _int,
}


# -- validation ------------------------------------------------------------------------------


def _check_url(url: str, source: str, *, dev: bool, what: str) -> None:
    """https everywhere; plain http only in development and only on loopback."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise InputError(f"{what} must be an absolute http(s) URL", source=source)
    if parts.username or parts.password:
        raise InputError(f"{what} must not carry credentials", source=source)
    if parts.scheme == "http" and not (dev and is_loopback_url(url)):
        raise InputError(
            f"{what} must use https (plain http only on loopback in development mode)",
            source=source,
        )


def _validate(s: Settings, sources: Mapping[str, str]) -> None:
    def src(name: str) -> str:
        return sources.get(name, name)

    # "Turning authentication off is an explicit development setting": never implied.
    if not s.auth_required and not s.dev:
        raise InputError(
            "client authentication can only be turned off in development mode (CDS_DEV=1)",
            source=src("auth_required"),
        )
    if s.public_base_url is not None:
        parts = urlsplit(s.public_base_url)
        if parts.query or parts.fragment:
            raise InputError("must not have a query or fragment", source=src("public_base_url"))
        if parts.scheme != "https" and not s.dev:
            raise InputError("must be an https URL", source=src("public_base_url"))
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise InputError("must be an absolute URL", source=src("public_base_url"))
    elif s.auth_required and not s.dev:
        # JWT aud "MUST be the URL of the endpoint invoked": we know our public URL from
        # configuration, never from the Host header a caller controls.
        raise InputError(
            "required when authentication is on (the JWT aud is checked against it)",
            source=src("public_base_url"),
        )
    if s.auth_required and not s.dev and not s.trusted_issuers:
        raise InputError(
            "no trusted issuers: every call would be refused", source=src("trusted_issuers")
        )
    for url in s.fhir_trusted_servers:
        _check_url(url, src("fhir_trusted_servers"), dev=s.dev, what="a trusted FHIR server")
    for iss, issuer in s.trusted_issuers.items():
        where = f"{src('trusted_issuers')}[{iss}]"
        if issuer.jwks is None and issuer.jwks_file is None and not issuer.jku:
            raise InputError("needs jwks, jwks_file or an allowlisted jku", source=where)
        for url in issuer.jku:
            _check_url(url, f"{where}.jku", dev=s.dev, what="a jku")
        for url in issuer.fhir_servers:
            _check_url(url, f"{where}.fhir_servers", dev=s.dev, what="a trusted FHIR server")
    for origin in s.smart_frame_ancestors:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
            raise InputError(
                f"{origin!r} is not an origin (scheme://host[:port])",
                source=src("smart_frame_ancestors"),
            )
        _check_url(origin, src("smart_frame_ancestors"), dev=s.dev, what="a frame ancestor")
    if not s.smart_client_id.strip():
        raise InputError("must not be empty", source=src("smart_client_id"))
    for origin in s.cors_origins:
        if origin == "*":
            if not s.dev:
                raise InputError(
                    "'*' is allowed only in development mode", source=src("cors_origins")
                )
            continue
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
            raise InputError(
                f"{origin!r} is not an origin (scheme://host[:port])", source=src("cors_origins")
            )
    positive: dict[str, float] = {
        "time_budget_s": s.time_budget_s,
        "max_prefetch_pages": s.max_prefetch_pages,
        "fhir_concurrency": s.fhir_concurrency,
        "jwt_max_lifetime_s": s.jwt_max_lifetime_s,
        "max_request_bytes": s.max_request_bytes,
        "smart_session_minutes": s.smart_session_minutes,
    }
    for name, number in positive.items():
        if number <= 0:
            raise InputError("must be positive", source=src(name))
    non_negative: dict[str, float] = {
        "suppress_days": s.suppress_days,
        "jwt_leeway_s": s.jwt_leeway_s,
        "jwks_refetch_interval_s": s.jwks_refetch_interval_s,
    }
    for name, number in non_negative.items():
        if number < 0:
            raise InputError("must not be negative", source=src(name))
    if not s.feedback_db:
        raise InputError("must name a file (or ':memory:')", source=src("feedback_db"))


#: defaults of the server process settings (``CDS_BIND``, ``CDS_WORKERS``, ``CDS_THREADS``)
_SERVER_DEFAULTS = {"bind": "0.0.0.0:8080", "workers": 2, "threads": 8}


def server_options(env: Mapping[str, str]) -> dict[str, Any]:
    """How the HTTP server runs (not the service's Settings): ``CDS_BIND`` (host:port),
    ``CDS_WORKERS`` and ``CDS_THREADS`` (positive integers), with their defaults."""
    options: dict[str, Any] = dict(_SERVER_DEFAULTS)
    bind = env.get(f"{ENV_PREFIX}BIND")
    if bind:
        options["bind"] = bind
    for name in ("workers", "threads"):
        key = f"{ENV_PREFIX}{name.upper()}"
        if env.get(key):
            number = _int(env[key], key)
            if number < 1:
                raise InputError("must be positive", source=key)
            options[name] = number
    return options
