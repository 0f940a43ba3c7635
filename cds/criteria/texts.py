"""Text signals: words that name a disease or a procedure in a record that carries no code the
criteria read (issue 12: "a NET recorded only as text ... makes it unknown"; "a procedure with
no code whose text names TACE, TAE, Y90 or radioembolization is unknown, never 'none on
record'").

A text signal never decides a criterion by itself: a rule reads it only to turn "nothing on
record" into "unknown, confirm", quoting the words it found. The signals are data
(``text_signals.json``, validated by ``schema/text-signals.schema.json``); rules name them in
their ``*_text`` parameters, which ``reads.py`` declares like value sets.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema

from cds.errors import DefinitionError

TEXT_SIGNALS_FILE = Path(__file__).parent / "text_signals.json"
_SCHEMA_FILE = Path(__file__).parent / "schema" / "text-signals.schema.json"


# Compared and hashed by identity (eq=False): records memoise what a tuple of signals finds.
@dataclass(frozen=True, eq=False)
class TextSignal:
    """One signal: what it names, the resource types it is looked for in, and its patterns."""

    id: str
    title: str
    types: tuple[str, ...]
    #: one regular expression for all its patterns (words case-insensitive, acronyms exact)
    pattern: re.Pattern[str]
    #: phrases that make a match not count ("family history of ...")
    exclude: re.Pattern[str] | None

    def finds(self, texts: Iterable[str]) -> bool:
        """Whether any of the texts names it (and is not excluded)."""
        return any(
            self.pattern.search(text) and not (self.exclude and self.exclude.search(text))
            for text in texts
        )

    @property
    def line_pattern(self) -> bytes:
        """The pattern as it is searched for in a raw NDJSON line (a superset of
        :meth:`finds`: a line that names it anywhere, exclusions not applied)."""
        return self.pattern.pattern.encode()


def _alternation(words: list[str], acronyms: list[str]) -> re.Pattern[str]:
    parts = [f"(?i:{w})" for w in words]
    parts += [rf"\b{a}\b" for a in acronyms]
    return re.compile("|".join(parts))


def parse_text_signals(data: Any, *, file: str) -> dict[str, TextSignal]:
    """Validate the text-signal document and compile its patterns; errors name the field."""
    with open(_SCHEMA_FILE, encoding="utf-8") as f:
        validator = jsonschema.Draft202012Validator(json.load(f))
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = ".".join(str(p) for p in first.absolute_path) or "(root)"
        raise DefinitionError(first.message, file=file, field=where)
    signals: dict[str, TextSignal] = {}
    for i, spec in enumerate(data["signals"]):
        try:
            pattern = _alternation(spec.get("words", []), spec.get("acronyms", []))
            exclude = _alternation(spec["exclude"], []) if spec.get("exclude") else None
        except re.error as exc:
            raise DefinitionError(
                f"not a regular expression ({exc})", file=file, field=f"signals[{i}]"
            ) from exc
        if not pattern.pattern.isascii():
            # the NDJSON prefilter searches raw bytes with the same pattern
            raise DefinitionError("patterns must be ASCII", file=file, field=f"signals[{i}]")
        if spec["id"] in signals:
            raise DefinitionError("duplicate id", file=file, field=f"signals[{i}].id")
        signals[spec["id"]] = TextSignal(
            spec["id"], spec["title"], tuple(spec["types"]), pattern, exclude
        )
    return signals


def load_text_signals(path: Path = TEXT_SIGNALS_FILE) -> dict[str, TextSignal]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise DefinitionError(f"not valid JSON ({exc})", file=str(path)) from exc
    return parse_text_signals(data, file=str(path))


def texts_of(concept: Any) -> list[str]:
    """What a CodeableConcept says in words: its text and its codings' displays."""
    if not isinstance(concept, dict):
        return []
    found = [concept["text"]] if isinstance(concept.get("text"), str) else []
    for coding in concept.get("coding") or ():
        if isinstance(coding, dict) and isinstance(coding.get("display"), str):
            found.append(coding["display"])
    return found
