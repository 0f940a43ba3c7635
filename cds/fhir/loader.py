"""Load fixture bundles into a FHIR server as idempotent, tagged PUT transactions."""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import logging
import re
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cds.errors import (
    CdsError,
    FhirAuthError,
    FhirError,
    FhirFatalError,
    FhirRejected,
    FixtureLoadError,
    InputError,
)
from cds.fhir.client import FhirClient, is_resource_id, outcome_message

log = logging.getLogger(__name__)

JSONDict = dict[str, Any]

DEFAULT_TAG_SYSTEM = "urn:cds-trial-screening:tag"
DEFAULT_TAG = (DEFAULT_TAG_SYSTEM, "fixture")
#: the repository's fixtures (present in a checkout, not in an installed wheel)
FIXTURES_DIR = Path(__file__).resolve().parents[2] / "fhir_fixtures"

_ENTRY_EXPRESSION = re.compile(r"Bundle\.entry\[(\d+)\]")
#: meta elements the server owns: left out when deciding whether a resource changed
_SERVER_META = ("versionId", "lastUpdated", "source")
_ID_CHUNK = 50


@dataclass
class FileReport:
    """What loading one bundle file did."""

    file: str
    #: resources per type in the file
    counts: Counter[str] = field(default_factory=Counter)
    created: int = 0
    updated: int = 0
    #: already on the server with the same content: not sent, so their version stays
    unchanged: int = 0


@dataclass
class LoadReport:
    """What a fixtures load did, per file and in total."""

    files: list[FileReport] = field(default_factory=list)

    @property
    def counts(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for report in self.files:
            total.update(report.counts)
        return total

    def total(self, attribute: str) -> int:
        return sum(int(getattr(report, attribute)) for report in self.files)

    def summary(self) -> str:
        per_type = ", ".join(f"{rtype} {n}" for rtype, n in sorted(self.counts.items()))
        return (
            f"{len(self.files)} bundle(s), {sum(self.counts.values())} resources "
            f"({per_type or 'none'}): {self.total('created')} created, "
            f"{self.total('updated')} updated, {self.total('unchanged')} unchanged"
        )


@dataclass(frozen=True)
class PreparedEntry:
    """One fixture resource ready to PUT, and where it came from in its file."""

    source_index: int
    resource_type: str
    resource_id: str
    resource: JSONDict

    @property
    def reference(self) -> str:
        return f"{self.resource_type}/{self.resource_id}"


def parse_tag(text: str) -> tuple[str, str]:
    """``SYSTEM|CODE`` (or just ``CODE`` for the default system) as a pair."""
    system, bar, code = text.rpartition("|")
    if not bar:
        system = DEFAULT_TAG_SYSTEM
    if not code or (bar and not system):
        raise InputError("expected SYSTEM|CODE", source=f"tag {text!r}")
    return system, code


def prepare_entries(
    bundle: Any,
    *,
    file: str,
    tag: tuple[str, str],
    identifiers: Mapping[str, str] | None = None,
) -> list[PreparedEntry]:
    """The bundle's resources with stable ids, references as ``Type/id`` and the tag stamped.

    Entries keep their ids (from ``resource.id``, else from a ``urn:uuid:`` or
    ``[base]/Type/id`` fullUrl), so a PUT to ``Type/id`` (FHIR R4 3.1.0.4 update, "update as
    create") writes the same resource every time. References to a fullUrl in the bundle
    (``urn:uuid:...`` included, R4 2.36.4.1) are rewritten to ``Type/id``, since the entries
    are no longer resolved against each other's fullUrls once they are PUT by id; conditional
    references (``Type?identifier=system|value``, R4 3.1.0.11.2) to a resource of the load
    (``identifiers``, from :func:`identifier_index`) are rewritten to it too, so what is sent
    is what the server keeps, and a second load finds it unchanged. A Bundle inside an entry
    (a message Bundle's content) is unwrapped; an entry without a resource is skipped with a
    warning.
    """
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise InputError("not a FHIR Bundle", source=file)
    staged: list[tuple[int, str, str, JSONDict]] = []
    full_urls: dict[str, str] = {}
    for index, entry, where in _flat_entries(bundle, file):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            log.warning("%s: has no resource with a resourceType; skipped", where)
            continue
        method = str((entry.get("request") or {}).get("method", "PUT")).upper()
        if method not in ("PUT", "POST"):
            raise InputError(f"request.method {method} cannot be loaded as a fixture", source=where)
        mode = (entry.get("search") or {}).get("mode")
        if resource["resourceType"] == "OperationOutcome" or mode == "outcome":
            log.warning("%s: skipping an OperationOutcome entry", where)
            continue
        full_url = entry.get("fullUrl")
        rtype = resource["resourceType"]
        rid = resource.get("id") or _id_from_full_url(full_url, rtype)
        if not isinstance(rid, str) or not is_resource_id(rid):
            raise InputError(
                f"{rtype} has no usable id (fixtures need stable ids: resource.id, or a "
                "urn:uuid or Type/id fullUrl)",
                source=where,
            )
        if isinstance(full_url, str) and full_url:
            full_urls[full_url] = f"{rtype}/{rid}"
        staged.append((index, rtype, rid, resource))

    known = {**(identifiers or {}), **full_urls}
    prepared: list[PreparedEntry] = []
    seen: dict[str, int] = {}
    for index, rtype, rid, resource in staged:
        where = f"{file}: entry {index}"
        reference = f"{rtype}/{rid}"
        if reference in seen:
            raise InputError(f"{reference} is also entry {seen[reference]}", source=where)
        seen[reference] = index
        copied = copy.deepcopy(resource)  # never change the caller's bundle
        copied["id"] = rid
        _rewrite_references(copied, known, where)
        _stamp_tag(copied, tag)
        prepared.append(PreparedEntry(index, rtype, rid, copied))
    return prepared


def _flat_entries(bundle: JSONDict, file: str) -> list[tuple[int, Any, str]]:
    """(index, entry, where) of a Bundle's entries, a nested Bundle's entries in its place."""
    raw_entries = bundle.get("entry") or []
    if not isinstance(raw_entries, list):
        raise InputError("Bundle.entry is not a list", source=file)
    flat: list[tuple[int, Any, str]] = []
    for index, entry in enumerate(raw_entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and resource.get("resourceType") == "Bundle":
            flat += [
                (index, inner, f"{file}: entry {index}: {where.rpartition(': ')[2]}")
                for _, inner, where in _flat_entries(resource, file)
            ]
        else:
            flat.append((index, entry, f"{file}: entry {index}"))
    return flat


def identifier_index(bundles: Iterable[JSONDict]) -> dict[str, str]:
    """``Type?identifier=system|value`` -> ``Type/id`` for every identified resource of the
    bundles: what Synthea's conditional references to practitioners and hospitals name."""
    index: dict[str, str] = {}
    for bundle in bundles:
        for _, entry, _ in _flat_entries(bundle, "bundle"):
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(resource, dict):
                continue
            rtype = resource.get("resourceType")
            rid = resource.get("id") or _id_from_full_url(entry.get("fullUrl"), str(rtype))
            if not isinstance(rid, str):
                continue
            for identifier in resource.get("identifier") or ():
                if isinstance(identifier, dict) and identifier.get("value"):
                    key = f"{rtype}?identifier={identifier.get('system', '')}|{identifier['value']}"
                    index.setdefault(key, f"{rtype}/{rid}")
    return index


def transaction_bundle(entries: Sequence[PreparedEntry]) -> JSONDict:
    """A transaction Bundle of ``PUT Type/id`` entries (FHIR R4 3.1.0.11 transaction)."""
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": e.resource, "request": {"method": "PUT", "url": e.reference}}
            for e in entries
        ],
    }


def read_bundle(path: Path) -> JSONDict:
    file = str(path)
    try:
        bundle = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", source=file) from exc
    except ValueError as exc:
        raise InputError(f"not JSON: {exc}", source=file) from exc
    except RecursionError as exc:
        raise InputError("nested too deeply to be read", source=file) from exc
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise InputError("not a FHIR Bundle", source=file)
    return bundle


def load_bundle_file(
    client: FhirClient,
    path: Path,
    *,
    tag: tuple[str, str] = DEFAULT_TAG,
    skip_unchanged: bool = True,
    bundle: JSONDict | None = None,
    identifiers: Mapping[str, str] | None = None,
) -> FileReport:
    """Load one bundle file as one transaction; resources already identical are not sent."""
    file = str(path)
    if bundle is None:
        bundle = read_bundle(path)
    entries = prepare_entries(bundle, file=file, tag=tag, identifiers=identifiers)
    report = FileReport(file=file, counts=Counter(e.resource_type for e in entries))
    to_send = list(entries)
    if skip_unchanged and entries:
        existing = _existing_versions(client, entries)
        to_send = [
            e for e in entries if _comparable(existing.get(e.reference)) != _comparable(e.resource)
        ]
        report.unchanged = len(entries) - len(to_send)
    if not to_send:
        log.info("%s: all %d resources already loaded and unchanged", file, len(entries))
        return report
    try:
        response = client.transaction(transaction_bundle(to_send))
    except FhirAuthError:
        raise
    except FhirFatalError as exc:
        raise _rejection(exc, file, to_send) from exc
    for position, entry in enumerate(response.get("entry") or []):
        status = str((entry.get("response") or {}).get("status", ""))
        if status.startswith("201"):
            report.created += 1
        elif status.startswith("2"):
            report.updated += 1
        else:
            sent = to_send[position] if position < len(to_send) else None
            raise FixtureLoadError(
                f"{file}: entry {sent.source_index if sent else '?'}: the server answered "
                f"{status or 'no status'} inside the transaction response",
                file=file,
                entry_index=sent.source_index if sent else None,
            )
    log.info(
        "%s: %d created, %d updated, %d unchanged",
        file,
        report.created,
        report.updated,
        report.unchanged,
    )
    return report


def bundle_files(directory: Path) -> list[Path]:
    """Every ``*.json`` under the directory, recursively, in a stable order."""
    if not directory.is_dir():
        raise InputError("not a directory", source=str(directory))
    return sorted(p for p in directory.rglob("*.json") if p.is_file())


def files_of(paths: Iterable[Path]) -> list[Path]:
    """The files named, a directory standing for every ``*.json`` under it."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += bundle_files(path)
        elif path.is_file():
            files.append(path)
        else:
            raise InputError("no such file or directory", source=str(path))
    return files


def _holds_patient(bundle: JSONDict) -> bool:
    return any(
        isinstance(entry, dict)
        and isinstance(entry.get("resource"), dict)
        and entry["resource"].get("resourceType") == "Patient"
        for _, entry, _ in _flat_entries(bundle, "bundle")
    )


def load_fixtures(
    client: FhirClient,
    directory: Path = FIXTURES_DIR,
    *,
    tag: tuple[str, str] = DEFAULT_TAG,
    skip_unchanged: bool = True,
    files: Iterable[Path] | None = None,
) -> LoadReport:
    """Load every ``*.json`` Bundle of a directory (default ``fhir_fixtures/``), or the
    ``files`` given, one transaction per file. Bundles without a Patient (Synthea's
    practitioner and hospital information, which patients' bundles reference conditionally)
    go first, then the rest in file-name order. Running it twice changes nothing on the
    server."""
    paths = list(files) if files is not None else bundle_files(directory)
    bundles = {path: read_bundle(path) for path in paths}
    identifiers = identifier_index(bundles.values())
    ordered = sorted(paths, key=lambda p: (_holds_patient(bundles[p]), str(p)))
    report = LoadReport()
    for path in ordered:
        report.files.append(
            load_bundle_file(
                client,
                path,
                tag=tag,
                skip_unchanged=skip_unchanged,
                bundle=bundles.pop(path),
                identifiers=identifiers,
            )
        )
    return report


# -- CLI -------------------------------------------------------------------------------------


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    fixtures_subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """Add ``cds fixtures load`` and ``cds fixtures fetch``."""
    load = fixtures_subparsers.add_parser(
        "load",
        help="upload fixture bundles to a FHIR server (idempotent PUT transactions)",
        description="Upload every *.json Bundle of the files and directories given (default: "
        "the repository's fhir_fixtures/) as transactions of PUT Type/id entries, each resource "
        "tagged, so that ids stay stable and loading twice changes nothing. A Synthea output "
        "directory loads as it is (practitioner and hospital bundles first).",
    )
    load.add_argument("paths", nargs="*", type=Path, default=[FIXTURES_DIR], metavar="FILE_OR_DIR")
    _server_arguments(load)
    load.add_argument(
        "--tag",
        type=parse_tag,
        default=DEFAULT_TAG,
        metavar="SYSTEM|CODE",
        help=f"meta.tag stamped on every resource (default {DEFAULT_TAG[0]}|{DEFAULT_TAG[1]})",
    )
    load.add_argument(
        "--always-send",
        action="store_true",
        help="PUT every resource even when the server already has it unchanged",
    )
    load.set_defaults(func=_load_command)

    fetch = fixtures_subparsers.add_parser(
        "fetch",
        help="fetch one patient's data from a FHIR server as a collection Bundle",
        description="Run the trial-derived patient queries against a FHIR server and write the "
        "resources as a collection Bundle (the input `cds evaluate` takes).",
    )
    fetch.add_argument("patient_id", metavar="PATIENT_ID")
    _server_arguments(fetch)
    fetch.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    fetch.set_defaults(func=_fetch_command)


def _server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fhir-base",
        required=True,
        metavar="URL",
        help="FHIR base URL (https, or http to loopback)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="read timeout per request (default 60)",
    )


def _cli_client(args: argparse.Namespace) -> FhirClient:
    from cds.fhir.client import Timeouts

    # The operator named this server on the command line: that is the allowlist. Plain http
    # is still refused unless it goes to loopback (a local test server).
    return FhirClient(
        base_url=args.fhir_base,
        trusted_base_urls=[args.fhir_base],
        allow_insecure_loopback=True,
        timeouts=Timeouts(read=args.timeout),
    )


def _load_command(args: argparse.Namespace) -> int:
    files = files_of(args.paths)
    if not files:
        raise InputError("no *.json bundles here", source=", ".join(map(str, args.paths)))
    with _cli_client(args) as client:
        report = load_fixtures(
            client, tag=args.tag, skip_unchanged=not args.always_send, files=files
        )
    for item in report.files:
        per_type = ", ".join(f"{t} {n}" for t, n in sorted(item.counts.items()))
        sys.stdout.write(
            f"{item.file}: {per_type} ({item.created} created, {item.updated} "
            f"updated, {item.unchanged} unchanged)\n"
        )
    sys.stdout.write(f"loaded into {client.base_url}: {report.summary()}\n")
    return 0


def _fetch_command(args: argparse.Namespace) -> int:
    from cds.fhir.queries import fetch_patient_resources

    try:
        # Imported by name: the engine is another package's concern, and the fetch only needs
        # its codes_for() interface (cds.fhir.queries.CodeSource).
        load_trials = importlib.import_module("cds.criteria").load_trials
    except (ImportError, AttributeError) as exc:
        raise CdsError("the trial engine (cds.criteria.load_trials) is not available") from exc
    trials = load_trials()
    with _cli_client(args) as client:
        result = fetch_patient_resources(client, args.patient_id, trials)
    for warning in result.warnings:
        log.warning("%s", warning)
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": f"{client.base_url}/{r['resourceType']}/{r.get('id')}", "resource": r}
            for r in result.resources
        ],
    }
    text = json.dumps(bundle, indent=2) + "\n"
    if args.output:
        args.output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    log.info(
        "fetched %d resources with %d queries in %.0f ms",
        len(result.resources),
        len(result.queries),
        result.seconds * 1000,
    )
    return 0


# -- helpers ---------------------------------------------------------------------------------


def _id_from_full_url(full_url: Any, resource_type: str) -> str | None:
    if not isinstance(full_url, str):
        return None
    if full_url.startswith("urn:uuid:"):
        return full_url.removeprefix("urn:uuid:")  # a UUID is a valid FHIR id (36 chars)
    head, _, rid = full_url.rstrip("/").rpartition("/")
    if head.endswith(f"/{resource_type}") or head == resource_type:
        return rid
    return None


def _rewrite_references(node: Any, full_urls: Mapping[str, str], where: str) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                if value in full_urls:
                    node[key] = full_urls[value]
                elif value.startswith("urn:uuid:"):
                    raise InputError(
                        f"reference {value} matches no fullUrl in the bundle", source=where
                    )
            else:
                _rewrite_references(value, full_urls, where)
    elif isinstance(node, list):
        for item in node:
            _rewrite_references(item, full_urls, where)


def _stamp_tag(resource: JSONDict, tag: tuple[str, str]) -> None:
    meta = resource.setdefault("meta", {})
    tags = meta.setdefault("tag", [])
    if not any(t.get("system") == tag[0] and t.get("code") == tag[1] for t in tags):
        tags.append({"system": tag[0], "code": tag[1]})


def _comparable(resource: Mapping[str, Any] | None) -> Any:
    """A resource as compared for "unchanged": server-owned meta dropped, tags as a set."""
    if resource is None:
        return None
    copied = dict(resource)
    meta = dict(copied.pop("meta", None) or {})
    for key in _SERVER_META:
        meta.pop(key, None)
    tags = meta.pop("tag", None) or []
    meta["tag"] = sorted((str(t.get("system")), str(t.get("code"))) for t in tags)
    copied["meta"] = meta
    return json.dumps(copied, sort_keys=True)


def _existing_versions(client: FhirClient, entries: Sequence[PreparedEntry]) -> dict[str, JSONDict]:
    """What the server holds now for these ids (``Type?_id=a,b,...``), by ``Type/id``."""
    by_type: dict[str, list[str]] = {}
    for entry in entries:
        by_type.setdefault(entry.resource_type, []).append(entry.resource_id)
    found: dict[str, JSONDict] = {}
    for rtype, ids in by_type.items():
        for start in range(0, len(ids), _ID_CHUNK):
            chunk = ids[start : start + _ID_CHUNK]
            try:
                params = [("_id", ",".join(chunk)), ("_count", str(len(chunk)))]
                result = client.search(rtype, params)
            except (FhirRejected, FhirFatalError) as exc:
                if isinstance(exc, FhirAuthError):
                    raise
                # A server that cannot search by _id: send everything, PUT is idempotent anyway.
                log.info("cannot look up existing %s (%s); sending all", rtype, exc)
                return {}
            for resource in result.resources:
                found[f"{resource.get('resourceType')}/{resource.get('id')}"] = resource
    return found


def _rejection(exc: FhirError, file: str, sent: Sequence[PreparedEntry]) -> FixtureLoadError:
    message = outcome_message(exc.outcome) or str(exc)
    index = _locate_entry(exc.outcome, message, sent)
    status = f"HTTP {exc.status}" if exc.status else "no status"
    if index is not None:
        entry = next(e for e in sent if e.source_index == index)
        where = f"{file}: entry {index} ({entry.reference})"
    else:
        where = f"{file}: entry not named by the server"
    return FixtureLoadError(
        f"{where}: the server rejected the transaction ({status}): {message}",
        file=file,
        entry_index=index,
        url=exc.url,
        status=exc.status,
        outcome=exc.outcome,
    )


def _locate_entry(
    outcome: Mapping[str, Any] | None, message: str, sent: Sequence[PreparedEntry]
) -> int | None:
    """The file's entry index the server blamed: from issue.expression/location
    (``Bundle.entry[N]``, N counting the entries sent), else the one entry its message names."""
    for issue in (outcome or {}).get("issue") or []:
        for text in [*(issue.get("expression") or []), *(issue.get("location") or [])]:
            match = _ENTRY_EXPRESSION.search(str(text))
            if match and int(match.group(1)) < len(sent):
                return sent[int(match.group(1))].source_index
    for pattern in ("{ref}", "'{id}'", "'{type}'", '"{id}"'):
        named = [
            e
            for e in sent
            if pattern.format(ref=e.reference, id=e.resource_id, type=e.resource_type) in message
        ]
        if len({e.resource_type if "{type}" in pattern else e.reference for e in named}) == 1:
            if "{type}" in pattern and len(named) > 1:
                continue
            return named[0].source_index
    return None


__all__ = [
    "DEFAULT_TAG",
    "FIXTURES_DIR",
    "FileReport",
    "FixtureLoadError",
    "LoadReport",
    "PreparedEntry",
    "files_of",
    "identifier_index",
    "load_bundle_file",
    "load_fixtures",
    "parse_tag",
    "prepare_entries",
    "register",
    "transaction_bundle",
]
