"""CDS client authentication: the JWT each call carries (2.0 'Trusting CDS Clients')."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from jwt.exceptions import PyJWKClientError, PyJWTError

from cds.config import IssuerConfig, Settings
from cds.errors import ClientAuthError
from cds.hooks.store import Store

__all__ = ["ALLOWED_ALGORITHMS", "Authenticator", "ClientIdentity", "KeySource"]

log = logging.getLogger("cds.hooks.auth")

# 2.0: "CDS Services SHOULD use ES384 or RS384"; "none" and symmetric algorithms SHALL NOT be used.
ALLOWED_ALGORITHMS = {"ES384": "EC", "RS384": "RSA"}

#: fetches a JWKS document from a URL (only ever an allowlisted one)
JwksFetcher = Callable[[str], Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    """Who called, as the verified JWT says: fine to log (no token, no patient data)."""

    iss: str | None
    tenant: str | None = None
    jti: str | None = None


def fetch_jwks(url: str, timeout: float = 3.0) -> Mapping[str, Any]:
    """GET a JWKS with PyJWT's own client (no redirects beyond what urllib follows)."""
    client = jwt.PyJWKClient(url, cache_jwk_set=False, cache_keys=False, timeout=int(timeout) or 1)
    try:
        data = client.fetch_data()
    except PyJWKClientError as exc:
        raise ClientAuthError(f"JWKS fetch from {url} failed") from exc
    if not isinstance(data, Mapping):
        raise ClientAuthError(f"JWKS at {url} is not a JSON object")
    return data


class KeySource:
    """One place an issuer's public keys come from, cached, refreshed at most every ``interval``.

    :param name: the jku URL, the file path, or ``"inline"``
    :param load: returns the current JWKS document
    :param interval: seconds that must pass between two refreshes (rate limit)
    """

    def __init__(self, name: str, load: Callable[[], Mapping[str, Any]], interval: float) -> None:
        self.name = name
        self._load = load
        self._interval = interval
        self._keys: dict[str, dict[str, Any]] = {}
        self._loaded_at: float | None = None
        self._lock = threading.Lock()
        self.fetches = 0

    def get(self, kid: str) -> dict[str, Any] | None:
        """The JWK with this ``kid``; an unknown kid triggers one rate-limited refresh."""
        with self._lock:
            if self._loaded_at is None:
                self._refresh()
            elif kid not in self._keys and time.monotonic() - self._loaded_at >= self._interval:
                # Best practices: keep a rotating cache of the client's JWKS; refetch on an
                # unknown kid, but never let a stream of bogus kids hammer the issuer.
                self._refresh()
            return self._keys.get(kid)

    def _refresh(self) -> None:
        self._loaded_at = time.monotonic()
        self.fetches += 1
        try:
            document = self._load()
        except ClientAuthError:
            log.warning("could not load the JWKS from %s", self.name)
            return
        keys = document.get("keys")
        if not isinstance(keys, list):
            log.warning("JWKS from %s has no 'keys' array", self.name)
            return
        self._keys = {
            k["kid"]: k for k in keys if isinstance(k, dict) and isinstance(k.get("kid"), str)
        }


def _constant(document: Mapping[str, Any]) -> Callable[[], Mapping[str, Any]]:
    def load() -> Mapping[str, Any]:
        return document

    return load


def _file_loader(path: str) -> Callable[[], Mapping[str, Any]]:
    def load() -> Mapping[str, Any]:
        try:
            data = json.loads(Path(path).read_text("utf-8"))
        except (OSError, ValueError) as exc:
            raise ClientAuthError(f"cannot read JWKS file {path}") from exc
        if not isinstance(data, Mapping):
            raise ClientAuthError(f"JWKS file {path} is not a JSON object")
        return data

    return load


class Authenticator:
    """Verifies ``Authorization: Bearer <JWT>`` as CDS Hooks 2.0 and its best practices say.

    Steps (best practices 'Verification procedure'): iss allowlisted; signature by one of
    the issuer's keys (ES384/RS384 only); aud is this endpoint; exp/iat/nbf; tenant if
    configured; jti unseen. Any failure raises :class:`ClientAuthError` whose message (logged,
    never returned) holds no token.

    :param settings: trusted issuers, leeway, token lifetime and refetch interval
    :param store: where seen ``jti`` values live (shared by processes)
    :param fetcher: JWKS fetcher for ``jku`` URLs (tests pass a fake)
    """

    def __init__(
        self, settings: Settings, store: Store, *, fetcher: JwksFetcher | None = None
    ) -> None:
        self._settings = settings
        self._store = store
        self._fetch = fetcher or fetch_jwks
        self._sources: dict[str, KeySource] = {}
        self._static: dict[str, KeySource] = {}
        self._lock = threading.Lock()
        interval = settings.jwks_refetch_interval_s
        for iss, issuer in settings.trusted_issuers.items():
            if issuer.jwks is not None:
                self._static[iss] = KeySource("inline", _constant(dict(issuer.jwks)), interval)
            elif issuer.jwks_file is not None:
                self._static[iss] = KeySource(
                    issuer.jwks_file, _file_loader(issuer.jwks_file), interval
                )

    def _jku_source(self, url: str) -> KeySource:
        with self._lock:
            source = self._sources.get(url)
            if source is None:
                source = KeySource(
                    url, lambda: self._fetch(url), self._settings.jwks_refetch_interval_s
                )
                self._sources[url] = source
            return source

    def verify(self, authorization: str | None, audience: str) -> ClientIdentity:
        """The caller's identity, or :class:`ClientAuthError`."""
        token = _bearer(authorization)
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except (PyJWTError, OverflowError, ValueError, TypeError, RecursionError) as exc:
            raise ClientAuthError("malformed JWT") from exc
        alg = header.get("alg")
        if alg not in ALLOWED_ALGORITHMS:
            raise ClientAuthError(f"JWT alg {alg!r} is not allowed (ES384, RS384 only)")
        # 2.0 JWT header: typ REQUIRED, fixed "JWT"; kid REQUIRED.
        if header.get("typ") != "JWT":
            raise ClientAuthError("JWT typ is not 'JWT'")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise ClientAuthError("JWT has no kid")
        iss = unverified.get("iss")
        if not isinstance(iss, str) or iss not in self._settings.trusted_issuers:
            raise ClientAuthError(f"issuer {str(iss)[:100]!r} is not trusted")
        issuer = self._settings.trusted_issuers[iss]
        jwk = self._find_key(issuer, header, kid)
        if jwk is None:
            raise ClientAuthError(f"no key {kid!r} for issuer {iss!r}")
        if jwk.get("kty") != ALLOWED_ALGORITHMS[alg] or jwk.get("alg", alg) != alg:
            raise ClientAuthError(f"key {kid!r} of issuer {iss!r} does not match alg {alg}")
        if alg == "ES384" and jwk.get("crv") != "P-384":
            raise ClientAuthError(f"key {kid!r} of issuer {iss!r} is not a P-384 key")
        try:
            key = jwt.PyJWK(jwk, algorithm=alg)
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                # 2.0: aud "MUST be the URL of the CDS Service endpoint being invoked"
                audience=audience,
                issuer=iss,
                leeway=self._settings.jwt_leeway_s,
                options={"require": ["iss", "aud", "exp", "iat", "jti"]},
            )
        except jwt.InvalidAudienceError as exc:
            # Said in full (URLs, not secrets): the commonest set-up error is a client that
            # signs for "localhost" while the service is configured as 127.0.0.1.
            received = unverified.get("aud")
            raise ClientAuthError(
                f"JWT from {iss!r} is for audience {str(received)[:300]!r}, "
                f"but this endpoint is {audience!r}"
            ) from exc
        except PyJWTError as exc:
            raise ClientAuthError(f"JWT from {iss!r} rejected: {exc}") from exc
        except (OverflowError, ValueError, TypeError, RecursionError) as exc:
            # Claims PyJWT lets through but cannot compare (an exp of 400 digits): refused.
            raise ClientAuthError(f"JWT from {iss!r} has unusable claims") from exc
        try:
            exp, iat = float(claims["exp"]), float(claims["iat"])
        except (OverflowError, ValueError, TypeError) as exc:
            raise ClientAuthError(f"JWT from {iss!r} has an unusable exp or iat") from exc
        if not (math.isfinite(exp) and math.isfinite(iat)):
            raise ClientAuthError(f"JWT from {iss!r} has an unusable exp or iat")
        jti = claims.get("jti")
        tenant = claims.get("tenant")
        if not isinstance(jti, str) or not jti:
            raise ClientAuthError(f"JWT from {iss!r} has no usable jti")
        lifetime = exp - iat
        if lifetime > self._settings.jwt_max_lifetime_s:
            raise ClientAuthError(f"JWT from {iss!r} lives {lifetime:.0f} s, longer than allowed")
        if issuer.tenants is not None and tenant not in issuer.tenants:
            raise ClientAuthError(f"tenant {tenant!r} is not allowed for issuer {iss!r}")
        # Best practices: "jti is not in a short-term store" of the max JWT lifetime.
        if not self._store.remember_jti(iss, jti, exp + self._leeway()):
            raise ClientAuthError(f"replayed jti {jti!r} from {iss!r}")
        return ClientIdentity(iss=iss, tenant=tenant if isinstance(tenant, str) else None, jti=jti)

    def _leeway(self) -> float:
        return float(self._settings.jwt_leeway_s)

    def _find_key(
        self, issuer: IssuerConfig, header: Mapping[str, Any], kid: str
    ) -> dict[str, Any] | None:
        jku = header.get("jku")
        if jku is not None and jku not in issuer.jku:
            # 2.0: services SHOULD allowlist jku; an unlisted one is refused before any fetch.
            raise ClientAuthError(f"jku {jku!r} is not allowlisted for issuer {issuer.iss!r}")
        static = self._static.get(issuer.iss)
        if static is not None:
            found = static.get(kid)
            if found is not None or jku is None:
                return found
        if jku is not None:
            return self._jku_source(jku).get(kid)
        if not issuer.jku:
            return None
        # No jku in the token: fall back to the issuer's allowlisted key-set URLs.
        for url in issuer.jku:
            found = self._jku_source(url).get(kid)
            if found is not None:
                return found
        return None


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise ClientAuthError("no Authorization header")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ClientAuthError("Authorization is not a Bearer token")
    return token.strip()
