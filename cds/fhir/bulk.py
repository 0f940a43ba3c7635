"""Population-scale FHIR access: page-by-page search, Bulk Data $export, a request-rate cap."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import requests

from cds.errors import (
    FhirBadResponse,
    FhirError,
    FhirTemporaryError,
)
from cds.fhir.client import (
    FHIR_JSON,
    FhirClient,
    encode_query,
    parse_retry_after,
)

log = logging.getLogger(__name__)

JSONDict = dict[str, Any]

NDJSON = "application/fhir+ndjson"
BULK_DATA_IG = "http://hl7.org/fhir/uv/bulkdata/"


# -- paging ---------------------------------------------------------------------------------


def iter_search_pages(
    client: FhirClient,
    resource_type: str,
    params: str | Sequence[tuple[str, str]] | Mapping[str, str] = (),
) -> Iterator[list[JSONDict]]:
    """``GET [base]/Type?params`` and each ``next`` page, one page's data resources at a time.

    Unlike :meth:`FhirClient.search`, which gathers every page, this holds one page in memory,
    so a registry's whole Patient list can be walked. The paging, its page cap and its
    OperationOutcome policy are the client's one loop (:meth:`FhirClient.iter_pages`).
    """
    query = encode_query(params)
    url = client.url(f"{resource_type}?{query}" if query else resource_type)
    for page in client.iter_pages(url, what=f"search {resource_type}"):
        yield [r for r in page.resources if r.get("resourceType") == resource_type]


def group_member_ids(client: FhirClient, group_id: str) -> list[str]:
    """The Patient ids a Group's ``member.entity`` references name, in order."""
    group = client.read("Group", group_id)
    ids: list[str] = []
    for member in group.get("member") or []:
        ref = (member.get("entity") or {}).get("reference") if isinstance(member, dict) else None
        if isinstance(ref, str) and "Patient/" in ref:
            ids.append(ref.split("/_history/", 1)[0].rstrip("/").rsplit("/", 1)[-1])
    return list(dict.fromkeys(ids))


# -- request rate -----------------------------------------------------------------------------


class RateLimiter:
    """At most ``rate`` acquisitions per second across threads (evenly spaced, no bursts)."""

    def __init__(
        self,
        rate: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self._interval = 1.0 / rate
        self._clock = clock
        self._sleep = sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            now = self._clock()
            slot = max(now, self._next)
            self._next = slot + self._interval
        if slot > now:
            self._sleep(slot - now)


class _RateLimitedSession(requests.Session):
    def __init__(self, limiter: RateLimiter) -> None:
        super().__init__()
        self._limiter = limiter

    def request(
        self,
        method: str | bytes,
        url: str | bytes,
        *args: Any,
        **kwargs: Any,
    ) -> requests.Response:
        self._limiter.acquire()
        return super().request(method, url, *args, **kwargs)


def rate_limited_sessions(max_rps: float | None) -> Callable[[], requests.Session]:
    """A ``session_factory`` for :class:`FhirClient` whose Sessions share one request-rate cap
    (every HTTP request, retries and paging included, waits for its slot)."""
    if max_rps is None:
        return requests.Session
    limiter = RateLimiter(max_rps)
    return lambda: _RateLimitedSession(limiter)


# -- Bulk Data $export --------------------------------------------------------------------------


def export_supported(capability: Mapping[str, Any], *, group: bool = False) -> bool:
    """Whether a CapabilityStatement offers ``$export`` (system level, or Group level when
    ``group``): an ``export`` operation, or the Bulk Data IG's CapabilityStatement instantiated."""
    instantiates = capability.get("instantiates") or []
    if any(isinstance(u, str) and u.startswith(BULK_DATA_IG) for u in instantiates):
        return True
    for rest in capability.get("rest") or []:
        if not isinstance(rest, dict):
            continue
        if group:
            for resource in rest.get("resource") or []:
                if (
                    isinstance(resource, dict)
                    and resource.get("type") == "Group"
                    and _has_export(resource.get("operation"))
                ):
                    return True
        elif _has_export(rest.get("operation")):
            return True
    return False


def _has_export(operations: Any) -> bool:
    for op in operations or []:
        if not isinstance(op, dict):
            continue
        name = str(op.get("name", "")).lstrip("$")
        definition = str(op.get("definition", ""))
        if name == "export" or definition.endswith("/export"):
            return True
    return False


@dataclass
class ExportFile:
    type: str
    path: Path
    bytes: int


@dataclass
class ExportResult:
    files: list[ExportFile] = field(default_factory=list)
    #: messages from the manifest's ``error`` OperationOutcome files
    errors: list[str] = field(default_factory=list)
    transaction_time: str | None = None
    polls: int = 0


class BulkExporter:
    """FHIR Bulk Data Access 2.0 ``$export`` client: kick-off with ``Prefer: respond-async``,
    status polling honouring ``Retry-After``, NDJSON download.

    It speaks through a :class:`FhirClient` (``FhirClient.send``), so the trust check (every
    status and file URL must lie inside the trusted base), retries, SMART Backend Services
    auth and error translation are the client's. Used from one thread, the client's pooled
    session keeps polling on one keep-alive connection, which matters to servers (such as a
    multi-process sekmet) that keep job state per process.
    """

    def __init__(
        self,
        client: FhirClient,
        *,
        poll_timeout: float = 3600.0,
        max_poll_interval: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._client = client
        self._base = client.base_url
        self._poll_timeout = poll_timeout
        self._max_poll_interval = max_poll_interval
        self._sleep = sleep

    @property
    def client(self) -> FhirClient:
        """The client the export speaks through (trusted base, auth, retries)."""
        return self._client

    def export(
        self,
        out_dir: Path,
        *,
        types: Sequence[str],
        group: str | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> ExportResult:
        """Run one export to completion and download its files into ``out_dir``."""
        kickoff = f"Group/{group}/$export" if group else "$export"
        url = f"{self._base}/{kickoff}?" + encode_query(
            [("_type", ",".join(types)), ("_outputFormat", NDJSON)]
        )
        response = self._client.send(
            "GET", url, headers={"Accept": FHIR_JSON, "Prefer": "respond-async"}, expect=(202,)
        )
        status_url = response.headers.get("Content-Location")
        if not status_url:
            raise FhirBadResponse("$export kick-off: 202 without Content-Location", url=url)
        status_url = urljoin(url, status_url)
        result = ExportResult()
        manifest = self._poll(status_url, result, progress)
        result.transaction_time = manifest.get("transactionTime")
        needs_token = bool(manifest.get("requiresAccessToken"))
        out_dir.mkdir(parents=True, exist_ok=True)
        for n, item in enumerate(manifest.get("output") or []):
            if not isinstance(item, dict) or not isinstance(item.get("url"), str):
                raise FhirBadResponse("$export manifest: an output without url", url=status_url)
            rtype = str(item.get("type") or "Unknown")
            path = out_dir / f"{rtype}.{n:03d}.ndjson"
            size = self._download(urljoin(status_url, item["url"]), path, needs_token)
            result.files.append(ExportFile(rtype, path, size))
            if progress is not None:
                progress(f"downloaded {rtype} ({size / 1e6:.1f} MB)")
        for item in manifest.get("error") or []:
            if isinstance(item, dict) and isinstance(item.get("url"), str):
                path = out_dir / f"errors.{len(result.errors):03d}.json"
                self._download(urljoin(status_url, item["url"]), path, needs_token)
                result.errors.append(path.read_text(encoding="utf-8", errors="replace")[:500])
        # The server may now delete the files (Bulk Data: DELETE on the status URL).
        try:
            self._client.send("DELETE", status_url, expect=(200, 202, 204, 404))
        except FhirError as exc:
            log.info("$export clean-up refused: %s", exc)
        return result

    def _poll(
        self, status_url: str, result: ExportResult, progress: Callable[[str], None] | None
    ) -> JSONDict:
        deadline = time.monotonic() + self._poll_timeout
        while True:
            response = self._client.send("GET", status_url, expect=(200, 202))
            result.polls += 1
            if response.status_code == 200:
                try:
                    manifest = response.json()
                except ValueError as exc:
                    raise FhirBadResponse(
                        "$export status: the manifest is not JSON", url=status_url
                    ) from exc
                if not isinstance(manifest, dict):
                    raise FhirBadResponse(
                        "$export status: the manifest is not an object", url=status_url
                    )
                return manifest
            if time.monotonic() > deadline:
                raise FhirTemporaryError(
                    f"$export not complete after {self._poll_timeout:.0f} s "
                    f"(X-Progress: {response.headers.get('X-Progress', '-')})",
                    url=status_url,
                )
            if progress is not None:
                progress(f"export in progress: {response.headers.get('X-Progress', '...')}")
            delay = parse_retry_after(response.headers.get("Retry-After"))
            # Bulk Data: clients SHOULD follow Retry-After; with none, poll gently.
            self._sleep(min(delay if delay is not None else 2.0, self._max_poll_interval))

    def _download(self, url: str, path: Path, needs_token: bool) -> int:
        response = self._client.send(
            "GET", url, headers={"Accept": NDJSON}, expect=(200,), stream=True, token=needs_token
        )
        size = 0
        tmp = path.with_name(path.name + ".part")
        try:
            with open(tmp, "wb") as f:
                for chunk in response.iter_content(1 << 20):
                    f.write(chunk)
                    size += len(chunk)
        except (
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
        ) as exc:
            raise FhirTemporaryError(
                f"download of {url} broke off: {type(exc).__name__}", url=url
            ) from exc
        finally:
            response.close()
        tmp.replace(path)
        return size


__all__ = [
    "BulkExporter",
    "ExportFile",
    "ExportResult",
    "RateLimiter",
    "export_supported",
    "group_member_ids",
    "iter_search_pages",
    "rate_limited_sessions",
]
