"""FHIR R4 Bundles (searchset, collection, transaction, batch) split into per-patient records."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from cds.criteria.reads import CLINICAL_TYPES
from cds.criteria.record import PatientRecord
from cds.errors import InputError

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
# Where each clinical resource names its patient (FHIR R4: Patient compartment definition).
_PATIENT_FIELDS = ("subject", "patient")


def _local_reference(reference: str, aliases: dict[str, str]) -> str:
    """``Type/id`` for a reference given as Type/id, an absolute URL, or a bundle fullUrl."""
    if reference in aliases:
        return aliases[reference]
    reference = reference.split("/_history/", 1)[0]
    parts = reference.rstrip("/").split("/")
    return "/".join(parts[-2:]) if len(parts) >= 2 else reference


def patient_reference(resource: dict[str, Any], aliases: dict[str, str]) -> str | None:
    """The ``Patient/id`` a clinical resource belongs to, if it names one."""
    for name in _PATIENT_FIELDS:
        value = resource.get(name)
        if isinstance(value, dict) and isinstance(value.get("reference"), str):
            ref = _local_reference(value["reference"], aliases)
            if ref.startswith("Patient/"):
                return ref
    return None


def bundle_resources(
    bundle: Any, *, source: str
) -> tuple[list[dict[str, Any]], dict[str, str], list[str]]:
    """The resources of a Bundle, the fullUrl aliases (urn:uuid -> Type/id) and warnings."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        found = bundle.get("resourceType") if isinstance(bundle, dict) else type(bundle).__name__
        raise InputError(f"not a FHIR Bundle (resourceType {found!r})", source=source)
    if bundle.get("type") not in _BUNDLE_TYPES:
        raise InputError(f"unsupported Bundle.type {bundle.get('type')!r}", source=source)
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise InputError("Bundle.entry is not a list", source=source)
    resources: list[dict[str, Any]] = []
    aliases: dict[str, str] = {}
    warnings: list[str] = []
    for i, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            warnings.append(f"{source}: Bundle.entry[{i}] has no resource; skipped")
            continue
        if resource["resourceType"] == "OperationOutcome":
            warnings.append(f"{source}: Bundle.entry[{i}] is an OperationOutcome; not data")
            continue
        rid = resource.get("id")
        full_url = entry.get("fullUrl")
        if not isinstance(rid, str) or not rid:
            if isinstance(full_url, str) and full_url.startswith("urn:uuid:"):
                # A transaction may create resources without ids; the urn:uuid stands in.
                rid = full_url.removeprefix("urn:uuid:")
                resource = {**resource, "id": rid}
            else:
                warnings.append(f"{source}: Bundle.entry[{i}] {resource['resourceType']} has no id")
                continue
        if isinstance(full_url, str):
            aliases[full_url] = f"{resource['resourceType']}/{rid}"
        resources.append(resource)
    return resources, aliases, warnings


def group_by_patient(
    resources: Iterable[dict[str, Any]],
    aliases: dict[str, str],
    *,
    source: str,
    warnings: list[str] | None = None,
    relevant: Callable[[tuple[str, str]], bool] | None = None,
) -> Iterator[PatientRecord]:
    """One PatientRecord per Patient, holding the clinical resources that name it.

    Medication resources name no patient; every record gets them so references resolve.
    """
    patients: dict[str, dict[str, Any]] = {}
    by_patient: dict[str, list[dict[str, Any]]] = defaultdict(list)
    shared: list[dict[str, Any]] = []
    orphans = 0
    for resource in resources:
        rtype = resource["resourceType"]
        if rtype == "Patient":
            patients[f"Patient/{resource['id']}"] = resource
        elif rtype == "Medication":
            shared.append(resource)
        elif rtype in CLINICAL_TYPES:
            ref = patient_reference(resource, aliases)
            if ref is None:
                orphans += 1
            else:
                by_patient[ref].append(resource)
    if not patients:
        raise InputError("no Patient resource in the Bundle", source=source)
    notes = list(warnings or [])
    if orphans:
        notes.append(f"{source}: {orphans} clinical resource(s) name no patient; ignored")
    for ref in by_patient.keys() - patients.keys():
        notes.append(f"{source}: {len(by_patient[ref])} resource(s) for {ref}, not in the Bundle")
    for ref, patient in patients.items():
        yield PatientRecord.from_resources(
            [*by_patient.get(ref, []), *shared],
            patient=patient,
            warnings=notes,
            aliases=aliases,
            relevant=relevant,
        )


def records_from_bundle(
    bundle: Any,
    *,
    source: str = "bundle",
    relevant: Callable[[tuple[str, str]], bool] | None = None,
) -> list[PatientRecord]:
    """Every patient's record in one Bundle. ``relevant`` (:meth:`TrialSet.is_relevant`)
    drops what no criterion reads."""
    resources, aliases, warnings = bundle_resources(bundle, source=source)
    return list(
        group_by_patient(resources, aliases, source=source, warnings=warnings, relevant=relevant)
    )
