"""FHIR R4 Bundles (searchset, collection, transaction, batch) split into per-patient records."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from cds.criteria.reads import CLINICAL_TYPES
from cds.criteria.record import PatientRecord, RecordBuilder, RecordIndex, patient_reference
from cds.errors import InputError
from cds.fhir.outcome import outcome_failed, outcome_message

_BUNDLE_TYPES = {
    "searchset",
    "collection",
    "transaction",
    "batch",
    "transaction-response",
    "batch-response",
    "document",
    "message",
    "history",
}


@dataclass
class BundleContent:
    """What a Bundle holds for the record builders."""

    resources: list[dict[str, Any]] = field(default_factory=list)
    #: Bundle fullUrls (urn:uuid:...) -> ``Type/id``
    aliases: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    #: messages of OperationOutcomes that report a failed search: the data is incomplete
    failures: list[str] = field(default_factory=list)


def bundle_resources(bundle: Any, *, source: str) -> BundleContent:
    """The resources of a Bundle (a message Bundle's inner Bundles unwrapped), its fullUrl
    aliases, warnings, and the failed searches it reports."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        found = bundle.get("resourceType") if isinstance(bundle, dict) else type(bundle).__name__
        raise InputError(f"not a FHIR Bundle (resourceType {found!r})", source=source)
    content = BundleContent()
    _read_bundle(bundle, source, content, depth=0)
    return content


#: entries that hold no patient data of their own
_NOT_DATA = frozenset({"Bundle", "OperationOutcome"})
#: how deep Bundles may nest in a message (a message Bundle wraps a searchset, say)
_MAX_NESTING = 4


def _read_bundle(bundle: dict[str, Any], source: str, content: BundleContent, depth: int) -> None:
    if bundle.get("type") not in _BUNDLE_TYPES:
        raise InputError(f"unsupported Bundle.type {bundle.get('type')!r}", source=source)
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise InputError("Bundle.entry is not a list", source=source)
    for i, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            content.warnings.append(f"{source}: Bundle.entry[{i}] has no resource; skipped")
            continue
        rtype = resource["resourceType"]
        if rtype in _NOT_DATA:
            where = f"{source}: Bundle.entry[{i}]"
        if rtype == "Bundle":
            if depth >= _MAX_NESTING:
                content.warnings.append(f"{where} is a Bundle nested too deep; skipped")
            else:
                _read_bundle(resource, f"{where}", content, depth + 1)
            continue
        if rtype == "OperationOutcome":
            mode = (entry.get("search") or {}).get("mode")
            message = outcome_message(resource) or "no message"
            if outcome_failed(resource):
                # said the same whatever door the record came through: no file name
                content.failures.append(message)
            else:
                kind = "a search outcome" if mode == "outcome" else "an OperationOutcome"
                content.warnings.append(f"{where} is {kind} ({message}); not data")
            continue
        rid = resource.get("id")
        full_url = entry.get("fullUrl")
        if not isinstance(rid, str) or not rid:
            if isinstance(full_url, str) and full_url.startswith("urn:uuid:"):
                # A transaction may create resources without ids; the urn:uuid stands in.
                rid = full_url.removeprefix("urn:uuid:")
                resource = {**resource, "id": rid}
            else:
                content.warnings.append(f"{source}: Bundle.entry[{i}] {rtype} has no id")
                continue
        if isinstance(full_url, str):
            content.aliases[full_url] = f"{rtype}/{rid}"
        content.resources.append(resource)


def failed_search_reason(failures: list[str]) -> str:
    """The sentence a criterion fed by a failed search explains itself with."""
    return (
        "A search for this patient's data reported an error ("
        + "; ".join(failures[:2])
        + "), so what is on record may be incomplete; a complete search would decide it."
    )


class PatientSorter:
    """Resources from one or more Bundles sorted into per-patient record builders.

    Clinical resources go to the builder of the patient they name; Medications (which name no
    patient) go to every builder, so references resolve wherever the Medication came from.
    A file's failed searches make every record read from that file incomplete.
    """

    def __init__(self, index: RecordIndex) -> None:
        self.index = index
        self.patients: dict[str, dict[str, Any]] = {}
        self.builders: dict[str, RecordBuilder] = {}
        #: every Medication met, by ``Medication/id`` and by the fullUrls that name it
        self.medications: dict[str, dict[str, Any]] = {}
        #: notes about the input as a whole (a file without a Patient, say)
        self.notes: list[str] = []
        #: a file's notes, for the records of the patients read from it
        self.notes_of: dict[str, list[str]] = {}
        self.failures: dict[str, list[str]] = {}

    def add(self, content: BundleContent, *, source: str) -> int:
        """Sort one Bundle's content; the number of Patients it holds."""
        aliases = content.aliases
        by_target: dict[str, list[str]] = {}
        for alias, target in aliases.items():
            by_target.setdefault(target, []).append(alias)
        patients = 0
        orphans = 0
        touched: set[str] = set()
        for resource in content.resources:
            rtype = resource["resourceType"]
            if rtype == "Patient":
                ref = f"Patient/{resource['id']}"
                self.patients.setdefault(ref, resource)
                self._builder(ref)
                touched.add(ref)
                patients += 1
            elif rtype == "Medication":
                ref = f"Medication/{resource['id']}"
                self.medications[ref] = resource
                for alias in by_target.get(ref, ()):
                    self.medications[alias] = resource
            elif rtype in CLINICAL_TYPES:
                named = patient_reference(resource, aliases)
                if named is None:
                    orphans += 1
                    continue
                self._builder(named).add(resource)
                touched.add(named)
        notes = list(content.warnings)
        if orphans:
            notes.append(f"{source}: {orphans} clinical resource(s) name no patient; ignored")
        if notes:
            for ref in touched:
                self.notes_of.setdefault(ref, []).extend(notes)
            if not touched:
                self.notes += notes
        if content.failures:
            for ref in touched:
                self.failures.setdefault(ref, []).extend(content.failures)
        return patients

    def _builder(self, ref: str) -> RecordBuilder:
        builder = self.builders.get(ref)
        if builder is None:
            builder = self.builders[ref] = RecordBuilder(self.index)
        return builder

    def records(self) -> Iterator[PatientRecord]:
        """One record per Patient, in the order the Patients were first met; each builder is
        let go once its record is built."""
        for ref in list(self.builders):
            if ref not in self.patients:
                count = len(self.builders[ref]._entries) + len(self.builders[ref]._pending)
                self.notes.append(
                    f"{count} relevant resource(s) for {ref}, whose Patient is absent"
                )
                del self.builders[ref]
        for ref, patient in self.patients.items():
            builder = self.builders.pop(ref)
            failures = self.failures.get(ref)
            incomplete = (
                dict.fromkeys(CLINICAL_TYPES, failed_search_reason(failures)) if failures else None
            )
            yield builder.build(
                patient,
                warnings=self.notes_of.pop(ref, None),
                incomplete=incomplete,
                medications=self.medications,
            )


def records_from_bundle(
    bundle: Any, index: RecordIndex, *, source: str = "bundle"
) -> list[PatientRecord]:
    """Every patient's record in one Bundle, indexed for ``index`` (the trials)."""
    sorter = PatientSorter(index)
    if not sorter.add(bundle_resources(bundle, source=source), source=source):
        raise InputError("no Patient resource in the Bundle", source=source)
    return list(sorter.records())
