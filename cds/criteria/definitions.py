"""Trial definitions: JSON files checked by a shipped JSON Schema and against the value sets."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

from cds.criteria import rules as _rules  # noqa: F401 - registers the rule kinds
from cds.criteria.ndc import NDC_MAP_FILE, add_ndc_codes, load_ndc_map
from cds.criteria.reads import CLINICAL_TYPES, RELATED_TYPES, RULE_KINDS, rule_schema
from cds.criteria.texts import TEXT_SIGNALS_FILE, TextSignal, load_text_signals
from cds.criteria.units import Analyte
from cds.criteria.valuesets import ValueSet, load_valuesets
from cds.errors import DefinitionError, InputError

PACKAGE_DIR = Path(__file__).parent
TRIALS_DIR = PACKAGE_DIR / "trials"
VALUESETS_DIR = PACKAGE_DIR / "valuesets"
ANALYTES_FILE = PACKAGE_DIR / "analytes.json"
ANSWERS_FILE = PACKAGE_DIR / "analyte_answers.json"


@dataclass(frozen=True, slots=True)
class Criterion:
    """One eligibility criterion: verbatim protocol text plus a computable rule or ``manual``."""

    id: str
    kind: str
    label: str
    text: str
    context: str | None
    note: str | None
    rule: dict[str, Any] | None
    manual_reason: str | None
    related: tuple[str, ...]

    @property
    def is_manual(self) -> bool:
        return self.rule is None

    @property
    def breaking_valuesets(self) -> frozenset[str]:
        """Value sets whose appearance in a new order or procedure would make this criterion
        fail: the history it excludes, or the therapy its washout counts."""
        if self.rule is None or self.rule["type"] not in ("history_absent", "washout"):
            return frozenset()
        if self.rule.get("on_found") == "unknown":
            return frozenset()  # a history that only raises a question never fails
        return frozenset(
            vs for key in ("procedures", "medications") for vs in self.rule.get(key, ())
        )


#: The service's own precondition, put first in every trial: the registry text assumes a
#: living patient and never says so, but a record may say otherwise (Patient.deceased[x]).
LIVING_PATIENT = Criterion(
    id="inc-living-patient",
    kind="inclusion",
    label="Living patient",
    text="Screening precondition (not registry text): the patient is alive on the screening date.",
    context=None,
    note="Added by the screening service to every trial; not part of the protocol.",
    rule={"type": "alive"},
    manual_reason=None,
    related=(),
)


@dataclass(frozen=True, slots=True)
class Trial:
    """A trial's identity, registry facts and criteria in protocol order."""

    id: str
    title: str
    short_title: str
    version: str
    url: str
    registry_status: str
    registry_status_source: str
    lab_lookback_days: int
    weight_lookback_days: int
    performance_status_lookback_days: int
    criteria: tuple[Criterion, ...]
    source_file: str


class TrialSet:
    """The trials to screen for, with the value sets, analytes and answer codes they use."""

    def __init__(
        self,
        trials: Sequence[Trial],
        valuesets: dict[str, ValueSet],
        analytes: dict[str, Analyte],
        answers: dict[str, Any],
        texts: dict[str, TextSignal] | None = None,
    ) -> None:
        self.trials = tuple(trials)
        self.valuesets = valuesets
        self.analytes = analytes
        self.answers = answers
        self.texts = texts or {}
        self._texts_for: dict[str, tuple[TextSignal, ...]] = {}
        self._by_id = {t.id: t for t in self.trials}
        self._used_valuesets: tuple[ValueSet, ...] | None = None
        self._relevance: dict[tuple[str, str], bool] = {}
        self._memberships: dict[tuple[str, str], tuple[str, ...]] = {}
        self._titles: dict[tuple[str, ...], str] = {}
        self._types_read: dict[int, tuple[Criterion, tuple[str, ...]]] = {}

    def is_relevant(self, key: tuple[str, str]) -> bool:
        """Whether any criterion of these trials reads a resource coded ``key`` (a normalised
        (system, code)). Memoised: a population repeats the same codes over and over."""
        known = self._relevance.get(key)
        if known is None:
            known = any(vs.contains_key(key) for vs in self.used_valuesets())
            self._relevance[key] = known
        return known

    def valuesets_of(self, key: tuple[str, str]) -> tuple[str, ...]:
        """The ids of every value set (used or not) holding the normalised code ``key``.
        Memoised, like :meth:`is_relevant`."""
        known = self._memberships.get(key)
        if known is None:
            known = tuple(v for v, vs in self.valuesets.items() if vs.contains_key(key))
            self._memberships[key] = known
        return known

    def titles(self, valueset_ids: Iterable[str]) -> str:
        """The value sets' titles, comma-separated, as explanations name them. Memoised."""
        ids = tuple(valueset_ids)
        known = self._titles.get(ids)
        if known is None:
            known = self._titles[ids] = ", ".join(self.valuesets[v].title for v in ids)
        return known

    def used_valuesets(self) -> tuple[ValueSet, ...]:
        """Every value set some criterion of these trials reads, whatever the resource type."""
        if self._used_valuesets is None:
            used = {v for t in CLINICAL_TYPES for v in self.valueset_ids_for(t)}
            self._used_valuesets = tuple(self.valuesets[v] for v in sorted(used))
        return self._used_valuesets

    def __iter__(self) -> Iterator[Trial]:
        return iter(self.trials)

    def __len__(self) -> int:
        return len(self.trials)

    def __getitem__(self, trial_id: str) -> Trial:
        return self._by_id[trial_id]

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(self._by_id)

    def valueset(self, valueset_id: str) -> ValueSet:
        return self.valuesets[valueset_id]

    def only(self, trial_ids: Iterable[str]) -> TrialSet:
        """The subset of these trials named by ``trial_ids`` (unknown ids are an input error)."""
        wanted = list(dict.fromkeys(trial_ids))
        unknown = [t for t in wanted if t not in self._by_id]
        if unknown:
            raise InputError(
                f"unknown trial {', '.join(unknown)} (known: {', '.join(self.ids)})",
                source="--trial",
            )
        return TrialSet(
            [self._by_id[t] for t in wanted],
            self.valuesets,
            self.analytes,
            self.answers,
            self.texts,
        )

    def text_signals_for(self, resource_type: str) -> tuple[TextSignal, ...]:
        """The text signals some criterion looks for in resources of ``resource_type``."""
        known = self._texts_for.get(resource_type)
        if known is None:
            ids: set[str] = set()
            for trial in self.trials:
                for criterion in trial.criteria:
                    if criterion.rule is not None:
                        kind = RULE_KINDS[criterion.rule["type"]]
                        ids.update(kind.texts_read(criterion.rule).get(resource_type, ()))
            known = self._texts_for[resource_type] = tuple(self.texts[i] for i in sorted(ids))
        return known

    def valueset_ids_for(self, resource_type: str) -> frozenset[str]:
        """Every value set the criteria match against resources of ``resource_type``."""
        found: set[str] = set()
        for trial in self.trials:
            for criterion in trial.criteria:
                found.update(_valuesets_by_type(criterion, self.analytes).get(resource_type, ()))
        return frozenset(found)

    def resource_types_read(self, criterion: Criterion) -> tuple[str, ...]:
        """The FHIR resource types ``criterion`` reads (besides the Patient), in record order.
        Memoised per criterion."""
        known = self._types_read.get(id(criterion))
        if known is None or known[0] is not criterion:
            read = _valuesets_by_type(criterion, self.analytes)
            known = (criterion, tuple(t for t in CLINICAL_TYPES if t in read))
            self._types_read[id(criterion)] = known
        return known[1]

    def types_read(self) -> tuple[str, ...]:
        """The clinical resource types some criterion reads, in record order (what the FHIR
        queries, the Bulk ``_type`` list and the NDJSON sweep fetch)."""
        read = {
            t for trial in self.trials for c in trial.criteria for t in self.resource_types_read(c)
        }
        return tuple(t for t in CLINICAL_TYPES if t in read or self.text_signals_for(t))

    def codes_for(self, resource_type: str) -> frozenset[tuple[str, str]]:
        """The explicit (system, code) pairs the criteria read from ``resource_type``.

        For Observation these are the codes to put in a server-side ``code`` filter: LOINC
        mostly, and the SNOMED CT observables and findings some Observations are coded with
        (an ECOG or NYHA class finding, the mitotic count), which a LOINC-only filter would
        leave on the server while a file or an export holding them is read. ICD-10-CM families
        matched by prefix cannot be listed; Condition searches therefore fetch all of a
        patient's conditions.
        """
        codes: set[tuple[str, str]] = set()
        for vs_id in self.valueset_ids_for(resource_type):
            codes.update(self.valuesets[vs_id].codes)
        return frozenset(codes)


def _valuesets_by_type(criterion: Criterion, analytes: dict[str, Analyte]) -> dict[str, set[str]]:
    """Resource type -> the value sets ``criterion`` reads, from its rule kind's declaration
    (cds/criteria/reads.py) or, for a manual criterion, the records it lists."""
    by_type: dict[str, set[str]] = {}
    if criterion.related:
        for rtype in RELATED_TYPES:
            by_type.setdefault(rtype, set()).update(criterion.related)
    if criterion.rule is not None:
        for rtype, ids in (
            RULE_KINDS[criterion.rule["type"]].reads(criterion.rule, analytes).items()
        ):
            by_type.setdefault(rtype, set()).update(ids)
    return by_type


def _schema_path(error: jsonschema.ValidationError) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)[1:]


@cache
def _trial_validator() -> jsonschema.Draft202012Validator:
    """The shipped trial schema, its ``rule`` branches built from the rule kinds' declarations."""
    with open(PACKAGE_DIR / "schema" / "trial.schema.json", encoding="utf-8") as f:
        schema = json.load(f)
    schema["$defs"].update(rule_schema())
    return jsonschema.Draft202012Validator(schema)


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise DefinitionError(f"not valid JSON ({exc})", file=str(path)) from exc


def parse_trial(
    data: Any,
    *,
    file: str,
    valuesets: dict[str, ValueSet],
    analytes: dict[str, Analyte],
    texts: dict[str, TextSignal] | None = None,
) -> Trial:
    """Validate one trial definition (schema, then references) and build a :class:`Trial`."""
    errors = sorted(_trial_validator().iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        # The most specific error is the deepest one; name the criterion it sits in.
        first = max(errors, key=lambda e: len(e.absolute_path))
        path = list(first.absolute_path)
        criterion = None
        if len(path) >= 2 and path[0] == "criteria" and isinstance(path[1], int):
            items = data.get("criteria", [])
            if path[1] < len(items) and isinstance(items[path[1]], dict):
                criterion = str(items[path[1]].get("id", f"#{path[1]}"))
        raise DefinitionError(
            first.message, file=file, criterion=criterion, field=_schema_path(first) or "(root)"
        )
    seen: set[str] = {LIVING_PATIENT.id}
    criteria: list[Criterion] = [LIVING_PATIENT]
    for i, item in enumerate(data["criteria"]):
        cid = item["id"]
        if cid in seen:
            raise DefinitionError("duplicate criterion id", file=file, criterion=cid, field="id")
        seen.add(cid)
        if not cid.startswith("inc-" if item["kind"] == "inclusion" else "exc-"):
            raise DefinitionError(
                "id prefix does not match kind", file=file, criterion=cid, field="kind"
            )
        rule = item.get("rule")
        manual = item.get("manual") or {}
        if rule is not None:
            _check_references(
                rule, f"criteria[{i}].rule", file, cid, valuesets, analytes, texts or {}
            )
        _check_related(
            manual.get("related", ()), f"criteria[{i}].manual.related", file, cid, valuesets
        )
        criteria.append(
            Criterion(
                id=cid,
                kind=item["kind"],
                label=item["label"],
                text=item["text"],
                context=item.get("context"),
                note=item.get("note"),
                rule=rule,
                manual_reason=manual.get("reason"),
                related=tuple(manual.get("related", ())),
            )
        )
    defaults = data["defaults"]
    return Trial(
        id=data["id"],
        title=data["title"],
        short_title=data["short_title"],
        version=data["version"],
        url=data["registry"]["url"],
        registry_status=data["registry"]["status"],
        registry_status_source=data["registry"]["status_source"],
        lab_lookback_days=defaults["lab_lookback_days"],
        weight_lookback_days=defaults.get("weight_lookback_days", 90),
        performance_status_lookback_days=defaults.get(
            "performance_status_lookback_days", defaults["lab_lookback_days"]
        ),
        criteria=tuple(criteria),
        source_file=file,
    )


def _check_references(
    rule: dict[str, Any],
    where: str,
    file: str,
    criterion: str,
    valuesets: dict[str, ValueSet],
    analytes: dict[str, Analyte],
    texts: dict[str, TextSignal],
) -> None:
    """Every value set, text signal and analyte a rule's parameters name exists, and its
    limits' units
    convert to the analyte's (the parameters' roles come from the rule kind's declaration)."""
    kind = RULE_KINDS[rule["type"]]
    for param, given, path in kind.walk(rule, where):
        if param.role == "valuesets":
            _check_related(given, path, file, criterion, valuesets)
        elif param.role == "texts":
            for j, text_id in enumerate(given):
                if text_id not in texts or not set(param.reads) & set(texts[text_id].types):
                    raise DefinitionError(
                        f"unknown text signal {text_id!r} (or not one for {param.reads})",
                        file=file,
                        criterion=criterion,
                        field=f"{path}[{j}]",
                    )
        elif param.role == "analyte" and given not in analytes:
            raise DefinitionError(
                f"unknown analyte {given!r}", file=file, criterion=criterion, field=path
            )
    for sub, path in _rule_and_nested(rule, where):
        acceptable = sub.get("acceptable", {})
        if "unit" in acceptable and sub.get("analyte") in analytes:
            analyte = analytes[sub["analyte"]]
            if analyte.to_unit(1.0, acceptable["unit"]) is None:
                raise DefinitionError(
                    f"unit {acceptable['unit']!r} cannot be converted to {analyte.id}'s unit",
                    file=file,
                    criterion=criterion,
                    field=f"{path}.acceptable.unit",
                )


def _rule_and_nested(rule: dict[str, Any], where: str) -> Iterator[tuple[dict[str, Any], str]]:
    yield rule, where
    for param in RULE_KINDS[rule["type"]].params:
        if param.role == "rule" and param.name in rule:
            yield from _rule_and_nested(rule[param.name], f"{where}.{param.name}")


def _check_related(
    related: Iterable[str], where: str, file: str, criterion: str, valuesets: dict[str, ValueSet]
) -> None:
    """Every value set named (by a rule's parameter or a manual criterion's ``related``)
    exists."""
    for j, vs_id in enumerate(related):
        if vs_id not in valuesets:
            raise DefinitionError(
                f"unknown value set {vs_id!r}",
                file=file,
                criterion=criterion,
                field=f"{where}[{j}]",
            )


def load_analytes(path: Path, valuesets: dict[str, ValueSet]) -> dict[str, Analyte]:
    data = _read_json(path)
    analytes: dict[str, Analyte] = {}
    for aid, spec in data.get("analytes", {}).items():
        for key in ("label", "valueset", "unit", "convert"):
            if key not in spec:
                raise DefinitionError("missing", file=str(path), field=f"analytes.{aid}.{key}")
        if spec["valueset"] not in valuesets:
            raise DefinitionError(
                f"unknown value set {spec['valueset']!r}",
                file=str(path),
                field=f"analytes.{aid}.valueset",
            )
        if spec["unit"] not in spec["convert"]:
            raise DefinitionError(
                "the comparison unit must convert to itself",
                file=str(path),
                field=f"analytes.{aid}.convert",
            )
        analytes[aid] = Analyte(
            aid, spec["label"], spec["valueset"], spec["unit"], dict(spec["convert"])
        )
    return analytes


def load_trial_set(
    trials_dir: Path = TRIALS_DIR,
    valuesets_dir: Path = VALUESETS_DIR,
    analytes_file: Path = ANALYTES_FILE,
    answers_file: Path = ANSWERS_FILE,
    texts_file: Path = TEXT_SIGNALS_FILE,
    ndc_map_file: Path = NDC_MAP_FILE,
) -> TrialSet:
    """Load and validate every trial definition and what it refers to. Raises DefinitionError."""
    # NDC-coded drugs join the value sets of the RxNorm concept they are mapped to.
    valuesets = add_ndc_codes(
        load_valuesets(valuesets_dir), load_ndc_map(ndc_map_file), file=str(ndc_map_file)
    )
    texts = load_text_signals(texts_file)
    analytes = load_analytes(analytes_file, valuesets)
    answers = _read_json(answers_file) if answers_file.exists() else {}
    trials = []
    for path in sorted(trials_dir.glob("*.json")):
        trial = parse_trial(
            _read_json(path), file=str(path), valuesets=valuesets, analytes=analytes, texts=texts
        )
        if trial.id != path.stem:
            raise DefinitionError(
                f"id {trial.id!r} does not match the file name", file=str(path), field="id"
            )
        trials.append(trial)
    if not trials:
        raise DefinitionError("no trial definitions found", file=str(trials_dir))
    return TrialSet(trials, valuesets, analytes, answers, texts)


@cache
def _shipped() -> TrialSet:
    return load_trial_set()


def load_trials(only: Iterable[str] | None = None) -> TrialSet:
    """The shipped trials (loaded and validated once per process), optionally a subset."""
    trials = _shipped()
    return trials.only(only) if only else trials
