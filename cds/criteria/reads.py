"""What a rule kind reads, declared once beside its code.

Every rule kind in ``cds/criteria/rules.py`` is registered with :func:`rule_kind`, which names
its parameters (each with its JSON Schema and, for value sets and analytes, the resource types
they are matched against) and what it reads whatever its parameters (fixed value sets,
analytes, Patient elements). Everything that must agree with the rules is derived from these
declarations: the trial schema's ``rule`` branches (:func:`rule_schema`), the load-time checks
of a definition (:meth:`RuleKind.check`), the value sets matched per resource type (hence the
relevance filter, the FHIR queries and prefetch templates, the Bulk ``_type`` list and the
NDJSON prefilter), and the discovery text. A test traces every rule's lookups against its
declaration, so a rule that reads something it did not declare fails a test, not a patient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cds.criteria.units import Analyte

#: the medication resource types, each naming its drug as a concept or a Medication reference
MEDICATION_TYPES = (
    "MedicationRequest",
    "MedicationStatement",
    "MedicationAdministration",
    "MedicationDispense",
)
#: where a clinical resource names its patient (FHIR R4 Patient compartment): most in
#: ``subject`` or ``patient``, ResearchSubject in ``individual``
PATIENT_REFERENCE_ELEMENTS = ("subject", "patient", "individual")
#: resources a rule reads for what they are, not for a code: the patient's enrolment in a
#: research study (FHIR R4 ResearchSubject, the patient in ``individual``)
UNCODED_TYPES = ("ResearchSubject",)
#: every clinical resource type a rule may read, in the order records present them
CLINICAL_TYPES = (
    "Condition",
    "Procedure",
    "Observation",
    *MEDICATION_TYPES,
    "AllergyIntolerance",
    *UNCODED_TYPES,
)
#: resources the clinical ones point to and the rules read through them: a medication
#: record's ``medicationReference`` (FHIR R4 MedicationRequest.medication[x] and its siblings)
REFERENCED_TYPES = ("Medication",)
#: every resource type a record is built from: the patient, what the rules read, and what
#: those reference
RECORD_TYPES = ("Patient", *CLINICAL_TYPES, *REFERENCED_TYPES)


@dataclass(frozen=True)
class Param:
    """One parameter of a rule kind.

    ``role`` says what the value names: ``valuesets`` (a list of value-set ids matched
    against ``reads``), ``texts`` (a list of text-signal ids, ``cds/criteria/texts.py``,
    looked for in ``reads``), ``analyte`` (an analyte id: its value set is read from Observations),
    ``rule`` (a nested rule of kind ``nested``) or ``value`` (anything else).
    """

    name: str
    schema: Mapping[str, Any]
    required: bool = False
    role: str = "value"
    reads: tuple[str, ...] = ()
    nested: str | None = None


def valuesets_param(name: str, reads: Iterable[str], *, required: bool = False) -> Param:
    return Param(
        name,
        {"$ref": "#/$defs/valuesets"},
        required=required,
        role="valuesets",
        reads=tuple(reads),
    )


def texts_param(name: str, reads: Iterable[str]) -> Param:
    return Param(
        name,
        {"type": "array", "minItems": 1, "uniqueItems": True, "items": {"type": "string"}},
        role="texts",
        reads=tuple(reads),
    )


def analyte_param(name: str, *, required: bool = False, description: str | None = None) -> Param:
    schema: dict[str, Any] = {"type": "string"}
    if description:
        schema["description"] = description
    return Param(name, schema, required=required, role="analyte", reads=("Observation",))


def value_param(name: str, schema: Mapping[str, Any], *, required: bool = False) -> Param:
    return Param(name, schema, required=required)


def rule_param(name: str, kind: str, *, required: bool = False) -> Param:
    return Param(name, {}, required=required, role="rule", nested=kind)


@dataclass(frozen=True)
class RuleKind:
    """A rule kind: its function, its parameters and what it reads besides them."""

    name: str
    func: Callable[..., Any]
    params: tuple[Param, ...]
    #: value sets read whatever the parameters say, by resource type
    fixed_valuesets: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: analytes read whatever the parameters say
    fixed_analytes: tuple[str, ...] = ()
    #: resource types read whole, not by code (``UNCODED_TYPES``)
    fixed_types: tuple[str, ...] = ()
    #: Patient elements read (besides its id, which every result names)
    patient_elements: tuple[str, ...] = ()
    #: at least one of these parameters must be given
    any_of: tuple[str, ...] = ()

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def schema(self) -> dict[str, Any]:
        """This kind's branch of the trial schema's ``rule`` definition."""
        properties: dict[str, Any] = {"type": True}
        for p in self.params:
            properties[p.name] = (
                {"$ref": f"#/$defs/rule_{p.nested}"} if p.role == "rule" else dict(p.schema)
            )
        branch: dict[str, Any] = {
            "additionalProperties": False,
            "required": ["type", *(p.name for p in self.params if p.required)],
            "properties": properties,
        }
        if self.any_of:
            branch["anyOf"] = [{"required": [name]} for name in self.any_of]
        return branch

    def reads(
        self, rule: Mapping[str, Any], analytes: Mapping[str, Analyte]
    ) -> dict[str, set[str]]:
        """Resource type -> the value sets a rule of this kind with these parameters reads."""
        by_type: dict[str, set[str]] = {}

        def add(types: Iterable[str], ids: Iterable[str]) -> None:
            kept = tuple(ids)
            if not kept:
                return
            for t in types:
                by_type.setdefault(t, set()).update(kept)

        for rtype, ids in self.fixed_valuesets.items():
            add((rtype,), ids)
        analyte_ids = list(self.fixed_analytes)
        for p in self.params:
            if p.name not in rule:
                continue
            if p.role == "valuesets":
                add(p.reads, rule[p.name])
            elif p.role == "analyte":
                analyte_ids.append(rule[p.name])
            elif p.role == "rule" and p.nested is not None:
                for rtype, inner in RULE_KINDS[p.nested].reads(rule[p.name], analytes).items():
                    add((rtype,), inner)
        add(("Observation",), (analytes[a].valueset for a in analyte_ids if a in analytes))
        for rtype in self.fixed_types:
            by_type.setdefault(rtype, set())
        return by_type

    def texts_read(self, rule: Mapping[str, Any]) -> dict[str, set[str]]:
        """Resource type -> the text signals a rule of this kind with these parameters looks
        for."""
        by_type: dict[str, set[str]] = {}
        for p, given, _ in self.walk(rule, ""):
            if p.role == "texts":
                for t in p.reads:
                    by_type.setdefault(t, set()).update(given)
        return by_type

    def patient_elements_read(self, rule: Mapping[str, Any]) -> frozenset[str]:
        """The Patient elements a rule of this kind reads, its nested rules' included."""
        found = set(self.patient_elements)
        for p in self.params:
            if p.name in rule and p.role == "rule" and p.nested is not None:
                found |= RULE_KINDS[p.nested].patient_elements_read(rule[p.name])
        return frozenset(found)

    def walk(self, rule: Mapping[str, Any], where: str) -> Iterator[tuple[Param, Any, str]]:
        """Every (parameter, value, path) of a rule, nested rules included."""
        for p in self.params:
            if p.name not in rule:
                continue
            path = f"{where}.{p.name}"
            if p.role == "rule" and p.nested is not None:
                yield from RULE_KINDS[p.nested].walk(rule[p.name], path)
            else:
                yield p, rule[p.name], path


#: every rule kind, by name, in the order registered
RULE_KINDS: dict[str, RuleKind] = {}


def rule_kind(
    name: str,
    *params: Param,
    fixed_valuesets: Mapping[str, tuple[str, ...]] | None = None,
    fixed_analytes: tuple[str, ...] = (),
    patient_elements: tuple[str, ...] = (),
    any_of: tuple[str, ...] = (),
    fixed_types: tuple[str, ...] = (),
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated function as rule kind ``name`` with its declaration."""

    def register(func: Callable[..., Any]) -> Callable[..., Any]:
        if name in RULE_KINDS:
            raise ValueError(f"rule kind {name!r} declared twice")
        RULE_KINDS[name] = RuleKind(
            name,
            func,
            tuple(params),
            dict(fixed_valuesets or {}),
            fixed_analytes,
            fixed_types,
            patient_elements,
            any_of,
        )
        return func

    return register


#: what a manual criterion's ``related`` value sets are matched against (rules.related_on_record)
RELATED_TYPES = ("Condition", "Procedure", "Observation")


def rule_schema() -> dict[str, Any]:
    """The trial schema's ``rule`` definitions, built from the declarations."""
    defs: dict[str, Any] = {
        "rule": {
            "type": "object",
            "required": ["type"],
            "properties": {"type": {"enum": list(RULE_KINDS)}},
            "allOf": [
                {"if": {"properties": {"type": {"const": kind.name}}}, "then": kind.schema()}
                for kind in RULE_KINDS.values()
            ],
        }
    }
    for kind in RULE_KINDS.values():
        for p in kind.params:
            if p.role == "rule" and p.nested is not None:
                inner = RULE_KINDS[p.nested]
                schema = inner.schema()
                schema["properties"]["type"] = {"const": inner.name}
                defs[f"rule_{inner.name}"] = {"type": "object", **schema}
    return defs
