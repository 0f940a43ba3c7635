"""Access tokens for FHIR calls: a fixed bearer token, or SMART Backend Services."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, Protocol

import requests

from cds.errors import (
    FhirAuthError,
    FhirTemporaryError,
    InputError,
)
from cds.fhir.trust import check_transport

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    _PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

# jwt and cryptography are imported where a key is loaded or an assertion signed: loading
# cryptography's bindings costs ~0.1 s warm and over a second cold, and most commands (and
# every NDJSON sweep) never sign anything.

log = logging.getLogger(__name__)

#: RFC 7523 section 2.2: the client_assertion_type for a JWT client assertion
JWT_BEARER_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

Algorithm = Literal["RS384", "ES384"]


class TokenSource(Protocol):
    """Supplies the bearer token for each request; the client asks again before every attempt."""

    def token(self, session: requests.Session) -> str:
        """The access token to send now (may call the token endpoint through ``session``)."""
        ...

    def invalidate(self) -> bool:
        """Forget the cached token after a 401; True if a fresh one can be obtained."""
        ...


class BearerToken:
    """A fixed access token, e.g. a CDS Hooks request's ``fhirAuthorization.access_token``."""

    __slots__ = ("_token",)

    def __init__(self, token: str) -> None:
        if not token or any(c in token for c in "\r\n "):
            raise ValueError("bearer token is empty or contains whitespace")
        self._token = token

    def token(self, session: requests.Session) -> str:
        return self._token

    def invalidate(self) -> bool:
        # A token handed to us by the EHR cannot be renewed by us.
        return False

    def __repr__(self) -> str:
        return "BearerToken(<redacted>)"


class SmartBackendAuth:
    """SMART Backend Services client-credentials grant with a signed JWT assertion.

    HL7 SMART App Launch 2.x, "Backend Services": the client POSTs
    ``grant_type=client_credentials`` with a ``client_assertion`` JWT signed with its private key
    (RS384 or ES384), ``iss`` = ``sub`` = client_id, ``aud`` = the token URL, ``exp`` no more than
    five minutes ahead and a unique ``jti``. The token is cached and renewed ``refresh_margin``
    seconds before ``expires_in`` runs out, so requests never go out with a token about to expire.
    """

    def __init__(
        self,
        *,
        token_url: str,
        client_id: str,
        private_key: str | bytes,
        key_id: str,
        algorithm: Algorithm = "RS384",
        scope: str = "system/*.rs",
        jku: str | None = None,
        allow_insecure_loopback: bool = False,
        refresh_margin: float = 60.0,
        timeout: tuple[float, float] = (5.0, 30.0),
        clock: Callable[[], float] = time.time,
    ) -> None:
        """
        :param token_url: the server's token endpoint (``token_endpoint`` in its
            ``.well-known/smart-configuration``); https, or http to loopback when allowed
        :param client_id: the client id registered with the server
        :param private_key: PEM private key matching the registered JWKS (RSA >= 2048 bits for
            RS384, P-384 for ES384)
        :param key_id: the ``kid`` of that key in the registered JWKS
        :param scope: the system scopes to ask for (SMART v2 ``.rs`` = read + search)
        :param jku: the JWKS URL to name in the JWT header, if the server fetches keys from it
        :param refresh_margin: renew this many seconds before the token expires
        :param clock: seconds since the epoch (injectable for tests)
        """
        if algorithm not in ("RS384", "ES384"):
            raise ValueError("SMART Backend Services allows RS384 or ES384 only")
        check_transport(token_url, allow_insecure_loopback=allow_insecure_loopback)
        self._token_url = token_url
        self._client_id = client_id
        self._key = _load_private_key(private_key, algorithm)
        self._key_id = key_id
        self._algorithm = algorithm
        self._scope = scope
        self._jku = jku
        self._refresh_margin = refresh_margin
        self._timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._access_token: str | None = None
        self._expires_at = 0.0

    def __repr__(self) -> str:
        return (
            f"SmartBackendAuth(token_url={self._token_url!r}, client_id={self._client_id!r}, "
            f"key_id={self._key_id!r}, algorithm={self._algorithm!r})"
        )

    def token(self, session: requests.Session) -> str:
        # One thread renews while the others wait, instead of all of them asking at once.
        with self._lock:
            now = self._clock()
            if self._access_token is None or now >= self._expires_at - self._refresh_margin:
                self._access_token, lifetime = self._request_token(session, now)
                self._expires_at = now + lifetime
            return self._access_token

    def invalidate(self) -> bool:
        with self._lock:
            self._access_token = None
        return True

    def assertion(self, now: float) -> str:
        """The signed client assertion JWT (never logged)."""
        claims = {
            "iss": self._client_id,
            "sub": self._client_id,
            "aud": self._token_url,
            "exp": int(now) + 300,  # SMART: "no more than five minutes in the future"
            "jti": uuid.uuid4().hex,
        }
        headers: dict[str, Any] = {"kid": self._key_id, "typ": "JWT"}
        if self._jku:
            headers["jku"] = self._jku
        import jwt

        try:
            return jwt.encode(claims, self._key, algorithm=self._algorithm, headers=headers)
        except jwt.PyJWTError as exc:
            raise FhirAuthError(f"cannot sign the client assertion: {type(exc).__name__}") from exc

    def _request_token(self, session: requests.Session, now: float) -> tuple[str, float]:
        form = {
            "grant_type": "client_credentials",
            "scope": self._scope,
            "client_assertion_type": JWT_BEARER_ASSERTION,
            "client_assertion": self.assertion(now),
        }
        url = self._token_url
        try:
            response = session.post(
                url,
                data=form,
                headers={"Accept": "application/json"},
                timeout=self._timeout,
                allow_redirects=False,
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise FhirTemporaryError(
                f"token request to {url} failed: {type(exc).__name__}", url=url
            ) from exc
        except requests.RequestException as exc:
            raise FhirAuthError(
                f"token request to {url} failed: {type(exc).__name__}", url=url
            ) from exc
        status = response.status_code
        try:
            body = json.loads(response.content) if response.content else {}
        except ValueError:
            body = None
        if status == 429 or status >= 500:
            raise FhirTemporaryError(
                f"token endpoint {url} answered HTTP {status}", url=url, status=status
            )
        if not isinstance(body, dict):
            raise FhirAuthError(
                f"token endpoint {url} answered HTTP {status} without JSON", url=url, status=status
            )
        if status != 200:
            # RFC 6749 section 5.2 error response: error + error_description.
            reason = body.get("error_description") or body.get("error") or "no reason given"
            raise FhirAuthError(
                f"token endpoint {url} refused the client credentials (HTTP {status}): {reason}",
                url=url,
                status=status,
            )
        token = body.get("access_token")
        if not isinstance(token, str) or not token:
            raise FhirAuthError(
                f"token endpoint {url} answered without an access_token", url=url, status=status
            )
        expires_in = body.get("expires_in")
        # SMART requires expires_in; if a server leaves it out, assume a short life and renew often.
        lifetime = float(expires_in) if isinstance(expires_in, int | float) else 300.0
        log.info(
            "obtained a SMART backend access token for client %s (expires in %.0f s)",
            self._client_id,
            lifetime,
        )
        return token, lifetime


def _load_private_key(pem: str | bytes, algorithm: Algorithm) -> _PrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    source = "SMART private key"
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise InputError("not a PEM private key without a password", source=source) from exc
    if algorithm == "RS384":
        if not isinstance(key, rsa.RSAPrivateKey) or key.key_size < 2048:
            raise InputError("RS384 needs an RSA key of at least 2048 bits", source=source)
        return key
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp384r1":
        raise InputError("ES384 needs an EC key on curve P-384", source=source)
    return key


__all__ = [
    "Algorithm",
    "BearerToken",
    "JWT_BEARER_ASSERTION",
    "SmartBackendAuth",
    "TokenSource",
]
