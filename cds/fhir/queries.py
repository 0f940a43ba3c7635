"""Patient-scoped FHIR queries derived from the trial definitions: fetching, prefetch templates."""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote

from cds.criteria.reads import MEDICATION_TYPES, REFERENCED_TYPES
from cds.criteria.record import patient_reference
from cds.errors import FhirBadResponse, FhirNotFound, FhirRejected, InputError
from cds.fhir.bundle import failed_search_reason
from cds.fhir.client import FhirClient, encode_query, is_resource_id

log = logging.getLogger(__name__)

JSONDict = dict[str, Any]

#: CDS Hooks 2.0 prefetch token for the patient in context.
PATIENT_PLACEHOLDER = "{{context.patientId}}"


#: Observations are searched by the criteria's codes. ``combo-code`` (FHIR R4 Observation
#: search parameter: code or component.code) also finds a panel whose components carry the
#: analytes (a blood count sent as one Observation with a component per count).
_OBSERVATION_CODE_PARAM = "combo-code"


class CodeSource(Protocol):
    """What the queries need from the trial definitions (``cds.criteria.TrialSet`` has it)."""

    def codes_for(self, resource_type: str) -> frozenset[tuple[str, str]]:
        """(system, code) pairs the criteria read from resources of this type."""
        ...

    def types_read(self) -> tuple[str, ...]:
        """The clinical resource types the criteria read, in record order."""
        ...


@dataclass(frozen=True)
class PatientQuery:
    """One query, kept as a CDS Hooks prefetch template with the ``{{context.patientId}}`` token."""

    #: the prefetch key, e.g. ``patient``, ``conditions``, ``observations-2``
    key: str
    resource_type: str
    #: relative URL with PATIENT_PLACEHOLDER, e.g. ``Condition?patient={{context.patientId}}``
    template: str

    @property
    def is_read(self) -> bool:
        return "?" not in self.template

    def for_patient(self, patient_id: str) -> str:
        """The relative URL for one patient (the id is checked against the FHIR id syntax)."""
        safe_id = quote(check_patient_id(patient_id), safe="")
        return self.template.replace(PATIENT_PLACEHOLDER, safe_id)


@dataclass(frozen=True)
class QueryTiming:
    """What one query of a fetch did."""

    key: str
    #: the relative URL of the first page
    url: str
    seconds: float
    pages: int
    resources: int
    #: when it started, in seconds after the fetch started (queued queries start late)
    started: float = 0.0


@dataclass(frozen=True)
class FetchResult:
    """One patient's resources fetched from a FHIR server, and how the fetch went."""

    patient_id: str
    #: the Patient first, then each query's resources in query order, de-duplicated by type/id
    resources: list[JSONDict]
    #: server OperationOutcomes met on the way, as messages naming the query
    warnings: list[str] = field(default_factory=list)
    #: in query order, whatever order they ran in
    queries: list[QueryTiming] = field(default_factory=list)
    #: wall-clock seconds for the whole fetch
    seconds: float = 0.0
    concurrency: int = 1
    #: resource type -> why its data is missing (a search the server could not answer, with
    #: ``incomplete_on_refusal``): criteria reading it cannot pass or fail on what is here
    incomplete: dict[str, str] = field(default_factory=dict)


def check_patient_id(patient_id: str) -> str:
    if not is_resource_id(patient_id):
        raise InputError("not a FHIR resource id", source=f"patient id {patient_id[:70]!r}")
    return patient_id


def escape_token(value: str) -> str:
    """FHIR R4 3.1.1.5.7 (escaping): ``\\``, ``,``, ``|`` and ``$`` in a value get a ``\\``."""
    return re.sub(r"([\\,|$])", r"\\\1", value)


def build_patient_queries(
    trials: CodeSource,
    *,
    max_url_length: int = 1800,
    base_url_allowance: int = 200,
) -> tuple[PatientQuery, ...]:
    """The queries a patient evaluation needs, derived from what the trials' criteria read.

    Patient read; then each clinical type the criteria read (``trials.types_read()``), by
    patient: Observation also by the criteria's codes, comma-OR'ed (FHIR R4 3.1.1.4.1 token
    ``system|code``), split into chunks so no URL (with ``base_url_allowance`` characters of
    base and the longest FHIR id) passes ``max_url_length`` percent-encoded: ~2000 characters
    is where proxies and servers start refusing URLs. No Observation query when the criteria
    read no Observation codes. No ``_include``: CDS Hooks 2.0 recommends a query subset for
    prefetch without it, so the Medications that records reference are read afterwards
    (:func:`referenced_reads`).
    """
    patient = f"patient={PATIENT_PLACEHOLDER}"
    queries = [PatientQuery("patient", "Patient", f"Patient/{PATIENT_PLACEHOLDER}")]
    for rtype in trials.types_read():
        if rtype == "Observation":
            queries += _observation_queries(trials, patient, max_url_length, base_url_allowance)
            continue
        queries.append(PatientQuery(_query_key(rtype), rtype, f"{rtype}?{patient}"))
    return tuple(queries)


def _query_key(resource_type: str) -> str:
    """The prefetch key of a type's search: ``MedicationRequest`` -> ``medication-requests``."""
    words = re.findall(r"[A-Z][a-z]*", resource_type)
    return "-".join(w.lower() for w in words) + "s"


def _observation_queries(
    trials: CodeSource, patient: str, max_url_length: int, base_url_allowance: int
) -> list[PatientQuery]:
    codes = sorted(trials.codes_for("Observation"))
    prefix = f"Observation?{patient}&{_OBSERVATION_CODE_PARAM}="
    # The placeholder stands in for an id of up to 64 characters.
    fixed = _encoded_len(prefix) - len(PATIENT_PLACEHOLDER) + 64
    budget = max_url_length - base_url_allowance - fixed
    chunks: list[list[str]] = []
    current: list[str] = []
    used = 0
    for system, code in codes:
        token = f"{escape_token(system)}|{escape_token(code)}" if system else escape_token(code)
        cost = _encoded_len(token) + (1 if current else 0)
        if current and used + cost > budget:
            chunks.append(current)
            current, used = [], 0
            cost = _encoded_len(token)
        if cost > budget:
            raise InputError(
                f"code {code!r} of {system!r} alone is longer than a URL may be",
                source="trial definitions",
            )
        current.append(token)
        used += cost
    if current:
        chunks.append(current)
    return [
        PatientQuery(
            "observations" if len(chunks) == 1 else f"observations-{number}",
            "Observation",
            prefix + ",".join(chunk),
        )
        for number, chunk in enumerate(chunks, start=1)
    ]


def prefetch_templates(trials: CodeSource, **limits: int) -> dict[str, str]:
    """CDS Hooks discovery ``prefetch``: key -> template with ``{{context.patientId}}``.

    The same derivation as the live fetch, so the two cannot drift; the live fetch only adds
    ``_count`` (page size), which prefetch leaves out because an EHR may return just one page.
    """
    return {q.key: q.template for q in build_patient_queries(trials, **limits)}


def fetch_patient_resources(
    client: FhirClient,
    patient_id: str,
    trials: CodeSource,
    *,
    concurrency: int = 6,
    page_size: int = 200,
    tag: tuple[str, str] | None = None,
    queries: Sequence[PatientQuery] | None = None,
    incomplete_on_refusal: bool = False,
) -> FetchResult:
    """Fetch what the trials need about one patient: the Patient, then every search, all pages.

    :param concurrency: how many queries run at once (threads); 1 runs them one after another
        in the calling thread, for comparison
    :param page_size: ``_count`` sent with each search
    :param tag: restrict searches to resources with this ``meta.tag`` (``_tag=system|code``),
        for shared servers
    :param queries: override the derived queries (default: :func:`build_patient_queries`)
    :param incomplete_on_refusal: a search the server refuses (a 4xx: a resource type or a
        parameter it does not support) leaves its resource type in ``incomplete`` instead of
        failing the whole fetch, so one unsupported search (an EHR without ResearchSubject,
        say) leaves only the criteria it feeds unknown. A search that reports an error
        OperationOutcome still fails the fetch: that may be a passing fault, which a rerun
        can mend.
    :raises FhirNotFound: the patient does not exist
    :raises FhirError: any other failure of any query (the others are cancelled)
    """
    check_patient_id(patient_id)
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    plan = tuple(queries) if queries is not None else build_patient_queries(trials)
    extra: list[tuple[str, str]] = [("_count", str(page_size))]
    if tag is not None:
        extra.append(("_tag", f"{escape_token(tag[0])}|{escape_token(tag[1])}"))
    suffix = "&" + encode_query(extra)

    def run(query: PatientQuery) -> tuple[QueryTiming, list[JSONDict], list[str]]:
        url = query.for_patient(patient_id)
        started = time.perf_counter()
        offset = started - fetch_started
        if query.is_read:
            resources = [client.read(query.resource_type, patient_id)]
            pages, warnings = 1, []
        else:
            resource_type, _, params = (url + suffix).partition("?")
            try:
                result = client.search(resource_type, params)
            except (FhirRejected, FhirNotFound) as exc:
                if not incomplete_on_refusal:
                    raise
                # The message holds the URL with the patient id: the type of error only.
                refused[query.resource_type] = f"{query.key}: {type(exc).__name__}"
                seconds = time.perf_counter() - started
                return QueryTiming(query.key, url, seconds, 1, 0, offset), [], []
            resources, pages, warnings = result.resources, result.pages, result.warnings
        seconds = time.perf_counter() - started
        timing = QueryTiming(query.key, url, seconds, pages, len(resources), offset)
        return timing, resources, [f"{query.key}: {w}" for w in warnings]

    refused: dict[str, str] = {}  # resource type -> the refused query, with incomplete_on_refusal
    fetch_started = time.perf_counter()
    workers = min(concurrency, len(plan))
    if workers <= 1:
        outputs = [run(q) for q in plan]
    else:
        # The threads are kept between fetches: starting one costs ~1 ms here (Thread.start()
        # waits for it to run, and it then holds the GIL while it prepares its request), which
        # staggered the queries of every fetch. The slowest kinds are submitted first.
        pool = _shared_pool(workers)
        futures: dict[PatientQuery, Future[tuple[QueryTiming, list[JSONDict], list[str]]]]
        futures = {q: pool.submit(run, q) for q in sorted(plan, key=_expected_cost)}
        done, pending = wait(futures.values(), return_when=FIRST_EXCEPTION)
        for future in futures.values():
            if future in done and future.exception() is not None:
                for other in pending:
                    other.cancel()  # queued ones never start; running ones finish unread
                future.result()  # raises the first failure, with its FhirError type
        outputs = [futures[q].result() for q in plan]
    seconds = time.perf_counter() - fetch_started

    resources: list[JSONDict] = []
    warnings: list[str] = []
    seen: set[tuple[str, str]] = set()
    own = f"Patient/{patient_id}"
    for timing, found, notes in outputs:
        warnings += notes
        foreign = 0
        for resource in found:
            owner = patient_reference(resource, {})
            if owner is not None and owner != own:
                # A server that does not support the search parameter ignores it (FHIR R4
                # 3.1.1.4: unknown parameters are ignored unless handling=strict) and answers
                # with every patient's resources of the type.
                foreign += 1
                continue
            rid = resource.get("id")
            key = (str(resource.get("resourceType")), str(rid))
            if rid is not None and key in seen:
                # An Observation with codings from two chunks matches two queries.
                continue
            seen.add(key)
            resources.append(resource)
        if timing.key == "patient" and found and found[0].get("id") != patient_id:
            raise FhirBadResponse(f"asked for Patient/{patient_id}, got another Patient")
        if foreign:
            _warn_ignored_parameter(timing.key)
    warnings += [f"{why}: the server could not answer this search" for why in refused.values()]
    for rtype, rid in referenced_reads(resources):
        resources.append(client.read(rtype, rid))
    log.debug(
        "fetched %d resources for one patient with %d queries in %.1f ms",
        len(resources),
        len(plan),
        seconds * 1000,
    )
    return FetchResult(
        patient_id=patient_id,
        resources=resources,
        warnings=warnings,
        queries=[timing for timing, _, _ in outputs],
        seconds=seconds,
        concurrency=max(workers, 1),
        incomplete={rtype: failed_search_reason([why]) for rtype, why in sorted(refused.items())},
    )


@functools.cache
def _warn_ignored_parameter(query_key: str) -> None:
    """Once per query kind and process: the log says which search the server answered for
    every patient (no patient is named)."""
    log.warning(
        "the %s search returned other patients' resources (the server ignores its patient "
        "parameter); they are set aside",
        query_key,
    )


def referenced_reads(resources: Sequence[JSONDict]) -> list[tuple[str, str]]:
    """(type, id) of each resource the rules read through a reference that is not among
    ``resources``: a medication record's ``medicationReference`` to a Medication on the
    server (a contained one, ``#id``, travels with its record)."""
    have = {(r.get("resourceType"), r.get("id")) for r in resources}
    wanted: dict[tuple[str, str], None] = {}
    for resource in resources:
        if resource.get("resourceType") not in MEDICATION_TYPES:
            continue
        reference = resource.get("medicationReference")
        target = reference.get("reference") if isinstance(reference, dict) else None
        if not isinstance(target, str) or target.startswith("#"):
            continue
        parts = target.split("/_history/", 1)[0].rstrip("/").split("/")
        if len(parts) < 2 or parts[-2] not in REFERENCED_TYPES:
            continue
        key = (parts[-2], parts[-1])
        if key not in have and is_resource_id(key[1]):
            wanted[key] = None
    return list(wanted)


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _shared_pool(workers: int) -> ThreadPoolExecutor:
    """One pool per size per process. Fetches that run at the same time share its threads, so
    a process never has more than ``workers`` queries of that size in flight; keyed by pid
    because threads do not survive a fork (gunicorn workers)."""
    key = (os.getpid(), workers)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = ThreadPoolExecutor(
                max_workers=workers, thread_name_prefix=f"fhir-fetch-{workers}"
            )
        return pool


def _expected_cost(query: PatientQuery) -> int:
    """Rank for starting order: code-filtered Observation searches are the slowest (~55 ms on
    a server with 47,000 resources, against 1-3 ms for plain patient-scoped searches)."""
    order = ("Observation", "Condition", "Procedure", "MedicationRequest")
    rank = order.index(query.resource_type) if query.resource_type in order else len(order)
    return -len(query.template) if rank == 0 else rank * 10_000


def _encoded_len(text: str) -> int:
    # What requests sends: everything outside RFC 3986's unreserved and a few query-safe
    # characters is percent-encoded (``|`` becomes ``%7C``).
    return len(quote(text, safe="/:?=&,{}.-_~"))


__all__ = [
    "PATIENT_PLACEHOLDER",
    "CodeSource",
    "FetchResult",
    "PatientQuery",
    "QueryTiming",
    "build_patient_queries",
    "check_patient_id",
    "fetch_patient_resources",
    "prefetch_templates",
    "referenced_reads",
]
