"""UCUM unit normalisation and per-analyte conversion of Observation quantities."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from cds.criteria.valuesets import UCUM

# Spellings EHRs send in Quantity.unit (or as non-UCUM codes) mapped to the UCUM code they mean.
# Keys are lower-cased with micro signs folded to "u"; UCUM codes themselves are case-sensitive,
# so every accepted spelling is listed rather than lower-casing the comparison.
_SYNONYMS = {
    "mg/dl": "mg/dL",
    "mg/l": "mg/L",
    "g/dl": "g/dL",
    "g/l": "g/L",
    "umol/l": "umol/L",
    "mmol/l": "mmol/L",
    "u/l": "U/L",
    "iu/l": "[IU]/L",
    "[iu]/l": "[IU]/L",
    "ukat/l": "ukat/L",
    "10*3/ul": "10*3/uL",
    "10^3/ul": "10*3/uL",
    "x10^3/ul": "10*3/uL",
    "x10*3/ul": "10*3/uL",
    "10e3/ul": "10*3/uL",
    "x10e3/ul": "10*3/uL",
    "k/ul": "10*3/uL",
    "thou/ul": "10*3/uL",
    "10*3/mm3": "10*3/mm3",
    "10^3/mm3": "10*3/mm3",
    "k/mm3": "10*3/mm3",
    "thou/mm3": "10*3/mm3",
    "10*9/l": "10*9/L",
    "10^9/l": "10*9/L",
    "x10^9/l": "10*9/L",
    "x10*9/l": "10*9/L",
    "/ul": "/uL",
    "{cells}/ul": "/uL",
    "cells/ul": "/uL",
    "/mm3": "/mm3",
    "/l": "/L",
    "%": "%",
    "1": "1",
    "{inr}": "1",
    "{ratio}": "1",
    "inr": "1",
    "ratio": "1",
    "s": "s",
    "sec": "s",
    "seconds": "s",
    "kg": "kg",
    "g": "g",
    "[lb_av]": "[lb_av]",
    "lb": "[lb_av]",
    "lbs": "[lb_av]",
    "ml/min": "mL/min",
}


def normalize_unit(quantity: dict[str, Any]) -> str | None:
    """The UCUM code of a FHIR Quantity: its ``code`` when the system is UCUM, else a known
    spelling of its ``unit``. ``None`` when the unit cannot be recognised."""
    raw: Any = None
    if quantity.get("system") == UCUM and isinstance(quantity.get("code"), str):
        raw = quantity["code"]
    elif isinstance(quantity.get("unit"), str):
        raw = quantity["unit"]
    elif isinstance(quantity.get("code"), str):
        raw = quantity["code"]
    return None if raw is None else _recognise(raw)


# Spellings whose case carries their meaning, read before the case-folded table: "G/L" is
# giga (10^9) per litre, the cell-count unit of French and Swiss labs, where "g/L" is grams.
_CASE_SENSITIVE = {"G/L": "10*9/L"}


@functools.lru_cache(maxsize=4096)  # a population spells units a few dozen ways
def _recognise(raw: str) -> str | None:
    exact = _CASE_SENSITIVE.get(raw.strip())
    if exact is not None:
        return exact
    key = raw.strip().replace("µ", "u").replace("μ", "u").replace(" ", "").lower()
    return _SYNONYMS.get(key)


@dataclass(frozen=True, slots=True)
class Analyte:
    """A measured quantity the criteria compare, with its comparison unit and conversions."""

    id: str
    label: str
    valueset: str
    unit: str
    convert: dict[str, float]

    def to_unit(self, value: float, unit: str | None) -> float | None:
        """``value`` expressed in this analyte's unit, or ``None`` if ``unit`` is not convertible.

        A dimensionless analyte (INR) also accepts a result sent with no unit at all.
        """
        if unit is None:
            return value if self.unit == "1" else None
        factor = self.convert.get(unit)
        return None if factor is None else value * factor


_DISPLAY_UNITS = {
    "1": "",
    "10*9/L": "×10⁹/L",
    "10*3/uL": "×10³/µL",
    "10*3/mm3": "×10³/mm³",
    "umol/L": "µmol/L",
    "ukat/L": "µkat/L",
    "/uL": "/µL",
    "[IU]/L": "IU/L",
    "[lb_av]": "lb",
}


def display_unit(ucum: str) -> str:
    """A unit as clinicians write it, for explanations."""
    return _DISPLAY_UNITS.get(ucum, ucum)
