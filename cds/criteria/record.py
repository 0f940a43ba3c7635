"""One patient's FHIR resources, filtered by status and indexed by code for the rules to query."""

from __future__ import annotations

import calendar
import logging
import re
from collections import ChainMap, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from functools import cache, cached_property, lru_cache
from typing import Any, Literal, Protocol

from cds.criteria.reads import (
    CLINICAL_TYPES,
    MEDICATION_TYPES,
    PATIENT_REFERENCE_ELEMENTS,
    UNCODED_TYPES,
)
from cds.criteria.texts import TextSignal, texts_of
from cds.criteria.valuesets import ValueSet, normalize_coding

log = logging.getLogger(__name__)

CodingKey = tuple[str, str]

__all__ = [
    "CLINICAL_TYPES",
    "MEDICATION_TYPES",
    "SEX_ELEMENTS",
    "DateRange",
    "Entry",
    "PatientRecord",
]
_CLINICAL = frozenset(CLINICAL_TYPES)
_UNCODED = frozenset(UNCODED_TYPES)
_MEDICATION = frozenset(MEDICATION_TYPES)

# Records in these states never count (FHIR R4 value sets observation-status, event-status,
# medicationrequest-status, medication-statement-status, medication-admin-status,
# medicationdispense-status, condition-ver-status). A procedure in "preparation" and a
# medication "intended" have not happened yet, so they are not history either.
_VOID_STATUS = {
    "Observation": {"entered-in-error", "cancelled"},
    "Procedure": {"entered-in-error", "not-done", "preparation"},
    "MedicationRequest": {"entered-in-error", "cancelled", "draft"},
    "MedicationStatement": {"entered-in-error", "not-taken", "intended"},
    "MedicationAdministration": {"entered-in-error", "not-done"},
    "MedicationDispense": {"entered-in-error", "cancelled", "declined"},
}
_VOID_VERIFICATION = {"entered-in-error", "refuted"}
# A MedicationRequest that is only a proposal, plan or option is not an order that was given.
_NON_ORDER_INTENTS = {"proposal", "plan", "option"}

_DATE_RE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")


@dataclass(frozen=True, slots=True)
class DateRange:
    """The span a possibly partial FHIR date covers ("2024" covers the whole year)."""

    start: date
    end: date
    #: the text form, kept once worked out: explanations print the same dates again and again
    _text: str | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        text = self._text
        if text is None:
            if self.start == self.end:
                text = self.start.isoformat()
            elif self.start.month == 1 and self.start.day == 1 and self.end.month == 12:
                text = str(self.start.year)
            else:
                text = self.start.isoformat()[:7]
            object.__setattr__(self, "_text", text)
        return text


def parse_date(value: Any) -> DateRange | None:
    """Parse the date part of a FHIR date/dateTime/instant; ``None`` if absent or unreadable.

    The date is taken as written (local to the source system): eligibility windows are
    counted in days, and shifting a timestamp to UTC could move it across midnight.
    """
    if not isinstance(value, str):
        return None
    # A population repeats a few thousand distinct dates; each string is parsed once.
    try:
        return _PARSED_DATES[value]
    except KeyError:
        pass
    parsed = _parse_date(value)
    if len(_PARSED_DATES) < 1 << 16:
        _PARSED_DATES[value] = parsed
    return parsed


_PARSED_DATES: dict[str, DateRange | None] = {}


def _parse_date(value: str) -> DateRange | None:
    m = _DATE_RE.match(value)
    if not m:
        return None
    try:
        year = int(m.group(1))
        if m.group(3):
            d = date(year, int(m.group(2)), int(m.group(3)))
            return DateRange(d, d)
        if m.group(2):
            month = int(m.group(2))
            last_day = calendar.monthrange(year, month)[1]
            return DateRange(date(year, month, 1), date(year, month, last_day))
        return DateRange(date(year, 1, 1), date(year, 12, 31))
    except ValueError:
        return None


_INSTANT_RE = re.compile(
    r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(Z|[+-]\d{2}:\d{2})?$"
)


@lru_cache(maxsize=1 << 16)
def parse_instant(value: str) -> float | None:
    """Seconds since the epoch of a FHIR dateTime with a time of day (its zone applied; FHIR
    requires one with a time, so a missing zone is read as UTC), ``None`` for a date alone.
    Orders results taken on the same day (before and after a transfusion, say)."""
    m = _INSTANT_RE.match(value)
    if not m:
        return None
    text = value if m.group(1) else value + "Z"
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment.astimezone(UTC).timestamp()


def _first_value(resource: dict[str, Any], paths: tuple[tuple[str, ...], ...]) -> Any:
    for path in paths:
        value: Any = resource.get(path[0])
        for part in path[1:]:
            value = value.get(part) if isinstance(value, dict) else None
        if parse_date(value):
            return value
    return None


def _first_date(resource: dict[str, Any], paths: tuple[tuple[str, ...], ...]) -> DateRange | None:
    """The first readable date among element paths (("effectivePeriod", "start"), ...)."""
    for path in paths:
        value: Any = resource.get(path[0])
        for part in path[1:]:
            value = value.get(part) if isinstance(value, dict) else None
        found = parse_date(value)
        if found:
            return found
    return None


# Where each resource type keeps the date a rule cares about, and the end of its period.
_DATE_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "Condition": (
        ("onsetDateTime", "onsetPeriod.start", "recordedDate"),
        ("abatementDateTime", "abatementPeriod.end"),
    ),
    "Observation": (
        ("effectiveDateTime", "effectivePeriod.start", "effectiveInstant", "issued"),
        (),
    ),
    "Procedure": (("performedDateTime", "performedPeriod.start"), ("performedPeriod.end",)),
    "MedicationRequest": (("authoredOn",), ("dispenseRequest.validityPeriod.end",)),
    "MedicationDispense": (("whenHandedOver", "whenPrepared"), ()),
    "MedicationStatement": (
        ("effectiveDateTime", "effectivePeriod.start", "dateAsserted"),
        ("effectivePeriod.end",),
    ),
    "MedicationAdministration": (
        ("effectiveDateTime", "effectivePeriod.start"),
        ("effectivePeriod.end",),
    ),
    "AllergyIntolerance": (("onsetDateTime", "onsetPeriod.start", "recordedDate"), ()),
    "ResearchSubject": (("period.start",), ("period.end",)),
}
#: the same paths, split at their dots once
_DATE_PATHS = {
    rtype: tuple(tuple(tuple(path.split(".")) for path in paths) for paths in pair)
    for rtype, pair in _DATE_FIELDS.items()
}


def codings_of(concept: Any) -> list[CodingKey]:
    """The normalised (system, code) pairs of a CodeableConcept, tolerating malformed shapes."""
    if not isinstance(concept, dict):
        return []
    codings = concept.get("coding")
    if not isinstance(codings, list):
        return []
    return [
        normalize_coding(c["system"], c["code"])
        for c in codings
        if isinstance(c, dict)
        and isinstance(c.get("system"), str)
        and isinstance(c.get("code"), str)
    ]


def concept_keys(concept: Any) -> tuple[CodingKey, ...]:
    """:func:`codings_of` as a tuple; the usual one-coding concept is worked out once per code
    (an index reads a few dozen resources a patient, all coded alike)."""
    if type(concept) is dict:
        coding = concept.get("coding")
        if type(coding) is list and len(coding) == 1 and type(coding[0]) is dict:
            system, code = coding[0].get("system"), coding[0].get("code")
            if type(system) is str and type(code) is str:
                return _one_key(system, code)
    return tuple(codings_of(concept))


@lru_cache(maxsize=1 << 16)
def _one_key(system: str, code: str) -> tuple[CodingKey]:
    return (normalize_coding(system, code),)


def concept_display(concept: Any) -> str | None:
    if not isinstance(concept, dict):
        return None
    if isinstance(concept.get("text"), str):
        return str(concept["text"])
    for c in concept.get("coding") or []:
        if isinstance(c, dict) and isinstance(c.get("display"), str):
            return str(c["display"])
    return None


def _status_code(concept: Any) -> str | None:
    keys = codings_of(concept)
    return keys[0][1] if keys else None


class Entry:
    """One clinical resource as the rules see it.

    Only the codes are read up front; dates and display are read on first use, because most
    of a large record never matches a criterion (a bundle of 2,000 Observations matches a few
    dozen).
    """

    __slots__ = (
        "ref",
        "type",
        "resource",
        "source",
        "keys",
        "fallback_displays",
        "_concept",
        "_when",
        "_until",
        "_display",
        "_instant",
        "named",
    )

    def __init__(
        self,
        ref: str,
        rtype: str,
        resource: dict[str, Any],
        keys: tuple[CodingKey, ...],
        concept: Any,
        source: dict[str, Any] | None = None,
    ) -> None:
        self.ref = ref  # "Observation/abc"
        self.type = rtype
        #: what the rules read: the resource, or for one component of an Observation the
        #: resource with that component's code, value and reference range in its place
        self.resource = resource
        #: the resource as sent (validated when it decides a criterion)
        self.source = resource if source is None else source
        self.keys = keys  # normalised codes of its code (the drug's code for medications)
        self._concept = concept  # the CodeableConcept the keys came from
        self._when: DateRange | None | bool = False  # False: not read yet
        self._until: DateRange | None | bool = False
        self._display: str | None | bool = False
        self._instant: float | None | Literal[False] = False
        #: displays by code of the value set that selected it, for a record without one
        self.fallback_displays: dict[CodingKey, str] | None = None
        #: the ids of the text signals its words match
        self.named: tuple[str, ...] = ()

    @property
    def when(self) -> DateRange | None:
        """The clinically relevant date: effective, onset, performed, authored, ..."""
        if self._when is False:
            self._when = _first_date(self.resource, _DATE_PATHS[self.type][0])
        return self._when  # type: ignore[return-value]

    @property
    def instant(self) -> float | None:
        """The moment of its date when the record gives a time of day (UTC seconds)."""
        if self._instant is False:
            value = _first_value(self.resource, _DATE_PATHS[self.type][0])
            self._instant = parse_instant(value) if isinstance(value, str) else None
        return self._instant

    @property
    def until(self) -> DateRange | None:
        """The end of its period (performedPeriod.end, abatement, validity end), if any."""
        if self._until is False:
            self._until = _first_date(self.resource, _DATE_PATHS[self.type][1])
        return self._until  # type: ignore[return-value]

    @property
    def display(self) -> str | None:
        if self._display is False:
            display = concept_display(self._concept)
            if display is None and self.fallback_displays:
                display = next((d for k in self.keys if (d := self.fallback_displays.get(k))), None)
            self._display = display
        return self._display  # type: ignore[return-value]

    @property
    def status(self) -> str | None:
        status = self.resource.get("status")
        return status if isinstance(status, str) else None

    def describe(self) -> str:
        """``"Platelets (Observation/abc)"`` style label for explanations."""
        name = self.display or (self.keys[0][1] if self.keys else self.type)
        return f"{name} ({self.ref})"


def local_reference(reference: str, aliases: Mapping[str, str]) -> str:
    """``Type/id`` for a reference given as Type/id, an absolute URL, or a bundle fullUrl."""
    if reference in aliases:
        return aliases[reference]
    reference = reference.split("/_history/", 1)[0]
    parts = reference.rstrip("/").split("/")
    return "/".join(parts[-2:]) if len(parts) >= 2 else reference


def patient_reference(resource: Mapping[str, Any], aliases: Mapping[str, str]) -> str | None:
    """The ``Patient/id`` a clinical resource belongs to, if it names one."""
    for name in PATIENT_REFERENCE_ELEMENTS:
        value = resource.get(name)
        if isinstance(value, dict) and isinstance(value.get("reference"), str):
            ref = local_reference(value["reference"], aliases)
            if ref.startswith("Patient/"):
                return ref
    return None


class RecordIndex(Protocol):
    """What a record needs from the trials to index a patient's resources
    (:class:`cds.criteria.TrialSet` has it)."""

    def is_relevant(self, key: CodingKey) -> bool:
        """Whether any criterion reads a resource coded ``key``."""
        ...

    def valuesets_of(self, key: CodingKey) -> tuple[str, ...]:
        """The ids of the value sets holding ``key``."""
        ...

    def text_signals_for(self, resource_type: str) -> tuple[TextSignal, ...]:
        """The text signals some criterion looks for in resources of ``resource_type``."""
        ...


#: US Core sex extensions read when Patient.gender is absent or neither male nor female
#: (US Core 6.1 us-core-sex: SNOMED 248153007 male, 248152002 female; US Core
#: us-core-birthsex: M, F)
_SEX_EXTENSIONS = {
    "http://hl7.org/fhir/us/core/StructureDefinition/us-core-sex": "sex",
    "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex": "birth sex",
}
#: the Patient elements the patient's sex is read from
SEX_ELEMENTS = ("gender", "extension")
_SEX_CODES = {
    "248153007": "male",
    "248152002": "female",
    "M": "male",
    "F": "female",
    "male": "male",
    "female": "female",
}


@dataclass
class PatientRecord:
    """A patient's resources, indexed for the rules. Built once, read by every criterion."""

    patient: dict[str, Any]
    entries: dict[str, list[Entry]] = field(default_factory=lambda: defaultdict(list))
    warnings: list[str] = field(default_factory=list)
    #: resource type -> why its data may be incomplete (a search that reported an error):
    #: a criterion reading it cannot pass or fail on what is there
    incomplete: dict[str, str] = field(default_factory=dict)
    _validity: dict[str, str | None] = field(default_factory=dict)
    _match_cache: dict[tuple[tuple[str, ...], str], list[Entry]] = field(default_factory=dict)
    #: entries by the id of each value set holding one of their codes: a selection is a
    #: lookup, not a walk over codes
    _by_valueset: dict[str, list[Entry]] = field(default_factory=lambda: defaultdict(list))
    #: entries by the id of each text signal their words matched
    _by_text: dict[str, list[Entry]] = field(default_factory=lambda: defaultdict(list))
    #: the rules' as-of-filtered, newest-first selections and the measurements read from them
    #: (see rules.Context.entries and rules.latest_measurement)
    selection_cache: dict[Any, Any] = field(default_factory=dict)

    # Read by most criteria, so each is worked out once (a record is never changed once built).
    @cached_property
    def patient_id(self) -> str:
        return str(self.patient.get("id", ""))

    @cached_property
    def patient_ref(self) -> str:
        return f"Patient/{self.patient_id}"

    @cached_property
    def sex(self) -> tuple[str | None, str]:
        """(male | female | None, where it was read): ``gender``, or when that is absent or
        neither male nor female, a US Core sex or birth-sex extension."""
        gender = self.patient.get("gender")
        if gender in ("male", "female"):
            return gender, "gender"
        for ext in self.patient.get("extension") or ():
            if not isinstance(ext, dict) or ext.get("url") not in _SEX_EXTENSIONS:
                continue
            code = ext.get("valueCode")
            if code is None and isinstance(ext.get("valueCoding"), dict):
                code = ext["valueCoding"].get("code")
            if isinstance(code, str) and code in _SEX_CODES:
                return _SEX_CODES[code], _SEX_EXTENSIONS[ext["url"]]
        return None, "gender"

    @property
    def gender(self) -> str | None:
        return self.sex[0]

    @cached_property
    def birth_date(self) -> DateRange | None:
        return parse_date(self.patient.get("birthDate"))

    def deceased(self) -> tuple[bool | None, DateRange | None]:
        """(recorded as deceased, the date when given): FHIR R4 Patient.deceased[x]; ``None``
        for a death date that cannot be read."""
        if self.patient.get("deceasedBoolean") is True:
            return True, None
        given = self.patient.get("deceasedDateTime")
        if given is None:
            return False, None
        when = parse_date(given)
        return (None, None) if when is None else (True, when)

    @classmethod
    def from_resources(
        cls,
        resources: Iterable[dict[str, Any]],
        index: RecordIndex,
        *,
        patient: dict[str, Any] | None = None,
        warnings: list[str] | None = None,
        aliases: dict[str, str] | None = None,
        incomplete: dict[str, str] | None = None,
    ) -> PatientRecord:
        """Index one patient's resources. ``patient`` defaults to the Patient among them.

        Resources that never count (entered in error, refuted, not done, cancelled) are dropped
        here, so no rule can see them. ``aliases`` maps Bundle fullUrls (urn:uuid:...) to
        ``Type/id`` so that references between resources resolve. ``index`` (the trials)
        says which codes any criterion reads, and in which value sets: resources none of whose
        codes any criterion reads are skipped (most of a large record, and never a change to
        any result), and the rest are indexed by value set, which makes every later selection
        a lookup. An Observation is indexed by its own code and, one entry each, by the codes
        of its components (a panel that carries the analytes as components).
        """
        resources = list(resources)
        if patient is None:
            patients = [r for r in resources if r.get("resourceType") == "Patient"]
            if not patients:
                raise ValueError("no Patient resource among the resources")
            patient = patients[0]
        builder = RecordBuilder(index)
        builder.add_all(resources, aliases)
        return builder.build(patient, warnings=warnings, incomplete=incomplete)

    def may_hold(self, valueset_ids: Sequence[str]) -> bool:
        """False when the record certainly holds no entry of these value sets: most
        selections of most patients' records."""
        return not self._by_valueset.keys().isdisjoint(valueset_ids)

    def matching(self, types: Iterable[str], valueset: ValueSet) -> list[Entry]:
        """Entries of the given types with a code in ``valueset`` (each entry once)."""
        types = tuple(types)
        cache_key = (types, valueset.id)
        cached = self._match_cache.get(cache_key)
        if cached is None:
            cached = [e for e in self._by_valueset.get(valueset.id, ()) if e.type in types]
            self._match_cache[cache_key] = cached
        return cached

    def named_in_text(self, types: Iterable[str], signal_id: str) -> list[Entry]:
        """Entries of the given types whose words match the text signal ``signal_id``."""
        types = tuple(types)
        return [e for e in self._by_text.get(signal_id, ()) if e.type in types]

    def invalid_reason(self, entry: Entry) -> str | None:
        """Why ``entry``'s resource is not a valid FHIR R4 resource, or ``None`` if it is.

        Validation with fhir.resources costs about 25x a JSON parse, so it runs only on the
        resources that decide a criterion, once each.
        """
        if entry.ref in self._validity:
            return self._validity[entry.ref]
        reason = _validate(entry.source)
        self._validity[entry.ref] = reason
        if reason:
            self.warnings.append(f"{entry.ref} skipped: not valid FHIR R4 ({reason})")
        return reason


class RecordBuilder:
    """One patient's record built as its resources arrive, from one Bundle or several files:
    each clinical resource is indexed (or dropped, when no criterion reads it) as it comes, so
    what is held is what the rules read, whatever the size of the input. A medication record
    that names its drug by a reference waits for :meth:`build`, when every Medication has come.
    """

    def __init__(self, index: RecordIndex) -> None:
        self.index = index
        self._entries: list[Entry] = []
        self._pending: list[tuple[str, dict[str, Any]]] = []
        self._medications: dict[str, dict[str, Any]] = {}
        self._aliases: dict[str, str] = {}
        self._seen: set[tuple[str, Any]] = set()
        self.warnings: list[str] = []

    def add_all(
        self, resources: Iterable[dict[str, Any]], aliases: dict[str, str] | None = None
    ) -> None:
        if aliases:
            self._aliases.update(aliases)
        for resource in resources:
            self.add(resource)

    def add(self, resource: dict[str, Any]) -> None:
        rtype = resource.get("resourceType")
        if rtype == "Medication":
            self._medications[f"Medication/{resource.get('id')}"] = resource
            return
        if rtype not in _CLINICAL:
            return
        key = (rtype, resource.get("id"))
        if key[1] is not None:
            if key in self._seen:
                return  # the same resource from two files or two searches: read once
            self._seen.add(key)
        if rtype in _MEDICATION and resource.get("medicationCodeableConcept") is None:
            self._pending.append((rtype, resource))
            return
        self._index(rtype, resource, self._medications)

    def _index(
        self, rtype: str, resource: dict[str, Any], medications: Mapping[str, dict[str, Any]]
    ) -> None:
        try:
            self._entries += _make_entries(
                rtype,
                resource,
                medications,
                self.index.is_relevant,
                self.index.text_signals_for(rtype),
            )
        except (AttributeError, TypeError, ValueError) as exc:
            # The resource's shape is too broken to even read its code: skip it, loudly.
            self.warnings.append(f"{rtype}/{resource.get('id')} skipped: unreadable ({exc})")
            return
        code = resource.get("code")
        if code is not None and type(code) is not dict:
            # a code that is not a CodeableConcept: what it names cannot be known
            self.warnings.append(
                f"{rtype}/{resource.get('id')} skipped: its code is not a CodeableConcept"
            )

    def build(
        self,
        patient: dict[str, Any],
        *,
        warnings: Iterable[str] | None = None,
        incomplete: dict[str, str] | None = None,
        medications: dict[str, dict[str, Any]] | None = None,
    ) -> PatientRecord:
        """The record. ``medications``: Medications shared by many records (every one of a
        set of files), looked up after the builder's own, never copied into it."""
        own = self._medications
        for alias, target in self._aliases.items():
            if target in own:
                own[alias] = own[target]
        resolve: Mapping[str, dict[str, Any]] = ChainMap(own, medications) if medications else own
        for rtype, resource in self._pending:
            self._index(rtype, resource, resolve)
        self._pending.clear()
        record = PatientRecord(
            patient=patient,
            warnings=[*(warnings or ()), *self.warnings],
            incomplete=dict(incomplete or {}),
        )
        memberships = self.index.valuesets_of
        by_valueset = record._by_valueset
        this_patient = f"Patient/{record.patient_id}"
        for entry in self._entries:
            owner = patient_reference(entry.source, self._aliases)
            if owner is not None and owner != this_patient and record.patient_id:
                # Never another patient's data in this record, whichever door brought it (a
                # server that ignores a search's patient parameter answers with everyone's).
                record.warnings.append(f"{entry.ref} skipped: it names another patient")
                continue
            record.entries[entry.type].append(entry)
            keys = entry.keys
            ids = (
                memberships(keys[0])
                if len(keys) == 1
                else {v for key in keys for v in memberships(key)}
            )
            for valueset_id in ids:
                by_valueset[valueset_id].append(entry)
            for signal_id in entry.named:
                record._by_text[signal_id].append(entry)
        return record


# Elements that repeat across a population's resources: a test's code and category, a lab's
# reference range and value, a condition's statuses, a patient's subject reference. Their
# validated model objects are kept, keyed by their repr (exact for JSON values: str, int,
# float, bool and None print apart; the same content in another key order is only a miss),
# and handed to the next validation in place of the raw element; pydantic takes a model
# object for a model-typed field as it is (revalidate_instances="never", the default).
# Validating an element does not depend on the resource around it, so the verdict on the
# resource is the same, at about a third of the cost (tests compare both ways).
_REUSABLE_ELEMENTS = (
    "subject",
    "valueQuantity",
    "code",
    "category",
    "referenceRange",
    "interpretation",
    "method",
    "bodySite",
    "clinicalStatus",
    "verificationStatus",
    "severity",
    "medicationCodeableConcept",
    "meta",
)
_MAX_REUSED = 4096
_validated_elements: dict[tuple[str, str, str], Any] = {}


@cache
def _model_class(resource_type: str) -> Any:
    # Imported here: loading the model classes costs ~0.5 s, paid only when needed.
    from fhir.resources.R4B import get_fhir_model_class

    return get_fhir_model_class(resource_type)


# Top-level elements whose values differ from one resource to the next: its id and metadata,
# the patient and encounter it belongs to, its dates and its measured value. A resource is
# validated in two parts: its *shape* (every other element as it is, and which of these it
# holds, as text or as an object) once per distinct shape, and these elements one by one,
# each with the validator its field has in the resource's model. That is the same verdict:
# pydantic validates each field of a model on its own, and the model-level checks of
# fhir.resources (fhir_core's FHIRAbstractModel: no unknown element, no null in a list of
# complex elements, one value[x] at most, required primitives present) look only at which
# elements are present, which the shape holds. A test compares both ways, broken elements
# included. A population of resources comes in a few hundred shapes, so most validations
# are a lookup and a few small checks (about a third of the cost of the whole).
_VARYING_ELEMENTS = frozenset(
    {
        "id",
        "meta",
        "text",
        "subject",
        "encounter",
        "effectiveDateTime",
        "effectiveInstant",
        "effectivePeriod",
        "issued",
        "valueQuantity",
        "onsetDateTime",
        "onsetPeriod",
        "abatementDateTime",
        "abatementPeriod",
        "recordedDate",
        "performedDateTime",
        "performedPeriod",
        "authoredOn",
        "dateAsserted",
        "whenHandedOver",
        "whenPrepared",
    }
)
_MAX_SHAPES = 4096
_valid_shapes: set[str] = set()


def _validate(resource: dict[str, Any]) -> str | None:
    shape, varying = _shape(resource)
    if shape in _valid_shapes and _each_valid(resource["resourceType"], varying):
        return None
    reason = _validate_whole(resource)
    if reason is None:
        if len(_valid_shapes) >= _MAX_SHAPES:
            _valid_shapes.clear()
        _valid_shapes.add(shape)
    return reason


def _shape(resource: dict[str, Any]) -> tuple[str, list[tuple[str, Any]]]:
    """The resource with its varying elements' values replaced by their kind (the classes
    ``str`` and ``dict``, which no JSON value prints as), and those elements."""
    varying: list[tuple[str, Any]] = []
    parts: list[tuple[str, Any]] = []
    for key, value in resource.items():
        kind = type(value)
        if (kind is str or kind is dict) and key in _VARYING_ELEMENTS:
            varying.append((key, value))
            parts.append((key, kind))
        else:
            parts.append((key, value))
    return repr(parts), varying


def _each_valid(resource_type: str, varying: list[tuple[str, Any]]) -> bool:
    from pydantic import ValidationError

    for name, value in varying:
        validator = _element_validator(resource_type, name)
        if validator is None:
            return False
        key = None
        if type(value) is dict:
            # an object element (subject, meta, period, value) often repeats: checked once
            key = (resource_type, name, repr(value))
            if key in _validated_elements:
                continue
        try:
            validated = validator.validate_python(value)
        except ValidationError:
            return False
        if key is not None:
            _remember_element(key, validated)
    return True


@cache
def _element_validator(resource_type: str, name: str) -> Any:
    """The validator of one top-level element as the resource's model declares it, or
    ``None`` if the model has no such element (or constrains it beyond its type: then the
    whole resource is validated)."""
    from pydantic import TypeAdapter

    for field_name, info in _model_class(resource_type).model_fields.items():
        if (info.alias or field_name) == name:
            return None if info.metadata else TypeAdapter[Any](info.annotation)
    return None


def _remember_element(key: tuple[str, str, str], validated: Any) -> None:
    if len(_validated_elements) >= _MAX_REUSED:
        _validated_elements.clear()
    _validated_elements[key] = validated


def _validate_whole(resource: dict[str, Any]) -> str | None:
    from pydantic import ValidationError

    rtype = resource["resourceType"]
    model = _model_class(rtype)
    given = dict(resource)
    keys: dict[str, tuple[str, str, str]] = {}
    for name in _REUSABLE_ELEMENTS:
        value = resource.get(name)
        if isinstance(value, dict | list):
            key = (rtype, name, repr(value))
            known = _validated_elements.get(key)
            if known is None:
                keys[name] = key
            else:
                given[name] = known
    try:
        validated = model.model_validate(given)
    except ValidationError:
        pass
    else:
        for name, key in keys.items():
            _remember_element(key, getattr(validated, name))
        return None
    # Invalid: validated again as given, so the message is the one fhir.resources gives.
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return f"{where}: {first['msg']}"
    return None  # pragma: no cover - a resource is invalid either way


# The elements of an Observation a component carries in its own right (FHIR R4
# Observation.component: code, value[x], dataAbsentReason, interpretation, referenceRange).
_COMPONENT_ELEMENTS = ("code", "dataAbsentReason", "interpretation", "referenceRange")


def _component_view(resource: dict[str, Any], component: dict[str, Any]) -> dict[str, Any]:
    """The Observation as the rules read one of its components: the component's code, value
    and reference range in place of the Observation's, its status, dates and subject kept."""
    view = {
        k: v
        for k, v in resource.items()
        if k != "component" and not k.startswith("value") and k not in _COMPONENT_ELEMENTS
    }
    view.update(
        (k, v) for k, v in component.items() if k.startswith("value") or k in _COMPONENT_ELEMENTS
    )
    return view


def _make_entries(
    rtype: str,
    resource: dict[str, Any],
    medications: Mapping[str, dict[str, Any]],
    relevant: Callable[[CodingKey], bool],
    signals: tuple[TextSignal, ...] = (),
) -> list[Entry]:
    """The entries a resource gives the rules: those whose codes some criterion reads, or
    (for the types text signals are looked for in) whose words name one (an Entry is made
    only for them: most of a large record is not)."""
    if resource.get("status") in _VOID_STATUS.get(rtype, ()):
        return []
    if rtype in _UNCODED:
        # read for what it is (an enrolment), whatever its codes
        return [Entry(f"{rtype}/{resource.get('id')}", rtype, resource, (), None)]
    if rtype == "Observation":
        concept = resource.get("code")
        keys = concept_keys(concept)
        made = []
        if any(map(relevant, keys)):
            made.append(Entry(f"{rtype}/{resource.get('id')}", rtype, resource, keys, concept))
        components = resource.get("component")
        if type(components) is list:
            for component in components:
                if isinstance(component, dict):
                    inner = component.get("code")
                    inner_keys = concept_keys(inner)
                    if any(map(relevant, inner_keys)):
                        view = _component_view(resource, component)
                        ref = f"{rtype}/{resource.get('id')}"
                        made.append(Entry(ref, rtype, view, inner_keys, inner, resource))
        return made
    if rtype == "Condition":
        if _status_code(resource.get("verificationStatus")) in _VOID_VERIFICATION:
            return []
        concept = resource.get("code")
        found = codings_of(concept)
        # mCODE carries ICD-O-3 morphology (grade, differentiation) in an extension.
        for ext in resource.get("extension") or ():
            if isinstance(ext, dict) and "valueCodeableConcept" in ext:
                found.extend(codings_of(ext["valueCodeableConcept"]))
        keys = tuple(found)
    elif rtype == "Procedure":
        concept = resource.get("code")
        keys = concept_keys(concept)
    elif rtype == "AllergyIntolerance":
        # FHIR R4 AllergyIntolerance: refuted or entered-in-error verification never counts;
        # the substance is ``code`` (clinical and verification status as for a Condition).
        if _status_code(resource.get("verificationStatus")) in _VOID_VERIFICATION:
            return []
        concept = resource.get("code")
        keys = concept_keys(concept)
    else:
        # Medication resources: the drug is a CodeableConcept or a reference to a Medication
        # (contained, or elsewhere in the record).
        if rtype == "MedicationRequest" and resource.get("intent") in _NON_ORDER_INTENTS:
            return []
        concept = resource.get("medicationCodeableConcept")
        if concept is None:
            concept = _resolve_medication(resource, medications)
        keys = concept_keys(concept)
    named = _named(signals, concept) if signals else ()
    if not named and not any(map(relevant, keys)):
        return []
    entry = Entry(f"{rtype}/{resource.get('id')}", rtype, resource, keys, concept)
    entry.named = named
    return [entry]


def _named(signals: tuple[TextSignal, ...], concept: Any) -> tuple[str, ...]:
    texts = texts_of(concept)
    if not texts:
        return ()
    return _signals_named(signals, tuple(texts))


# A population repeats a few thousand distinct texts; each is judged once.
@lru_cache(maxsize=1 << 14)
def _signals_named(signals: tuple[TextSignal, ...], texts: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(s.id for s in signals if s.finds(texts))


def _resolve_medication(
    resource: dict[str, Any], medications: Mapping[str, dict[str, Any]]
) -> dict[str, Any] | None:
    reference = resource.get("medicationReference")
    if not isinstance(reference, dict) or not isinstance(reference.get("reference"), str):
        return None
    target = reference["reference"]
    if target.startswith("#"):
        for contained in resource.get("contained") or []:
            if isinstance(contained, dict) and contained.get("id") == target[1:]:
                code = contained.get("code")
                return code if isinstance(code, dict) else None
        return None
    medication = medications.get(target) or medications.get(
        "Medication/" + target.rsplit("Medication/", 1)[-1]
    )
    code = medication.get("code") if medication else None
    return code if isinstance(code, dict) else None
