"""National Drug Codes: the spellings real systems send, and the shipped NDC -> RxNorm map.

A drug coded only with an NDC (``http://hl7.org/fhir/sid/ndc``) counts as the RxNorm concept the
map names for it: the map's NDCs join every value set that holds that RxNorm code, so the record
index, the NDJSON prefilter and the order warnings of the CDS Hooks service all read them
without knowing about NDCs. The map is data (``ndc_rxnorm.json``) with a source on every row.

NDC forms: a package NDC is printed on the label as 10 digits in one of three hyphenated
layouts, 4-4-2, 5-3-2 or 5-4-1 (labeler-product-package; every layout occurs in the map's
sources), and claims and pharmacy systems send the 11-digit 5-4-2 form made by padding the short
segment with a leading zero. Codes are compared in that 11-digit form. Accepted here:

- 10 digits hyphenated 4-4-2, 5-3-2 or 5-4-1 (``0004-1100-20``, ``47335-890-80``,
  ``53808-0411-1``);
- 11 digits unhyphenated (``00004110020``) or hyphenated 5-4-2 (``00004-1100-20``).

Ten digits without hyphens cannot be padded without knowing the layout, so they are not
normalised (compared as sent, they match nothing in the map); neither are product codes
(labeler-product, two segments), which do not name a package.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from cds.errors import DefinitionError

if TYPE_CHECKING:
    from cds.criteria.valuesets import ValueSet

NDC = "http://hl7.org/fhir/sid/ndc"
NDC_MAP_FILE = Path(__file__).parent / "ndc_rxnorm.json"

#: segment lengths of the 10-digit layouts and where each is padded to 5-4-2
_TEN_DIGIT_LAYOUTS = {(4, 4, 2): 0, (5, 3, 2): 1, (5, 4, 1): 2}
_TARGET = (5, 4, 2)
_HYPHENATED = re.compile(r"^([0-9]+)-([0-9]+)-([0-9]+)$")


def normalize_ndc(code: str) -> str | None:
    """The 11-digit (5-4-2, unhyphenated) form of a package NDC, or None when ``code`` is not
    one of the accepted spellings (see the module docstring)."""
    code = code.strip()
    if len(code) == 11 and code.isascii() and code.isdigit():
        return code
    m = _HYPHENATED.match(code)
    if m is None:
        return None
    segments = m.groups()
    lengths = tuple(len(s) for s in segments)
    if lengths == _TARGET:
        return "".join(segments)
    padded = _TEN_DIGIT_LAYOUTS.get(lengths)  # type: ignore[arg-type]
    if padded is None:
        return None
    return "".join("0" + s if i == padded else s for i, s in enumerate(segments))


def ndc_spellings(ndc11: str) -> frozenset[str]:
    """Every accepted spelling that normalises to the 11-digit ``ndc11``: itself, its hyphenated
    5-4-2 form and each 10-digit hyphenated form whose padded segment starts with a zero (only
    one of those is the labeler's, but a raw-text prefilter may let a few extra lines through)."""
    parts = (ndc11[:5], ndc11[5:9], ndc11[9:])
    spellings = {ndc11, "-".join(parts)}
    for padded in _TEN_DIGIT_LAYOUTS.values():
        if parts[padded].startswith("0"):
            spellings.add("-".join(p[1:] if i == padded else p for i, p in enumerate(parts)))
    return frozenset(spellings)


@dataclass(frozen=True, slots=True)
class NdcEntry:
    """One row of the map: a package NDC and the RxNorm concept it is a product of."""

    ndc: str  # as printed on the label or listing
    ndc11: str
    rxnorm: str
    display: str
    source: str


def load_ndc_map(path: Path = NDC_MAP_FILE) -> tuple[NdcEntry, ...]:
    """The shipped map, each NDC checked to be one of the accepted spellings and listed once."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise DefinitionError(f"not valid JSON ({exc})", file=str(path)) from exc
    rows = data.get("map") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise DefinitionError("expected an object with a 'map' list", file=str(path), field="map")
    entries: list[NdcEntry] = []
    seen: dict[str, str] = {}
    for i, row in enumerate(rows):
        field = f"map[{i}]"
        if not isinstance(row, dict) or not all(
            isinstance(row.get(k), str) and row[k].strip()
            for k in ("ndc", "rxnorm", "display", "source")
        ):
            raise DefinitionError(
                "each row needs the strings ndc, rxnorm, display and source",
                file=str(path),
                field=field,
            )
        ndc11 = normalize_ndc(row["ndc"])
        if ndc11 is None or "-" not in row["ndc"]:
            # The label's own hyphenated form is kept so that the layout is on record.
            raise DefinitionError(
                f"{row['ndc']!r} is not a hyphenated package NDC", file=str(path), field=field
            )
        if ndc11 in seen:
            raise DefinitionError(
                f"{row['ndc']!r} is listed twice (also as {seen[ndc11]!r})",
                file=str(path),
                field=field,
            )
        if not row["rxnorm"].isdigit():
            raise DefinitionError(
                f"{row['rxnorm']!r} is not an RxCUI", file=str(path), field=f"{field}.rxnorm"
            )
        seen[ndc11] = row["ndc"]
        entries.append(NdcEntry(row["ndc"], ndc11, row["rxnorm"], row["display"], row["source"]))
    return tuple(entries)


def add_ndc_codes(
    valuesets: Mapping[str, ValueSet], entries: tuple[NdcEntry, ...], *, file: str
) -> dict[str, ValueSet]:
    """The value sets with each mapped NDC added to every set that holds its RxNorm code.

    An NDC whose RxNorm code is in no value set would be dead data, or a typo: refused.
    """
    from cds.criteria.valuesets import RXNORM  # here: valuesets imports this module

    joined: dict[str, tuple[set[tuple[str, str]], dict[tuple[str, str], str]]] = {}
    for i, entry in enumerate(entries):
        target = (RXNORM, entry.rxnorm)
        holders = [v for v, vs in valuesets.items() if target in vs.codes]
        if not holders:
            raise DefinitionError(
                f"RxNorm {entry.rxnorm} (for NDC {entry.ndc}) is in no value set",
                file=file,
                field=f"map[{i}].rxnorm",
            )
        for v in holders:
            codes, displays = joined.setdefault(v, (set(), {}))
            key = (NDC, entry.ndc11)
            codes.add(key)
            displays[key] = f"{entry.display} (NDC {entry.ndc})"
    result = dict(valuesets)
    for v, (codes, displays) in joined.items():
        vs = valuesets[v]
        result[v] = replace(
            vs, codes=vs.codes | frozenset(codes), displays={**vs.displays, **displays}
        )
    return result
