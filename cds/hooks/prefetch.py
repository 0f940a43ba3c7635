"""Prefetch as CDS Hooks 2.0 says: absent keys fetched, null kept, OO and next links handled."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from cds.config import Settings
from cds.criteria.reads import MEDICATION_TYPES
from cds.errors import (
    FhirAuthError,
    FhirBadResponse,
    FhirError,
    FhirNotFound,
    FhirSearchFailed,
    FhirTemporaryError,
    HookRequestError,
    InputError,
    PrefetchUnavailable,
    UntrustedFhirServer,
)
from cds.fhir.client import FhirClient, RetryPolicy, Timeouts
from cds.fhir.outcome import outcome_failed, read_searchset
from cds.fhir.queries import (
    CodeSource,
    PatientQuery,
    fetch_patient_resources,
    referenced_reads,
)

__all__ = ["PrefetchResult", "gather"]

log = logging.getLogger("cds.hooks.prefetch")

JSONDict = dict[str, Any]

#: page size asked for when we run a search ourselves
_PAGE_SIZE = 500
#: the client's own deadline trails the call's, so a query cut at the budget reads as
#: "not fetched within the time budget" (the wait ends first), not as a server failure
_DEADLINE_SLACK_S = 0.25


@dataclass
class PrefetchResult:
    """What the hook call learned about the patient, and how (for the call log)."""

    resources: list[JSONDict] = field(default_factory=list)
    #: keys satisfied by the client's prefetch
    used: list[str] = field(default_factory=list)
    #: keys (or their missing pages) fetched from fhirServer by us
    fetched: list[str] = field(default_factory=list)
    #: keys the client says hold no data (null, or an empty Bundle)
    empty: list[str] = field(default_factory=list)
    #: keys whose data we do not have in full: the criteria they feed become unknown
    incomplete: list[str] = field(default_factory=list)
    fhir_calls: int = 0
    timed_out: bool = False
    #: longest single FHIR query we ran, seconds (bench: p95 vs the slowest query)
    slowest_query_s: float = 0.0
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Plan:
    query: PatientQuery
    #: "have" (prefetch complete), "fetch" (ask fhirServer), "pages" (follow next links),
    #: "read" (a resource the others reference, ``query.template`` being ``Type/id``)
    action: str
    next_url: str | None = None
    #: OperationOutcome-based refetches may degrade instead of 412 when they cannot run
    optional: bool = False


def check_prefetch(prefetch: Mapping[str, Any]) -> None:
    """Refuse (400, naming the key and entry) prefetch values no FHIR client could have sent:
    2.0 prefetch values are FHIR resources or null. Everything later reads these shapes."""
    for key, value in prefetch.items():
        where = f"prefetch.{key}"
        if value is None:
            continue
        _check_resource(value, where)
        if value.get("resourceType") != "Bundle":
            continue
        entries = value.get("entry")
        if entries is None:
            continue
        if not isinstance(entries, list):
            raise HookRequestError("must be an array", field=f"{where}.entry")
        for index, entry in enumerate(entries):
            spot = f"{where}.entry[{index}]"
            if not isinstance(entry, dict):
                raise HookRequestError("must be an object (a Bundle entry)", field=spot)
            if "resource" in entry:
                _check_resource(entry["resource"], f"{spot}.resource")
            search = entry.get("search")
            if search is not None and not isinstance(search, dict):
                raise HookRequestError("must be an object", field=f"{spot}.search")
        links = value.get("link")
        if links is not None and (
            not isinstance(links, list) or not all(isinstance(link, dict) for link in links)
        ):
            raise HookRequestError("must be an array of objects", field=f"{where}.link")


def _check_resource(resource: Any, where: str) -> None:
    if not isinstance(resource, dict):
        raise HookRequestError("must be a FHIR resource (a JSON object) or null", field=where)
    if not isinstance(resource.get("resourceType"), str):
        raise HookRequestError("must be a string", field=f"{where}.resourceType")
    if "id" in resource and not isinstance(resource["id"], str):
        raise HookRequestError("must be a string", field=f"{where}.id")


def _server_resources(resources: list[JSONDict], key: str) -> list[JSONDict]:
    """A FHIR server's answer, held to the same shapes as a client's prefetch."""
    for resource in resources:
        rid = resource.get("id")
        if not isinstance(resource.get("resourceType"), str) or not (
            rid is None or isinstance(rid, str)
        ):
            raise FhirBadResponse(f"{key}: the server sent a resource without a usable type or id")
    return resources


def _next_link(bundle: Mapping[str, Any]) -> str | None:
    for link in bundle.get("link") or []:
        if isinstance(link, dict) and link.get("relation") == "next" and link.get("url"):
            return str(link["url"])
    return None


def _bundle_resources(bundle: Mapping[str, Any]) -> tuple[list[JSONDict], bool]:
    """Data resources of a searchset Bundle, and whether it reports a failed query (the one
    OperationOutcome policy, cds.fhir.outcome)."""
    page = read_searchset(bundle, "prefetch")
    return page.resources, page.failed


def gather(
    *,
    prefetch: Mapping[str, Any] | None,
    queries: Sequence[PatientQuery],
    trials: CodeSource,
    patient_id: str,
    fhir_server: str | None,
    access_token: str | None,
    trusted: Sequence[str],
    settings: Settings,
    deadline: float,
) -> PrefetchResult:
    """The patient's resources from prefetch and, for what is missing, from ``fhirServer``.

    2.0 'Prefetch Template': the client "MUST NOT send keys it did not satisfy" and "MUST
    omit a key when details cannot be provided"; "if the client has no data for a key, the
    value MUST be null". So: absent -> we fetch; null or an empty Bundle -> no data, no fetch;
    an OperationOutcome (the client's error) -> refetched or left unknown by policy; a Bundle
    with a ``next`` link -> its further pages are fetched with the same token.

    Raises :class:`PrefetchUnavailable` (HTTP 412) when a key is absent and cannot be fetched:
    no fhirServer, an untrusted one, or a FHIR error. Past ``deadline`` (time.monotonic())
    whatever is still running is abandoned and its keys reported in ``incomplete``.
    """
    result = PrefetchResult()
    plans: list[_Plan] = []
    given = prefetch or {}
    check_prefetch(given)
    for query in queries:
        if query.key not in given:
            plans.append(_Plan(query, "fetch"))
            continue
        value = given[query.key]
        if value is None:
            result.empty.append(query.key)
            continue
        rtype = value.get("resourceType")
        failed = rtype == "OperationOutcome" and outcome_failed(value)
        if failed or (rtype == "Bundle" and _bundle_resources(value)[1]):
            # 2.0: the service "SHOULD check prefetch for OperationOutcomes".
            if settings.prefetch_oo_policy == "refetch":
                plans.append(_Plan(query, "fetch", optional=True))
            else:
                result.incomplete.append(query.key)
                result.warnings.append(f"{query.key}: the client's prefetch reported an error")
            continue
        if query.is_read:
            if rtype != query.resource_type:
                plans.append(_Plan(query, "fetch", optional=True))
                result.warnings.append(f"{query.key}: prefetch is not a {query.resource_type}")
                continue
            result.resources.append(value)
            result.used.append(query.key)
            continue
        if rtype != "Bundle":
            plans.append(_Plan(query, "fetch", optional=True))
            result.warnings.append(f"{query.key}: prefetch is not a Bundle")
            continue
        found, _ = _bundle_resources(value)
        result.resources.extend(found)
        next_url = _next_link(value)
        if next_url:
            plans.append(_Plan(query, "pages", next_url=next_url, optional=True))
            result.used.append(query.key)
        elif found:
            result.used.append(query.key)
        else:
            result.empty.append(query.key)
    where = (patient_id, fhir_server, access_token, trusted, settings, deadline)
    if plans:
        _run(plans, result, trials, *where)
    # What the records reference and no search returns (a medication record's Medication,
    # not part of the patient compartment) is read afterwards; when it cannot be, the
    # medication searches count as incomplete, so no washout passes on an unnamed drug.
    reads = [
        _Plan(PatientQuery(f"{rtype}/{rid}", rtype, f"{rtype}/{rid}"), "read", optional=True)
        for rtype, rid in referenced_reads(result.resources)
    ]
    if reads:
        _run(
            reads,
            result,
            trials,
            patient_id,
            fhir_server,
            access_token,
            trusted,
            settings,
            deadline,
        )
        read_keys = {plan.query.key for plan in reads}
        if read_keys & set(result.incomplete):
            result.incomplete += [q.key for q in queries if q.resource_type in MEDICATION_TYPES]
    return result


def _run(
    plans: list[_Plan],
    result: PrefetchResult,
    trials: CodeSource,
    patient_id: str,
    fhir_server: str | None,
    access_token: str | None,
    trusted: Sequence[str],
    settings: Settings,
    deadline: float,
) -> None:
    required = [p.query.key for p in plans if not p.optional]
    if fhir_server is None:
        if required:
            # 2.0: "If the CDS Service is unable to obtain the required data ... it SHALL
            # respond with an HTTP 412 Precondition Failed".
            raise PrefetchUnavailable(
                f"prefetch {_keys(required)} absent and no fhirServer to fetch it from"
            )
        _give_up(plans, result, "no fhirServer to complete it from")
        return
    remaining = deadline - time.monotonic()
    try:
        client = FhirClient(
            base_url=fhir_server,
            trusted_base_urls=trusted,
            allow_insecure_loopback=settings.dev,
            access_token=access_token,
            timeouts=Timeouts(
                connect=max(min(remaining, 2.0), 0.05),
                read=max(remaining, 0.05),
                total=max(remaining, 0.05),
            ),
            retry=RetryPolicy(attempts=1),
            max_pages=settings.max_prefetch_pages,
            # A backstop: at the budget the call stops waiting and closes the client, which
            # cuts what is still in flight; this ends any request soon after, whatever happens.
            deadline=deadline + _DEADLINE_SLACK_S,
        )
    except (UntrustedFhirServer, ValueError) as exc:
        # The allowlist refused fhirServer before a single packet was sent (no SSRF, no token
        # leak): with nothing else to ask, required data is unobtainable.
        log.warning("fhirServer refused: %s", type(exc).__name__)
        if required:
            raise PrefetchUnavailable(
                f"prefetch {_keys(required)} absent and fhirServer is not a trusted FHIR server"
            ) from exc
        _give_up(plans, result, "fhirServer is not trusted")
        return

    pool = ThreadPoolExecutor(
        max_workers=min(settings.fhir_concurrency, len(plans)), thread_name_prefix="prefetch"
    )
    futures: dict[Future[tuple[list[JSONDict], int, float]], _Plan] = {}
    try:
        for plan in plans:
            if plan.action == "fetch":
                futures[pool.submit(_fetch, client, patient_id, trials, plan.query)] = plan
            elif plan.action == "read":
                futures[pool.submit(_read, client, plan.query)] = plan
            else:
                futures[pool.submit(_pages, client, plan.next_url or "", settings)] = plan
        done, _pending = wait(futures, timeout=max(deadline - time.monotonic(), 0.0))
        failures: list[str] = []
        for future, plan in futures.items():
            key = plan.query.key
            error = future.exception() if future in done else None
            # A request whose read timeout (set to the budget) fired just before the wait
            # ended is the same timeout, whichever saw it first.
            cut = isinstance(error, FhirTemporaryError) and time.monotonic() >= deadline
            if future not in done or cut:
                result.timed_out = True
                result.incomplete.append(key)
                result.warnings.append(f"{key}: not fetched within the time budget")
                continue
            if error is None:
                found, calls, seconds = future.result()
                result.resources.extend(found)
                result.fetched.append(key)
                result.fhir_calls += calls
                result.slowest_query_s = max(result.slowest_query_s, seconds)
                continue
            result.fhir_calls += 1
            if isinstance(error, InputError) and plan.optional:
                # A reference the client sent that no request may be made for ("Medication/..")
                result.incomplete.append(key)
                result.warnings.append(f"{key}: not a resource that can be read")
                continue
            if not isinstance(error, FhirError):
                raise error
            if isinstance(error, FhirSearchFailed):
                result.warnings.append(f"{key}: the FHIR server reported an error for this search")
            # Required data: the Patient itself, or anything when our credentials are refused
            # (every other query would fail alike). A search the server cannot answer leaves
            # only the criteria it feeds unknown, so one unsupported query type (an EHR
            # without MedicationAdministration, say) does not silence every call.
            if isinstance(error, FhirAuthError) or (
                plan.query.is_read and not (plan.optional and not isinstance(error, FhirNotFound))
            ):
                failures.append(key)
            else:
                result.incomplete.append(key)
            # The error's message holds the URL with the patient id: log its type only.
            log.warning(
                "FHIR query %s failed: %s (HTTP %s)", key, type(error).__name__, error.status
            )
        if failures:
            raise PrefetchUnavailable(
                f"prefetch {_keys(failures)} absent and the FHIR server did not provide it"
            )
    finally:
        # Never wait for abandoned queries; closing the client cuts the requests they still
        # have in flight, so their threads and connections end now, not on a read timeout.
        pool.shutdown(wait=False, cancel_futures=True)
        client.close()


def _fetch(
    client: FhirClient, patient_id: str, trials: CodeSource, query: PatientQuery
) -> tuple[list[JSONDict], int, float]:
    started = time.perf_counter()
    fetched = fetch_patient_resources(
        client, patient_id, trials, concurrency=1, page_size=_PAGE_SIZE, queries=[query]
    )
    calls = sum(t.pages for t in fetched.queries)
    resources = _server_resources(fetched.resources, query.key)
    return resources, calls, time.perf_counter() - started


def _read(client: FhirClient, query: PatientQuery) -> tuple[list[JSONDict], int, float]:
    started = time.perf_counter()
    rtype, _, rid = query.template.partition("/")
    return [client.read(rtype, rid)], 1, time.perf_counter() - started


def _pages(client: FhirClient, url: str, settings: Settings) -> tuple[list[JSONDict], int, float]:
    """Follow a prefetch Bundle's ``next`` links (3.0: the service then needs the token)."""
    started = time.perf_counter()
    found: list[JSONDict] = []
    calls = 0
    # The client's one paging loop: next links checked against the trusted base, the page
    # cap, and an error OperationOutcome on a page failing the key (FhirSearchFailed).
    for page in client.iter_pages(
        url, what="prefetch next pages", max_pages=settings.max_prefetch_pages
    ):
        calls += 1
        found.extend(page.resources)
    return _server_resources(found, "prefetch next pages"), calls, time.perf_counter() - started


def _give_up(plans: Sequence[_Plan], result: PrefetchResult, why: str) -> None:
    for plan in plans:
        result.incomplete.append(plan.query.key)
        result.warnings.append(f"{plan.query.key}: {why}")


def _keys(keys: Sequence[str]) -> str:
    return ", ".join(repr(k) for k in keys)
