"""Evidence as a clinician reads it: a criterion's FHIR references turned into value, unit, date,
reference range and status, and the engine's sentences without FHIR ids in them.

Cards and the screening page show the same facts; both read them from the resources the
evaluation cited (``CriterionResult.evidence``), never by judging anything again.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any

__all__ = ["EvidenceItem", "describe", "index_resources", "resource_date", "without_ids"]

JSONDict = dict[str, Any]

# "Type/id" with an R4 id ([A-Za-z0-9\-.]{1,64}).
_REF = r"[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}"
# " (Observation/x)" and " (Observation/x: why it could not be read)"
_PAREN_REF = re.compile(rf"\s?\({_REF}(?:[:;][^()]*)?\)")
# ", Patient/x" inside a parenthesis: "(born 1968-05-14, Patient/x)"
_LISTED_REF = re.compile(rf",\s*{_REF}")
_PATIENT_REF = re.compile(r"\bPatient/[A-Za-z0-9\-.]{1,64}")
_ANY_REF = re.compile(rf"\b{_REF}\b")

# Where each type keeps its clinically meaningful date (FHIR R4), first present wins.
_DATE_FIELDS = (
    "effectiveDateTime",
    "effectivePeriod",
    "effectiveInstant",
    "issued",
    "performedDateTime",
    "performedPeriod",
    "onsetDateTime",
    "onsetPeriod",
    "recordedDate",
    "authoredOn",
    "dateAsserted",
    "birthDate",
)
_CODE_FIELDS = ("code", "medicationCodeableConcept", "vaccineCode")


def without_ids(text: str) -> str:
    """The engine's sentence for a clinician: no FHIR ids (they are one click away on the page).

    ``(Observation/x)`` goes, ``(born …, Patient/x)`` keeps what is not an id, and a bare
    ``Patient/x`` becomes "the patient".
    """
    text = _PAREN_REF.sub("", text)
    text = _LISTED_REF.sub("", text)
    text = _PATIENT_REF.sub("the patient", text)
    text = _ANY_REF.sub("", text)
    return " ".join(text.split()).replace(" ,", ",").replace(" ;", ";").replace(" .", ".")


def _concept(concept: Any) -> str | None:
    if not isinstance(concept, Mapping):
        return None
    text = concept.get("text")
    if isinstance(text, str) and text.strip():
        return text.strip()
    for coding in concept.get("coding") or []:
        if isinstance(coding, Mapping) and isinstance(coding.get("display"), str):
            return str(coding["display"])
    for coding in concept.get("coding") or []:
        if isinstance(coding, Mapping) and coding.get("code"):
            return str(coding["code"])
    return None


def _quantity(q: Any) -> str | None:
    if not isinstance(q, Mapping) or q.get("value") is None:
        return None
    unit = q.get("unit") or q.get("code") or ""
    if unit.startswith("{") or unit == "1":
        unit = ""  # UCUM annotations ({INR}) and unity are not units a reader needs
    comparator = q.get("comparator") or ""
    return f"{comparator}{q['value']} {unit}".strip()


def _value(resource: Mapping[str, Any]) -> str | None:
    for key, value in resource.items():
        if not key.startswith("value"):
            continue
        if key == "valueQuantity":
            return _quantity(value)
        if key == "valueCodeableConcept":
            return _concept(value)
        if key in ("valueString", "valueBoolean", "valueInteger", "valueDateTime"):
            return str(value)
    return None


def _date_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value[:10]
    if isinstance(value, Mapping):
        start = value.get("start") or value.get("end")
        return str(start)[:10] if start else None
    return None


def resource_date(resource: Mapping[str, Any]) -> date | None:
    """The date the resource is about (its effective/performed/onset/recorded date), if any."""
    for name in _DATE_FIELDS:
        text = _date_text(resource.get(name))
        if text:
            try:
                return date.fromisoformat(text) if len(text) == 10 else None
            except ValueError:
                return None
    return None


def _range(resource: Mapping[str, Any]) -> str | None:
    for rr in resource.get("referenceRange") or []:
        if not isinstance(rr, Mapping):
            continue
        if isinstance(rr.get("text"), str):
            return str(rr["text"])
        low, high = _quantity(rr.get("low")), _quantity(rr.get("high"))
        if low and high:
            low_number = low.split(" ")[0]
            return f"{low_number}–{high}"
        if high:
            return f"≤ {high}"
        if low:
            return f"≥ {low}"
    return None


def _status(resource: Mapping[str, Any]) -> str | None:
    for name in ("verificationStatus", "clinicalStatus"):
        shown = _concept(resource.get(name))
        if shown:
            return shown
    status = resource.get("status")
    return str(status) if isinstance(status, str) else None


@dataclass(frozen=True, slots=True)
class EvidenceItem:
    """One cited resource, as the page shows it."""

    reference: str  # "Observation/abc": the link target, never shown as prose
    resource_type: str
    name: str
    value: str | None
    date: str | None
    reference_range: str | None
    status: str | None


def describe(reference: str, resource: Mapping[str, Any] | None) -> EvidenceItem:
    """What a cited resource says; a reference the fetch did not return stays a bare entry."""
    rtype = reference.split("/", 1)[0]
    if resource is None:
        return EvidenceItem(reference, rtype, rtype, None, None, None, None)
    name = next((shown for field in _CODE_FIELDS if (shown := _concept(resource.get(field)))), None)
    if rtype == "Patient":
        birth = resource.get("birthDate")
        gender = resource.get("gender")
        shown = ", ".join(str(v) for v in (f"born {birth}" if birth else None, gender) if v)
        return EvidenceItem(reference, rtype, "Patient", shown or None, None, None, None)
    date_text = next(
        (text for field in _DATE_FIELDS if (text := _date_text(resource.get(field)))), None
    )
    return EvidenceItem(
        reference=reference,
        resource_type=rtype,
        name=name or rtype,
        value=_value(resource),
        date=date_text,
        reference_range=_range(resource),
        status=_status(resource),
    )


def index_resources(resources: Iterable[Mapping[str, Any]]) -> dict[str, JSONDict]:
    """``"Type/id"`` -> resource, for looking evidence up."""
    out: dict[str, JSONDict] = {}
    for r in resources:
        rtype, rid = r.get("resourceType"), r.get("id")
        if isinstance(rtype, str) and isinstance(rid, str):
            out[f"{rtype}/{rid}"] = dict(r)
    return out
