"""FHIR R4 REST client on requests: trust check, auth, retries with backoff, paging, errors."""

from __future__ import annotations

import email.utils
import json
import logging
import queue
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote, urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter

import cds
from cds.errors import (
    FhirAuthError,
    FhirBadResponse,
    FhirError,
    FhirFatalError,
    FhirNotFound,
    FhirRejected,
    FhirSearchFailed,
    FhirTemporaryError,
    InputError,
)
from cds.fhir import deadline as _deadline
from cds.fhir.auth import BearerToken, TokenSource
from cds.fhir.outcome import SearchPage, outcome_message, read_searchset
from cds.fhir.trust import TrustPolicy, check_within_base

#: FHIR R4 id datatype: ``[A-Za-z0-9\-\.]{1,64}``
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def is_resource_id(value: str) -> bool:
    """A FHIR R4 id that is safe in a URL path: "." and ".." match the datatype, but as path
    segments they are resolved away (RFC 3986 5.2.4: "Patient/.." is the base)."""
    return bool(_FHIR_ID.fullmatch(value)) and value not in (".", "..")


log = logging.getLogger(__name__)

JSONDict = dict[str, Any]

FHIR_JSON = "application/fhir+json"

#: Statuses worth retrying: RFC 9110 section 15.6 (502/503/504 are gateway or overload
#: conditions) and RFC 6585 section 4 (429 Too Many Requests). Other 4xx will fail again.
RETRY_STATUSES = frozenset({429, 502, 503, 504})

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 5


@dataclass(frozen=True)
class Timeouts:
    """Per-request timeouts in seconds: requests' (connect, read) pair, which bound one
    connect and each socket read, and ``total``, which bounds one whole request and answer
    (a server trickling bytes passes every read timeout and still meets this one)."""

    connect: float = 5.0
    read: float = 30.0
    total: float = 60.0


@dataclass(frozen=True)
class RetryPolicy:
    """How temporary failures are retried.

    The delay before retry n (1-based) is ``min(cap, base * 2**(n-1))`` with "equal jitter"
    (half fixed, half random), so many clients that failed together do not come back together.
    A ``Retry-After`` header (RFC 9110 section 10.2.3) replaces that delay, capped at
    ``retry_after_cap`` so one header cannot stall a CDS Hooks call for minutes.
    """

    attempts: int = 4
    backoff_base: float = 0.5
    backoff_cap: float = 8.0
    retry_after_cap: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff_base < 0 or self.backoff_cap < 0:
            raise ValueError("RetryPolicy needs attempts >= 1 and non-negative delays")

    def backoff(self, retry: int, rng: random.Random) -> float:
        ceiling = min(self.backoff_cap, self.backoff_base * 2 ** (retry - 1))
        return float(ceiling / 2 + rng.uniform(0, ceiling / 2))


@dataclass(frozen=True)
class SearchResult:
    """All pages of one search: data resources, and the OperationOutcomes the server sent along."""

    resources: list[JSONDict]
    #: entries with search.mode == "outcome" or resourceType OperationOutcome: not data
    outcomes: list[JSONDict] = field(default_factory=list)
    #: one line per outcome issue, for reports
    warnings: list[str] = field(default_factory=list)
    pages: int = 0


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After value: delay-seconds or an HTTP-date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 HTTP-dates are always GMT
        when = when.replace(tzinfo=UTC)
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def encode_query(params: str | Sequence[tuple[str, str]] | Mapping[str, str]) -> str:
    """A search query string; ``|`` and ``,`` stay readable (requests percent-encodes ``|``)."""
    if isinstance(params, str):
        return params
    pairs = params.items() if isinstance(params, Mapping) else params
    return "&".join(f"{quote(k, safe=':')}={quote(v, safe=':/|,$')}" for k, v in pairs)


class FhirClient:
    """A FHIR R4 REST client for one trusted server; a context manager; safe to share by threads.

    Requests never leave for a URL outside the trusted base: the base is checked against the
    allowlist at construction, and every request URL (paging links and redirects included)
    is checked against the base before it is sent.

    Threads: ``requests.Session`` is not documented as thread-safe, so no Session is ever used
    by two threads at once. Each request checks an idle Session out of a small pool (creating
    one when none is idle) and returns it afterwards, so N concurrent requests use N Sessions,
    each keeping its own keep-alive connection, reused by later requests.
    """

    def __init__(
        self,
        *,
        base_url: str,
        trusted_base_urls: Iterable[str],
        allow_insecure_loopback: bool = False,
        access_token: str | None = None,
        auth: TokenSource | None = None,
        timeouts: Timeouts = Timeouts(),  # noqa: B008 - frozen value object
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen value object
        max_pages: int = 100,
        deadline: float | None = None,
        verify: bool | str = True,
        trust_env: bool = False,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        session_factory: Callable[[], requests.Session] = requests.Session,
    ) -> None:
        """
        :param base_url: the FHIR base, e.g. ``https://ehr.example.org/fhir/R4``
        :param trusted_base_urls: the allowlist; ``base_url`` must be on it (trailing slash and
            scheme/host case ignored), else UntrustedFhirServer before any I/O
        :param allow_insecure_loopback: allow plain http to 127.0.0.0/8, ::1 and localhost
            (development and tests only); https is required everywhere else
        :param access_token: a bearer token, e.g. CDS Hooks ``fhirAuthorization.access_token``
        :param auth: a token source instead, e.g. :class:`cds.fhir.auth.SmartBackendAuth`
        :param max_pages: a search that has more pages than this fails instead of looping on
        :param deadline: a ``time.monotonic()`` past which no request of this client runs or
            waits (a CDS Hooks call's time budget); see also :meth:`deadline_in`
        :param verify: TLS verification: True, or the path of a CA bundle
        :param trust_env: let requests read proxies, .netrc and CA settings from the environment
            (off by default: a .netrc must not attach credentials behind our back)
        :param sleep: how to wait between retries (tests pass a recorder)
        """
        if access_token is not None and auth is not None:
            raise ValueError("give access_token or auth, not both")
        if max_pages < 1:
            raise ValueError("max_pages must be at least 1")
        self._trust = TrustPolicy(
            trusted_base_urls, allow_insecure_loopback=allow_insecure_loopback
        )
        self._base = self._trust.check_base(base_url)
        self._auth: TokenSource | None = (
            BearerToken(access_token) if access_token is not None else auth
        )
        self._timeouts = timeouts
        self._retry = retry
        self._max_pages = max_pages
        self._deadline = deadline
        self._local = threading.local()
        self._watches: set[_deadline.Watch] = set()
        self._interrupts = 0
        self._verify = verify
        self._trust_env = trust_env
        self._sleep = sleep
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._session_factory = session_factory
        self._idle: queue.LifoQueue[requests.Session] = queue.LifoQueue()
        self._all_sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        self._closed = False
        self._user_agent = f"cds-trial-screening/{cds.__version__} (+requests)"

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return self._base

    def is_closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        auth = "none" if self._auth is None else type(self._auth).__name__
        return f"FhirClient(base_url={self._base!r}, auth={auth})"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close every pooled Session (and their connections) and cut the requests still in
        flight in other threads (they end at once with FhirTemporaryError). The client
        cannot be reused."""
        with self._lock:
            self._closed = True
            sessions, self._all_sessions = self._all_sessions, []
            watches = list(self._watches)
        for watch in watches:
            watch.cut()
        for session in sessions:
            session.close()

    @contextmanager
    def interrupted(self) -> Iterator[None]:
        """Inside the block, requests in flight are cut and new ones fail at once
        (FhirTemporaryError), so the threads using this client wind down now (Ctrl-C in a
        sweep); afterwards the client works again (a resumed sweep in the same process)."""
        with self._lock:
            self._interrupts += 1
            watches = list(self._watches)
        for watch in watches:
            watch.cut()
        try:
            yield
        finally:
            with self._lock:
                self._interrupts -= 1

    @contextmanager
    def deadline_in(self, seconds: float) -> Iterator[None]:
        """Requests made by this thread inside the block end within ``seconds`` from now,
        retries and waits included (a sweep's per-patient budget)."""
        previous: float | None = getattr(self._local, "deadline", None)
        until = time.monotonic() + seconds
        self._local.deadline = until if previous is None else min(previous, until)
        try:
            yield
        finally:
            self._local.deadline = previous

    def _overall_deadline(self) -> float | None:
        mine: float | None = getattr(self._local, "deadline", None)
        if mine is None:
            return self._deadline
        return mine if self._deadline is None else min(mine, self._deadline)

    @contextmanager
    def _session(self) -> Iterator[requests.Session]:
        if self.is_closed():
            raise RuntimeError("FhirClient is closed")
        try:
            session = self._idle.get_nowait()
        except queue.Empty:
            session = self._new_session()
        try:
            yield session
        finally:
            if self.is_closed():  # closed by another thread meanwhile
                session.close()
            else:
                self._idle.put(session)

    def _new_session(self) -> requests.Session:
        session = self._session_factory()
        session.trust_env = self._trust_env
        session.verify = self._verify
        # Our own loop does the retrying (with Retry-After and jitter); urllib3's must not.
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=0)
        _deadline.mount(session, adapter)
        session.headers["User-Agent"] = self._user_agent
        with self._lock:
            if self._closed:
                session.close()
                raise RuntimeError("FhirClient is closed")
            self._all_sessions.append(session)
        return session

    # -- FHIR interactions -----------------------------------------------------------------

    def url(self, relative: str) -> str:
        """``[base]/relative``."""
        return f"{self._base}/{relative.lstrip('/')}"

    def capabilities(self) -> JSONDict:
        """``GET [base]/metadata``: the CapabilityStatement."""
        return self._expect("CapabilityStatement", self.get("metadata"))

    def read(self, resource_type: str, resource_id: str) -> JSONDict:
        """``GET [base]/Type/id``; FhirNotFound for 404/410."""
        if not is_resource_id(resource_id):
            raise InputError("not a FHIR resource id", source=f"{resource_type} id {resource_id!r}")
        path = f"{resource_type}/{quote(resource_id, safe='')}"
        return self._expect(resource_type, self.get(path))

    def get(self, relative_or_absolute: str) -> JSONDict:
        """GET a URL relative to the base (or an absolute one inside it) and parse its JSON."""
        return self._request("GET", urljoin(self._base + "/", relative_or_absolute))

    def transaction(self, bundle: Mapping[str, Any]) -> JSONDict:
        """POST a transaction (or batch) Bundle to the base; returns the response Bundle.

        Retried like a GET only when every entry is idempotent (PUT, GET, HEAD, DELETE: RFC 9110
        section 9.2.2); otherwise only a 429 (the request was not processed) is retried.
        """
        entries = bundle.get("entry") or []
        safe_methods = {"PUT", "GET", "HEAD", "DELETE"}
        idempotent = all(
            str((e.get("request") or {}).get("method", "")).upper() in safe_methods for e in entries
        )
        response = self._request("POST", self._base, body=bundle, idempotent=idempotent)
        return self._expect("Bundle", response)

    def search(
        self,
        resource_type: str,
        params: str | Sequence[tuple[str, str]] | Mapping[str, str] = (),
        *,
        max_pages: int | None = None,
    ) -> SearchResult:
        """``GET [base]/Type?params`` and every ``next`` page after it.

        FHIR R4 3.1.1.5.5 (paging): the server's ``Bundle.link`` with relation ``next`` is
        followed exactly as given (HAPI's absolute ``[base]?_getpages=...`` links included; they
        are opaque and must not be rebuilt from ``_offset``), until there is none. Bundle.total
        is never consulted: HAPI omits it unless ``_total=accurate`` is asked for. Entries that
        are OperationOutcomes (``search.mode = outcome``, 3.1.1.5.4) are warnings, not data.
        """
        query = encode_query(params)
        url = self.url(f"{resource_type}?{query}" if query else resource_type)
        resources: list[JSONDict] = []
        outcomes: list[JSONDict] = []
        warnings: list[str] = []
        pages = 0
        for page in self.iter_pages(url, what=f"search {resource_type}", max_pages=max_pages):
            pages += 1
            resources += page.resources
            outcomes += page.outcomes
            warnings += page.warnings
        log.debug("search %s: %d resources in %d pages", resource_type, len(resources), pages)
        return SearchResult(resources=resources, outcomes=outcomes, warnings=warnings, pages=pages)

    def iter_pages(
        self, url: str, *, what: str = "search", max_pages: int | None = None
    ) -> Iterator[SearchPage]:
        """The one paging loop: ``GET url`` and each ``next`` page after it, one page at a
        time, read by the one OperationOutcome policy (:func:`cds.fhir.outcome.read_searchset`).

        FHIR R4 3.1.1.5.5 (paging): the server's ``Bundle.link`` with relation ``next`` is
        followed exactly as given (HAPI's absolute ``[base]?_getpages=...`` links included; they
        are opaque and must not be rebuilt from ``_offset``), and checked against the trusted
        base like every URL. Bundle.total is never consulted: HAPI omits it unless
        ``_total=accurate`` is asked for. A page with an error or fatal OperationOutcome raises
        FhirSearchFailed; warnings and information stay warnings. More than ``max_pages``
        pages (default: the client's) or a repeated page is FhirBadResponse.
        """
        cap = max_pages or self._max_pages
        seen: set[str] = set()
        pages = 0
        next_url: str | None = urljoin(self._base + "/", url)
        while next_url is not None:
            if next_url in seen:
                raise FhirBadResponse(
                    f"{what}: the server's next link repeats a page", url=next_url
                )
            if pages >= cap:
                raise FhirBadResponse(
                    f"{what}: more than {cap} pages; refusing to read on "
                    "(raise max_pages, or narrow the search)",
                    url=url,
                )
            seen.add(next_url)
            bundle = self._expect("Bundle", self._request("GET", next_url))
            pages += 1
            page = read_searchset(bundle, f"{what} page {pages}")
            for warning in page.warnings:
                log.warning("%s", warning)
            if page.failed:
                raise FhirSearchFailed(
                    "; ".join(page.errors),
                    url=_loggable(next_url),
                    outcome=page.outcomes[0] if page.outcomes else None,
                )
            yield page
            next_url = _next_link(bundle, self._base)

    # -- the one place HTTP happens ----------------------------------------------------------

    def _expect(self, resource_type: str, body: JSONDict) -> JSONDict:
        if body.get("resourceType") != resource_type:
            raise FhirBadResponse(
                f"expected a {resource_type}, the server sent a {body.get('resourceType')!r}"
            )
        return body

    def send(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        expect: Sequence[int] = (200,),
        stream: bool = False,
        token: bool = True,
    ) -> requests.Response:
        """A request whose answer is not a FHIR JSON resource (Bulk Data kick-off, status
        polling, NDJSON files), with the same trust check, retries and error translation as
        every other call. A status in ``expect`` is returned as is; the caller closes a
        streamed response. ``token=False`` sends no Authorization header (Bulk Data file
        servers may not want one: the manifest's ``requiresAccessToken``)."""
        return self._exchange(
            method, url, headers=headers, expect=expect, stream=stream, token=token
        )

    def _request(
        self,
        method: str,
        url: str,
        *,
        body: Mapping[str, Any] | None = None,
        idempotent: bool = True,
    ) -> JSONDict:
        data = json.dumps(body).encode() if body is not None else None
        response = self._exchange(method, url, data=data, idempotent=idempotent)
        return _parse_json(method, url, response)

    def _exchange(
        self,
        method: str,
        url: str,
        *,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        expect: Sequence[int] | None = None,
        stream: bool = False,
        token: bool = True,
        idempotent: bool = True,
    ) -> requests.Response:
        """Send until a usable answer: any 2xx (or a status in ``expect``), following
        redirects inside the trusted base and retrying what may be retried."""
        retry = self._retry
        redirects = 0
        refreshed_auth = False
        attempt = 0
        while True:
            # Checked before every send: the first URL, each redirect and each paging link; the
            # URL sent is the normalised one that was checked (no "/../" walks out afterwards).
            url = check_within_base(url, self._base)
            attempt += 1
            overall = self._overall_deadline()
            if overall is not None and time.monotonic() >= overall:
                raise FhirTemporaryError(
                    f"{method} {_loggable(url)}: out of time before the request was sent",
                    url=url,
                )
            try:
                response = self._send_once(method, url, data, headers, stream, token, overall)
            except _DeadlinePassed as exc:
                why = (
                    "the time allowed for the whole call ran out"
                    if exc.budget
                    else f"no complete answer within {exc.seconds:.1f} s"
                )
                raise FhirTemporaryError(f"{method} {_loggable(url)}: {why}", url=url) from exc
            except FhirTemporaryError as exc:  # the token endpoint was temporarily unavailable
                if attempt >= retry.attempts:
                    raise
                self._wait(method, url, attempt, exc.status, None, str(exc))
                continue
            except (
                requests.ConnectionError,
                requests.Timeout,
                requests.exceptions.ChunkedEncodingError,
            ) as exc:
                if isinstance(exc, requests.exceptions.SSLError):
                    raise FhirFatalError(
                        f"{method} {url}: TLS failed ({_short(exc)})", url=url
                    ) from exc
                # A read timeout or reset after a non-idempotent request was sent may mean it
                # was processed: only a failure to connect is safe to repeat then.
                safe = idempotent or isinstance(exc, requests.ConnectTimeout)
                reason = f"{type(exc).__name__}: {_short(exc)}"
                if not safe or attempt >= retry.attempts:
                    raise FhirTemporaryError(
                        f"{method} {url}: {reason} (after {attempt} attempt(s))", url=url
                    ) from exc
                self._wait(method, url, attempt, None, None, reason)
                continue
            except requests.RequestException as exc:
                # Anything else requests can raise (bad gzip, invalid URL...): not retryable.
                raise FhirBadResponse(
                    f"{method} {url}: {type(exc).__name__}: {_short(exc)}", url=url
                ) from exc

            status = response.status_code
            if expect is not None and status in expect:
                return response
            if status in _REDIRECTS and method == "GET" and "Location" in response.headers:
                response.close()
                redirects += 1
                if redirects > _MAX_REDIRECTS:
                    raise FhirBadResponse(
                        f"{method} {url}: too many redirects", url=url, status=status
                    )
                url = urljoin(url, response.headers["Location"])
                attempt -= 1  # a redirect is not a failed attempt
                continue
            if 200 <= status < 300:
                if expect is None:
                    return response
                response.close()
                raise FhirBadResponse(
                    f"{method} {url}: HTTP {status} where {', '.join(map(str, expect))} was"
                    " expected",
                    url=url,
                    status=status,
                )

            outcome = _try_outcome(response)
            message = _status_message(method, url, response, outcome)
            response.close()
            if status in RETRY_STATUSES:
                # 429 means the request was not processed, so even a POST may be repeated.
                if attempt < retry.attempts and (idempotent or status == 429):
                    delay = parse_retry_after(response.headers.get("Retry-After"))
                    self._wait(method, url, attempt, status, delay, f"HTTP {status}")
                    continue
                raise FhirTemporaryError(
                    f"{message} (after {attempt} attempt(s))",
                    url=url,
                    status=status,
                    outcome=outcome,
                )
            if status == 401 and token and self._auth is not None and not refreshed_auth:
                # The token may have been revoked or expired early: renew once, then give up.
                refreshed_auth = True
                if self._auth.invalidate():
                    attempt -= 1
                    continue
            raise _status_error(status, message, url, outcome)

    def _send_once(
        self,
        method: str,
        url: str,
        data: bytes | None,
        extra_headers: Mapping[str, str] | None = None,
        stream: bool = False,
        token: bool = True,
        overall: float | None = None,
    ) -> requests.Response:
        headers = {"Accept": FHIR_JSON}
        if data is not None:
            headers["Content-Type"] = f"{FHIR_JSON}; charset=utf-8"
        headers.update(extra_headers or {})
        with self._session() as session:
            if self._auth is not None and token:
                headers["Authorization"] = f"Bearer {self._auth.token(session)}"
            started = time.perf_counter()
            now = time.monotonic()
            until = now + self._timeouts.total
            if overall is not None:
                until = min(until, overall)
            # The watch covers the whole answer (headers and, unless streamed, the body): past
            # ``until`` its socket is shut down, whatever the server is trickling.
            with _deadline.watching(until) as watch:
                with self._lock:
                    if self._closed:
                        raise RuntimeError("FhirClient is closed")
                    if self._interrupts:
                        raise FhirTemporaryError(f"{method} {_loggable(url)}: interrupted")
                    self._watches.add(watch)
                try:
                    response = self._watched_request(
                        session,
                        watch,
                        method,
                        url,
                        data,
                        headers,
                        stream,
                        until - now,
                        overall is not None and overall < now + self._timeouts.total,
                    )
                finally:
                    with self._lock:
                        self._watches.discard(watch)
        log.debug(
            "%s %s -> %d in %.1f ms",
            method,
            _loggable(url),
            response.status_code,
            (time.perf_counter() - started) * 1000,
        )
        return response

    def _watched_request(
        self,
        session: requests.Session,
        watch: _deadline.Watch,
        method: str,
        url: str,
        data: bytes | None,
        headers: Mapping[str, str],
        stream: bool,
        seconds: float,
        budget: bool,
    ) -> requests.Response:
        try:
            response = session.request(
                method,
                url,
                data=data,
                headers=headers,
                stream=stream,
                timeout=(
                    min(self._timeouts.connect, max(seconds, 0.01)),
                    min(self._timeouts.read, max(seconds, 0.01)),
                ),
                allow_redirects=False,  # followed in _exchange, inside the trusted base
            )
        except requests.RequestException as exc:
            if watch.expired:
                raise _DeadlinePassed(seconds, budget) from exc
            raise
        if watch.expired:
            # Cut mid-answer, http.client may still hand back what it had (headers without
            # their end, a short body): never a usable answer.
            response.close()
            raise _DeadlinePassed(seconds, budget)
        return response

    def _wait(
        self,
        method: str,
        url: str,
        attempt: int,
        status: int | None,
        retry_after: float | None,
        reason: str,
    ) -> None:
        retry = self._retry
        if retry_after is not None:
            delay = min(retry_after, retry.retry_after_cap)
        else:
            delay = retry.backoff(attempt, self._rng)
        overall = self._overall_deadline()
        if overall is not None and time.monotonic() + delay >= overall:
            raise FhirTemporaryError(
                f"{method} {_loggable(url)}: {reason}; no time left to retry", url=url
            )
        log.warning(
            "%s %s: %s; retry %d/%d in %.2f s",
            method,
            _loggable(url),
            reason,
            attempt,
            retry.attempts - 1,
            delay,
        )
        self._sleep(delay)


class _DeadlinePassed(Exception):
    def __init__(self, seconds: float, budget: bool) -> None:
        self.seconds = seconds
        #: the call's overall deadline (not the per-request total) was what ran out
        self.budget = budget


def _next_link(bundle: Mapping[str, Any], base: str) -> str | None:
    for link in bundle.get("link") or []:
        if isinstance(link, dict) and link.get("relation") == "next" and link.get("url"):
            # Absolute links are used as given. A relative one is taken as relative to the
            # server base, as FHIR R4 relative URLs are (2.36.4.1 / 3.1.0.1.1 "Service Base URL").
            return urljoin(base + "/", str(link["url"]))
    return None


def _parse_json(method: str, url: str, response: requests.Response) -> JSONDict:
    content_type = response.headers.get("Content-Type", "")
    try:
        body = json.loads(response.content)
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise FhirBadResponse(
            f"{method} {url}: HTTP {response.status_code} body is not JSON "
            f"(Content-Type {content_type or 'missing'}, {len(response.content)} bytes)",
            url=url,
            status=response.status_code,
        ) from exc
    if not isinstance(body, dict) or not isinstance(body.get("resourceType"), str):
        raise FhirBadResponse(
            f"{method} {url}: HTTP {response.status_code} body is JSON but not a FHIR resource",
            url=url,
            status=response.status_code,
        )
    return body


def _try_outcome(response: requests.Response) -> JSONDict | None:
    try:
        body = json.loads(response.content)
    except ValueError:
        return None
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        return body
    return None


def _status_message(
    method: str, url: str, response: requests.Response, outcome: JSONDict | None
) -> str:
    text = outcome_message(outcome)
    reason = response.reason or ""
    message = f"{method} {url}: HTTP {response.status_code} {reason}".rstrip()
    if text:
        return f"{message}: {text}"
    if outcome is None and response.content:
        content_type = response.headers.get("Content-Type", "missing")
        return f"{message} (not a FHIR OperationOutcome: Content-Type {content_type})"
    return message


def _status_error(status: int, message: str, url: str, outcome: JSONDict | None) -> FhirError:
    cls: type[FhirError]
    if status in (401, 403):
        cls = FhirAuthError
    elif status in (404, 410):
        cls = FhirNotFound
    elif 400 <= status < 500:
        cls = FhirRejected
    elif outcome is None:
        cls = FhirBadResponse  # a 5xx (or odd 1xx/3xx) that is not even FHIR
    else:
        cls = FhirFatalError
    return cls(message, url=url, status=status, outcome=outcome)


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + "..."


def _loggable(url: str) -> str:
    """The URL without its query: queries can carry identifiers, logs carry only paths."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}" + ("?..." if parts.query else "")


__all__ = [
    "FHIR_JSON",
    "FhirClient",
    "RetryPolicy",
    "SearchResult",
    "Timeouts",
    "encode_query",
    "is_resource_id",
    "outcome_message",
    "parse_retry_after",
]
