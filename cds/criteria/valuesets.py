"""FHIR ValueSet files loaded into fast code matchers (exact codes, ICD-10-CM is-a by prefix)."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema

from cds.criteria.ndc import NDC, normalize_ndc
from cds.errors import DefinitionError

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
ICD10PCS = "http://www.cms.gov/Medicare/Coding/ICD10"
CPT = "http://www.ama-assn.org/go/cpt"
HCPCS = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"

# Both HCPCS Level II URIs are in use: HL7 terminology (THO) names the CMS one canonical, while
# VSAC/eCQM content uses the NLM one (shared/reference/terminology-codes.md §1). We match on one.
SYSTEM_ALIASES = {
    "http://www.nlm.nih.gov/research/umls/hcpcs": HCPCS,
    "urn:oid:2.16.840.1.113883.6.285": HCPCS,
    "urn:oid:2.16.840.1.113883.6.90": ICD10CM,
    "urn:oid:2.16.840.1.113883.6.96": SNOMED,
    "urn:oid:2.16.840.1.113883.6.1": LOINC,
    "urn:oid:2.16.840.1.113883.6.88": RXNORM,
    "urn:oid:2.16.840.1.113883.6.12": CPT,
    "urn:oid:2.16.840.1.113883.6.4": ICD10PCS,
    # the NDC's OID, as FDA structured product labels write it (codeSystem of a product code)
    "urn:oid:2.16.840.1.113883.6.69": NDC,
}

KNOWN_SYSTEMS = frozenset(
    {
        LOINC,
        SNOMED,
        ICD10CM,
        ICD10PCS,
        CPT,
        HCPCS,
        RXNORM,
        "http://terminology.hl7.org/CodeSystem/icd-o-3",
        "http://www.whocc.no/atc",
    }
)

_SCHEMA_DIR = Path(__file__).parent / "schema"


# Memoised: a population repeats a few thousand codes, and every resource read asks.
@functools.lru_cache(maxsize=1 << 16)
def normalize_coding(system: str, code: str) -> tuple[str, str]:
    """The (system, code) key codes are matched on.

    ICD-10-CM is compared without its dot, because some EHR and claims feeds send C7B02 for
    C7B.02 (terminology-codes.md §8 rule 1); a package NDC as its 11-digit form, because
    systems send the label's hyphenated 10-digit form or the 11-digit billing form
    (cds/criteria/ndc.py); other systems' codes are compared exactly.
    """
    system = SYSTEM_ALIASES.get(system, system)
    code = code.strip()
    if system == ICD10CM:
        code = code.replace(".", "").upper()
    elif system == NDC:
        code = normalize_ndc(code) or code
    return system, code


@dataclass(frozen=True, slots=True)
class ValueSet:
    """One value set: explicit codes plus ICD-10-CM is-a families matched by prefix."""

    id: str
    title: str
    version: str
    codes: frozenset[tuple[str, str]]
    #: ICD-10-CM family prefixes (dotless) from ``filter: concept is-a X``
    prefixes: tuple[tuple[str, str], ...]
    displays: dict[tuple[str, str], str]

    def contains(self, system: str, code: str) -> bool:
        key = normalize_coding(system, code)
        if key in self.codes:
            return True
        return any(key[0] == s and key[1].startswith(p) for s, p in self.prefixes)

    def contains_key(self, key: tuple[str, str]) -> bool:
        """Like :meth:`contains` for a key already passed through :func:`normalize_coding`."""
        if key in self.codes:
            return True
        if not self.prefixes:
            return False
        return any(key[0] == s and key[1].startswith(p) for s, p in self.prefixes)

    def display(self, system: str, code: str) -> str | None:
        return self.displays.get(normalize_coding(system, code))


def _load_schema(name: str) -> dict[str, Any]:
    with open(_SCHEMA_DIR / name, encoding="utf-8") as f:
        schema: dict[str, Any] = json.load(f)
    return schema


def _path_of(error: jsonschema.ValidationError) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)[1:]


def parse_valueset(data: Any, *, file: str) -> ValueSet:
    """Validate one ValueSet document and build its matcher; errors name the file and field."""
    validator = jsonschema.Draft202012Validator(_load_schema("valueset.schema.json"))
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        raise DefinitionError(first.message, file=file, field=_path_of(first) or "(root)")
    codes: set[tuple[str, str]] = set()
    prefixes: list[tuple[str, str]] = []
    displays: dict[tuple[str, str], str] = {}
    for i, include in enumerate(data["compose"]["include"]):
        system = include["system"]
        if SYSTEM_ALIASES.get(system, system) not in KNOWN_SYSTEMS:
            raise DefinitionError(
                f"unknown code system {system!r}", file=file, field=f"compose.include[{i}].system"
            )
        for concept in include.get("concept", []):
            key = normalize_coding(system, concept["code"])
            codes.add(key)
            displays[key] = concept.get("display", concept["code"])
        for j, flt in enumerate(include.get("filter", [])):
            if normalize_coding(system, "")[0] != ICD10CM or flt["op"] != "is-a":
                # Subsumption needs a terminology server for every system but ICD-10-CM, whose
                # codes are hierarchical by construction; refuse rather than silently match less.
                raise DefinitionError(
                    "only ICD-10-CM 'is-a' filters are supported",
                    file=file,
                    field=f"compose.include[{i}].filter[{j}]",
                )
            prefixes.append(normalize_coding(system, flt["value"]))
    return ValueSet(
        id=data["id"],
        title=data.get("title", data["id"]),
        version=data.get("version", ""),
        codes=frozenset(codes),
        prefixes=tuple(prefixes),
        displays=displays,
    )


def load_valuesets(directory: Path) -> dict[str, ValueSet]:
    """Every ``*.json`` ValueSet in ``directory``, keyed by id (which must match the file name)."""
    valuesets: dict[str, ValueSet] = {}
    for path in sorted(directory.glob("*.json")):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            raise DefinitionError(f"not valid JSON ({exc})", file=str(path)) from exc
        vs = parse_valueset(data, file=str(path))
        if vs.id != path.stem:
            raise DefinitionError(
                f"id {vs.id!r} does not match the file name", file=str(path), field="id"
            )
        valuesets[vs.id] = vs
    return valuesets
