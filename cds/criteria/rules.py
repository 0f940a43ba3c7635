"""The rule kinds a criterion can use: each turns a patient record into a result with evidence."""

from __future__ import annotations

import functools
import math
import operator
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

from cds.criteria.model import Result
from cds.criteria.reads import (
    MEDICATION_TYPES,
    RELATED_TYPES,
    RULE_KINDS,
    analyte_param,
    rule_kind,
    rule_param,
    texts_param,
    value_param,
    valuesets_param,
)
from cds.criteria.record import (
    SEX_ELEMENTS,
    Entry,
    PatientRecord,
    codings_of,
    concept_display,
    parse_date,
)
from cds.criteria.units import Analyte, display_unit, normalize_unit

if TYPE_CHECKING:
    from cds.criteria.definitions import Trial, TrialSet

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_OP_TEXT = {"<": "<", "<=": "≤", ">": ">", ">=": "≥"}

# Observation statuses whose value can be used; "preliminary" can be reported but never passes
# (a preliminary result may still change).
_FINAL = {"final", "amended", "corrected"}
_USABLE = _FINAL | {"preliminary"}
_ACTIVE_CLINICAL = {"active", "recurrence", "relapse"}
_UNCONFIRMED = {"provisional", "differential", "unconfirmed"}

# WHO 2019 grading of well-differentiated GEP neuroendocrine tumours by Ki-67 index:
# G1 < 3 %, G2 3-20 %, G3 > 20 %, and the final grade is whichever of Ki-67 and mitotic count
# places the tumour higher (WHO Classification of Tumours, Digestive System Tumours, 5th ed.,
# as tabulated by UpToDate and the CAP NET checklist; the > 20 % G3 limit is also stated in
# NCT05610826's exclusion criteria).
_KI67_G2_FROM = 3.0
_KI67_G3_ABOVE = 20.0
# The same classification's mitotic count cut-offs, in mitoses per 2 mm²: G1 < 2, G2 2-20,
# G3 > 20. The CAP NET checklist gives the same cut-offs per 10 high power fields (the
# denominator of SNOMED CT 406094009), so a count per 10 HPF and one per 2 mm² are read alike;
# it also notes that the grade by Ki-67 index may be higher than the grade by mitotic count
# (CAP colon NET checklist comments, as reproduced at essentialpathology.info
# TumorChecklist/CommentsColonNET.html).
_MITOSES_G2_FROM = 2.0
_MITOSES_G3_ABOVE = 20.0

_MAX_LISTED = 3


# Outcome and Measurement are named tuples rather than frozen dataclasses: as immutable, and a
# rule makes several per patient, where a frozen dataclass's __init__ costs twice as much.
class Outcome(NamedTuple):
    """What a rule found: its result, the references behind it, and the sentence to check."""

    result: Result
    evidence: tuple[str, ...]
    explanation: str


@dataclass(slots=True)
class Context:
    """What every rule needs: the record, the trial (for its defaults), the date."""

    record: PatientRecord
    trials: TrialSet
    trial: Trial
    as_of: date

    # --- selection helpers -------------------------------------------------------------

    def entries(self, types: Sequence[str], valueset_ids: Iterable[str]) -> list[Entry]:
        """Entries of ``types`` in any of the value sets, recorded on or before the as-of date.

        Data dated after the as-of date is ignored so that an evaluation "as of" a past date
        sees what was known then; undated records are kept (their absence of a date is noted
        where it matters). The selection is cached on the record: both trials ask for the same
        analytes, and a large record would otherwise be sorted once per criterion.
        """
        valueset_ids = tuple(valueset_ids)
        if not self.record.may_hold(valueset_ids):
            return []
        cache_key = (tuple(types), valueset_ids, self.as_of)
        cached: list[Entry] | None = self.record.selection_cache.get(cache_key)
        if cached is not None:
            return cached
        seen: dict[int, Entry] = {}
        for vs_id in valueset_ids:
            valueset = self.trials.valueset(vs_id)
            for entry in self.record.matching(types, valueset):
                when = entry.when
                if when is None or when.start <= self.as_of:
                    # Without a display in the record, it is named by the value set's.
                    entry.fallback_displays = entry.fallback_displays or valueset.displays
                    # by identity: each component of a panel is an entry of its own
                    seen[id(entry)] = entry
        selected = sorted(seen.values(), key=_sort_key, reverse=True)
        self.record.selection_cache[cache_key] = selected
        return selected

    def named(self, types: Sequence[str], signal_ids: Iterable[str]) -> list[Entry]:
        """Entries of ``types`` whose words match any of the text signals, recorded on or
        before the as-of date (or undated), newest first."""
        seen: dict[int, Entry] = {}
        for signal_id in signal_ids:
            for entry in self.record.named_in_text(types, signal_id):
                when = entry.when
                if when is None or when.start <= self.as_of:
                    seen[id(entry)] = entry
        return sorted(seen.values(), key=_sort_key, reverse=True)

    def readable(self, entries: Iterable[Entry]) -> tuple[list[Entry], list[Entry]]:
        """Split entries into (valid, malformed); malformed ones never count."""
        good: list[Entry] = []
        bad: list[Entry] = []
        for entry in entries:
            (bad if self.record.invalid_reason(entry) else good).append(entry)
        return good, bad

    def titles(self, valueset_ids: Iterable[str]) -> str:
        return self.trials.titles(valueset_ids)

    def window_start(self, days: int) -> date:
        return _days_before(self.as_of, days)


@functools.cache
def _days_before(day: date, days: int) -> date:
    return day - timedelta(days=days)


def _sort_key(entry: Entry) -> tuple[float, str]:
    """Order in time: by the instant when the record gives a time of day (two platelet counts
    on one day, before and after a transfusion), else by the last day its date covers; the
    reference only breaks exact ties."""
    instant = entry.instant
    if instant is None:
        instant = _day_start(entry.when.end) if entry.when else float("-inf")
    return (instant, entry.ref)


@functools.cache
def _day_start(day: date) -> float:
    return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()


def _when(entry: Entry) -> str:
    return f" on {entry.when}" if entry.when else " (undated)"


def _listing(entries: Sequence[Entry]) -> str:
    shown = "; ".join(f"{e.describe()}{_when(e)}" for e in entries[:_MAX_LISTED])
    more = len(entries) - _MAX_LISTED
    return shown + (f"; and {more} more" if more > 0 else "")


def _refs(entries: Iterable[Entry]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(e.ref for e in entries))


def _malformed_unknown(ctx: Context, bad: Sequence[Entry], what: str) -> Outcome:
    reasons = "; ".join(f"{e.ref}: {ctx.record.invalid_reason(e)}" for e in bad[:_MAX_LISTED])
    return Outcome(
        Result.UNKNOWN,
        _refs(bad),
        f"{what} could not be read ({reasons}); correct the record to decide this criterion.",
    )


# --- conditions ------------------------------------------------------------------------


def _condition_state(entry: Entry, as_of: date) -> str:
    """'active', 'unconfirmed' or 'inactive' for a Condition on the as-of date."""
    resource = entry.resource
    clinical = codings_of(resource.get("clinicalStatus"))
    clinical_code = clinical[0][1] if clinical else None
    if clinical_code is not None and clinical_code not in _ACTIVE_CLINICAL:
        return "inactive"
    if entry.until is not None and entry.until.end <= as_of:
        return "inactive"
    verification = codings_of(resource.get("verificationStatus"))
    if verification and verification[0][1] in _UNCONFIRMED:
        return "unconfirmed"
    return "active"


def _conditions_by_state(
    ctx: Context, valueset_ids: Sequence[str], types: Sequence[str] = ("Condition",)
) -> tuple[dict[str, list[Entry]], list[Entry]]:
    """Readable Conditions (or AllergyIntolerances, whose clinical and verification statuses
    read the same way) of the value sets grouped by their state on the as-of date ('active',
    'unconfirmed', 'inactive'), and the unreadable ones."""
    found, bad = ctx.readable(ctx.entries(types, valueset_ids))
    by_state: dict[str, list[Entry]] = {"active": [], "unconfirmed": [], "inactive": []}
    for entry in found:
        by_state[_condition_state(entry, ctx.as_of)].append(entry)
    return by_state, bad


def _unconfirmed(items: Sequence[Entry], resolve: str) -> Outcome:
    """UNKNOWN for Conditions recorded only as provisional or differential."""
    return Outcome(
        Result.UNKNOWN,
        _refs(items),
        f"Recorded only as provisional or differential: {_listing(items)}; {resolve}.",
    )


@rule_kind(
    "diagnosis_present",
    valuesets_param("valuesets", ["Condition"], required=True),
    # A disease coded as a diagnosis plus a site: a site code on any Condition (a NET code and
    # a C25.x pancreas code), or the diagnosis's own bodySite (mCODE binds Condition.bodySite to
    # SNOMED CT body structures or ICD-O-3 topography).
    valuesets_param("site_diagnoses", ["Condition"]),
    valuesets_param("sites", ["Condition"]),
    valuesets_param("body_sites", ["Condition"]),
    # Codes that neither establish nor rule out the disease (a NET of unstated primary site).
    valuesets_param("unknown_with", ["Condition"]),
    value_param("unknown_confirm", {"type": "string"}),
    # What suggests the disease when no code says it: never a fail while one is on record.
    valuesets_param("signal_conditions", ["Condition"]),
    valuesets_param("signal_observations", ["Observation"]),
    valuesets_param("signal_medications", MEDICATION_TYPES),
    valuesets_param("signal_procedures", ["Procedure"]),
    # The disease named in words by a record that does not code it (issue 12: "a NET recorded
    # only as text ... makes it unknown").
    texts_param("signal_text", ["Condition"]),
    # Coded diseases that explain the signals (a NET coded at another site): then they do not
    # count, and the absence of the required diagnosis fails.
    valuesets_param("signals_unless", ["Condition"]),
)
def diagnosis_present(rule: dict[str, Any], ctx: Context) -> Outcome:
    """A disease-defining inclusion: it must be positively recorded; absence fails only when
    nothing on record suggests the disease (issue 12: no patient lost for a coding reason)."""
    by_state, bad = _conditions_by_state(ctx, rule["valuesets"])
    what = ctx.titles(rule["valuesets"])
    if by_state["active"]:
        active = by_state["active"]
        return Outcome(Result.PASS, _refs(active), f"Recorded: {_listing(active)}.")
    if rule.get("site_diagnoses"):
        disease = _conditions_by_state(ctx, rule["site_diagnoses"])[0]["active"]
        site = _conditions_by_state(ctx, rule["sites"])[0]["active"] if rule.get("sites") else []
        if disease and site:
            return Outcome(
                Result.PASS,
                _refs([*disease, *site]),
                f"Recorded: {_listing(disease)} with the site {_listing(site)}.",
            )
        at_site = [e for e in disease if _at_body_site(ctx, e, rule.get("body_sites", []))]
        if at_site:
            return Outcome(
                Result.PASS,
                _refs(at_site),
                f"Recorded: {_listing(at_site)}, its body site "
                f"{_body_site_text(ctx, at_site[0], rule['body_sites'])}.",
            )
    if by_state["unconfirmed"]:
        return _unconfirmed(by_state["unconfirmed"], "a confirmed diagnosis would decide it")
    if by_state["inactive"]:
        items = by_state["inactive"]
        return Outcome(
            Result.UNKNOWN,
            _refs(items),
            f"Recorded only as resolved or inactive: {_listing(items)}; "
            "confirm whether the disease is current.",
        )
    if bad:
        return _malformed_unknown(ctx, bad, f"A {what} record")
    if rule.get("unknown_with"):
        undecided = _conditions_by_state(ctx, rule["unknown_with"])[0]["active"]
        if undecided:
            confirm = rule.get("unknown_confirm", "confirm the diagnosis")
            return Outcome(
                Result.UNKNOWN,
                _refs(undecided),
                f"No {what} coded, but on record: {_listing(undecided)}; {confirm}.",
            )
    signals = _disease_signals(rule, ctx)
    if signals:
        found = "; ".join(f"{label}: {_listing(items)}" for label, items in signals)
        return Outcome(
            Result.UNKNOWN,
            _refs([e for _, items in signals for e in items]),
            f"No {what} coded, but on record: {found}; the diagnosis, coded, would decide it.",
        )
    return Outcome(
        Result.FAIL,
        (ctx.record.patient_ref,),
        f"No {what} on record on or before {ctx.as_of}, and nothing that suggests it; "
        "this trial requires it.",
    )


def _body_site_keys(entry: Entry) -> list[tuple[str, str]]:
    """The codes of a resource's bodySite (FHIR R4 Condition.bodySite and Procedure.bodySite:
    a list of CodeableConcepts)."""
    sites = entry.resource.get("bodySite")
    if not isinstance(sites, list):
        return []
    return [key for site in sites for key in codings_of(site)]


def _at_body_site(ctx: Context, entry: Entry, valueset_ids: Sequence[str]) -> bool:
    keys = _body_site_keys(entry) if valueset_ids else []
    return any(ctx.trials.valueset(v).contains_key(k) for v in valueset_ids for k in keys)


def _body_site_text(ctx: Context, entry: Entry, valueset_ids: Sequence[str]) -> str:
    for site in entry.resource.get("bodySite") or ():
        for key in codings_of(site):
            for vs_id in valueset_ids:
                valueset = ctx.trials.valueset(vs_id)
                if valueset.contains_key(key):
                    shown = concept_display(site) or valueset.displays.get(key) or key[1]
                    return f"{shown} ({key[1]})"
    return "(not readable)"


def _disease_signals(rule: dict[str, Any], ctx: Context) -> list[tuple[str, list[Entry]]]:
    """Readable records that suggest the disease without coding it (a Ki-67 result, a
    somatostatin analogue, a benign-coded NET, the disease named in words ...), by what
    suggests it, unless a coded disease explains them."""
    if rule.get("signals_unless"):
        by_state = _conditions_by_state(ctx, rule["signals_unless"])[0]
        if by_state["active"] or by_state["unconfirmed"]:
            return []
    found: list[tuple[str, list[Entry]]] = []
    for vs in rule.get("signal_conditions", []):
        conditions = _conditions_by_state(ctx, [vs])[0]
        found.append((vs, conditions["active"] + conditions["unconfirmed"]))
    for vs in rule.get("signal_observations", []):
        found.append((vs, [e for e in ctx.entries(("Observation",), [vs]) if e.status in _USABLE]))
    for vs in rule.get("signal_medications", []):
        found.append((vs, ctx.entries(MEDICATION_TYPES, [vs])))
    for vs in rule.get("signal_procedures", []):
        found.append((vs, ctx.entries(("Procedure",), [vs])))
    labelled = [(ctx.titles([vs]), items) for vs, items in found]
    for signal_id in rule.get("signal_text", []):
        labelled.append((_named_label(ctx, signal_id), _named_conditions(ctx, [signal_id])))
    readable = [(label, ctx.readable(items)[0]) for label, items in labelled]
    return [(label, items) for label, items in readable if items]


def _named_label(ctx: Context, signal_id: str) -> str:
    """``a neuroendocrine tumour named in words``: the words are the entries' displays."""
    return ctx.trials.texts[signal_id].title


def _named_conditions(ctx: Context, signal_ids: Sequence[str]) -> list[Entry]:
    """Readable Conditions, current on the as-of date, whose words match the text signals."""
    found = ctx.readable(ctx.named(("Condition",), signal_ids))[0]
    return [e for e in found if _condition_state(e, ctx.as_of) != "inactive"]


def _named_unknown(
    ctx: Context, signal_ids: Sequence[str], named: Sequence[Entry], lead: str, confirm: str
) -> Outcome:
    """UNKNOWN for records that name the thing in words only, saying which signals."""
    labels = " or ".join(
        _named_label(ctx, sid) for sid in signal_ids if any(sid in e.named for e in named)
    )
    return Outcome(
        Result.UNKNOWN,
        _refs(named),
        f"{lead}, but {labels} on record: {_listing(named)}; {confirm}.",
    )


@rule_kind(
    "condition_absent",
    valuesets_param("valuesets", ["Condition"]),
    # Allergies and intolerances to these substances count as the condition (issue 12: an
    # allergy to capecitabine, or to iodinated contrast, bears on a contraindication).
    valuesets_param("allergies", ["AllergyIntolerance"]),
    # Conditions that name it in words only (a DPD deficiency written on the problem list):
    # never more than unknown, whatever on_found says.
    texts_param("found_text", ["Condition"]),
    value_param("on_found", {"enum": ["fail", "unknown"]}, required=True),
    value_param("on_absent", {"enum": ["pass", "manual"]}),
    value_param("confirm", {"type": "string"}),
    any_of=("valuesets", "allergies"),
)
def condition_absent(rule: dict[str, Any], ctx: Context) -> Outcome:
    """A current condition that must not be present (or, with on_absent=manual, that a
    person must still rule out)."""
    by_state, bad = _conditions_by_state(ctx, rule.get("valuesets", []))
    if rule.get("allergies"):
        allergic, bad_allergies = _conditions_by_state(
            ctx, rule["allergies"], ("AllergyIntolerance",)
        )
        for state, items in allergic.items():
            by_state[state] = by_state[state] + items
        bad = bad + bad_allergies
    what = ctx.titles([*rule.get("valuesets", []), *rule.get("allergies", [])])
    active, unconfirmed, inactive = (by_state[s] for s in ("active", "unconfirmed", "inactive"))
    confirm = rule.get("confirm")
    if active:
        if rule["on_found"] == "fail":
            return Outcome(Result.FAIL, _refs(active), f"Active on record: {_listing(active)}.")
        return Outcome(
            Result.UNKNOWN,
            _refs(active),
            f"Active on record: {_listing(active)}; {confirm or 'confirm whether it applies'}.",
        )
    if unconfirmed:
        return _unconfirmed(unconfirmed, "confirm or refute the diagnosis")
    if bad:
        return _malformed_unknown(ctx, bad, f"A {what} record")
    named = _named_conditions(ctx, rule.get("found_text", []))
    if named:
        return _named_unknown(
            ctx, rule["found_text"], named, "Not coded", confirm or "confirm whether it applies"
        )
    not_counted = f" (resolved, not counted: {_listing(inactive)})" if inactive else ""
    if rule.get("on_absent") == "manual":
        return Outcome(
            Result.MANUAL,
            _refs(inactive) or (ctx.record.patient_ref,),
            f"No active {what} on record{not_counted}; {confirm or 'confirm it'}.",
        )
    return Outcome(
        Result.PASS,
        _refs(inactive) or (ctx.record.patient_ref,),
        f"None on record: no active {what} on or before {ctx.as_of}{not_counted}.",
    )


@rule_kind(
    "history_absent",
    valuesets_param("procedures", ["Procedure"]),
    valuesets_param("medications", MEDICATION_TYPES),
    valuesets_param("conditions", ["Condition"]),
    valuesets_param("ambiguous_procedures", ["Procedure"]),
    # Body sites that settle an ambiguous procedure (issue 12: CPT 37243, embolization of an
    # unstated target, with Procedure.bodySite liver is hepatic).
    valuesets_param("ambiguous_unless_body_site", ["Procedure"]),
    # Procedures named in words by a record that does not code them as one of ``procedures``
    # (issue 12: a procedure whose text names TACE or Y90 is unknown, never "none on record").
    texts_param("ambiguous_text", ["Procedure"]),
    value_param("confirm", {"type": "string"}),
    # Procedures that count only together, on the same day (a Whipple coded as its parts).
    valuesets_param("same_day_procedures", ["Procedure"]),
    value_param("same_day_meaning", {"type": "string"}),
    # A history that only raises a question (e.g. radiotherapy, for "more than 25 % of the
    # bone marrow irradiated"): found -> unknown with `confirm`; none -> manual, never a pass.
    value_param("on_found", {"enum": ["fail", "unknown"]}),
    value_param("on_absent", {"enum": ["pass", "manual"]}),
    any_of=("procedures", "medications", "conditions"),
)
def history_absent(rule: dict[str, Any], ctx: Context) -> Outcome:
    """A treatment or procedure that must never have happened; nothing recorded passes
    (with on_found/on_absent, a manual criterion the record can inform)."""
    informs = rule.get("on_found") == "unknown"
    sources: list[tuple[Sequence[str], list[str]]] = [
        (("Procedure",), rule.get("procedures", [])),
        (MEDICATION_TYPES, rule.get("medications", [])),
        (("Condition",), rule.get("conditions", [])),
    ]
    found: list[Entry] = []
    for types, valuesets in sources:
        if valuesets:
            found.extend(ctx.entries(types, valuesets))
    good, bad = ctx.readable(found)
    certain = [e for e in good if e.status != "unknown"]
    uncertain_status = [e for e in good if e.status == "unknown"]
    names = ctx.titles(v for _, vs in sources for v in vs)
    if certain and informs:
        confirm = rule.get("confirm", "confirm whether it applies")
        return Outcome(
            Result.UNKNOWN, _refs(certain), f"On record: {_listing(certain)}; {confirm}."
        )
    if certain:
        return Outcome(Result.FAIL, _refs(certain), f"On record: {_listing(certain)}.")
    together = _same_day(ctx, rule.get("same_day_procedures", []))
    if together:
        meaning = rule.get("same_day_meaning", "together they count")
        return Outcome(
            Result.FAIL,
            _refs(together),
            f"On record on the same day: {_listing(together)}; {meaning}.",
        )
    ambiguous, bad_ambiguous = ctx.readable(
        ctx.entries(("Procedure",), rule.get("ambiguous_procedures", []))
    )
    settling = rule.get("ambiguous_unless_body_site", [])
    settled = [e for e in ambiguous if e.status != "unknown" and _at_body_site(ctx, e, settling)]
    if settled:
        site = _body_site_text(ctx, settled[0], settling)
        if informs:
            confirm = rule.get("confirm", "confirm whether it applies")
            return Outcome(
                Result.UNKNOWN, _refs(settled), f"On record: {_listing(settled)}; {confirm}."
            )
        return Outcome(
            Result.FAIL,
            _refs(settled),
            f"On record: {_listing(settled)}, performed on the {site}.",
        )
    named = [
        e
        for e in ctx.readable(ctx.named(("Procedure",), rule.get("ambiguous_text", [])))[0]
        if all(e is not a for a in ambiguous)
    ]
    if uncertain_status:
        return Outcome(
            Result.UNKNOWN,
            _refs(uncertain_status),
            f"Recorded with status 'unknown': {_listing(uncertain_status)}; "
            "confirm whether it was performed or given.",
        )
    if ambiguous:
        confirm = rule.get("confirm", "confirm what was done")
        return Outcome(
            Result.UNKNOWN,
            _refs(ambiguous),
            f"Possibly relevant: {_listing(ambiguous)}; {confirm}.",
        )
    if named:
        return _named_unknown(
            ctx,
            rule["ambiguous_text"],
            named,
            "Not coded as one",
            "confirm what was done (a code would decide it)",
        )
    if bad or bad_ambiguous:
        return _malformed_unknown(ctx, bad + bad_ambiguous, "A possibly relevant record")
    if rule.get("on_absent") == "manual":
        confirm = rule.get("confirm", "confirm it")
        return Outcome(
            Result.MANUAL,
            (ctx.record.patient_ref,),
            f"No {names} on record on or before {ctx.as_of}; {confirm}.",
        )
    return Outcome(
        Result.PASS,
        (ctx.record.patient_ref,),
        f"None on record: no {names} on or before {ctx.as_of}.",
    )


def _same_day(ctx: Context, valueset_ids: Sequence[str]) -> list[Entry]:
    """One readable, definitely performed procedure of each value set, all on one day (the
    latest such day); empty when there is no such day."""
    if not valueset_ids:
        return []
    by_set: list[dict[date, Entry]] = []
    for vs in valueset_ids:
        found = ctx.readable(ctx.entries(("Procedure",), [vs]))[0]
        by_set.append(
            {e.when.start: e for e in found if e.when is not None and e.status != "unknown"}
        )
    days = set(by_set[0]).intersection(*by_set[1:])
    if not days:
        return []
    day = max(days)
    return [entries[day] for entries in by_set]


# --- observations ----------------------------------------------------------------------


class Measurement(NamedTuple):
    """A quantity read from an Observation and converted to its analyte's unit."""

    entry: Entry
    value: float  # in the analyte's unit
    raw: str  # as reported, for the explanation ("18.8 umol/L")
    comparator: str | None  # "<", "<=", ">", ">=" when the lab reported a bound
    preliminary: bool
    converted: bool  # reported in another unit than the analyte's


def _quantity(resource: dict[str, Any]) -> dict[str, Any] | None:
    quantity = resource.get("valueQuantity")
    if isinstance(quantity, dict) and _is_number(quantity.get("value")):
        return quantity
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# A number as labs write it in valueString: an optional bound, the number (a dot for the
# decimal point; "1,000" is ambiguous between locales and is not read), an optional unit.
_NUMBER_TEXT = re.compile(r"^\s*(<=|>=|≤|≥|<|>)?\s*([-+]?\d+(?:\.\d+)?)\s*([^\d\s,.][^,]*)?\s*$")
_TEXT_COMPARATOR = {"≤": "<=", "≥": ">="}


def observed_quantity(resource: dict[str, Any]) -> dict[str, Any] | str:
    """An Observation's value as a FHIR Quantity (value, unit or code, comparator), whatever
    element carries it, or why it has none.

    FHIR R4 Observation.value[x]: ``valueQuantity``; ``valueInteger``; ``valueString``
    holding a number, a bound ("<0.2", ">20%") and perhaps a unit; ``valueRatio`` with a
    denominator of 1. ``dataAbsentReason`` says why there is no value, and is quoted.
    """
    quantity = _quantity(resource)
    if quantity is not None:
        return quantity
    integer = resource.get("valueInteger")
    if _is_number(integer):
        return {"value": integer}
    text = resource.get("valueString")
    if isinstance(text, str):
        m = _NUMBER_TEXT.match(text)
        if m is None:
            return f"reports {text.strip()[:40]!r}, not a number"
        number = m.group(2)
        parsed: dict[str, Any] = {"value": float(number) if "." in number else int(number)}
        if m.group(1):
            parsed["comparator"] = _TEXT_COMPARATOR.get(m.group(1), m.group(1))
        if m.group(3):
            parsed["unit"] = m.group(3).strip()
        return parsed
    ratio = resource.get("valueRatio")
    if isinstance(ratio, dict):
        numerator, denominator = ratio.get("numerator"), ratio.get("denominator")
        if (
            isinstance(numerator, dict)
            and _is_number(numerator.get("value"))
            and isinstance(denominator, dict)
            and denominator.get("value") == 1
            and not (denominator.get("unit") or denominator.get("code"))
        ):
            return numerator
        return "reports a ratio that is not a single quantity"
    absent = resource.get("dataAbsentReason")
    if absent is not None:
        reason = concept_display(absent) or next(iter(codings_of(absent)), ("", "unstated"))[1]
        return f"was reported without a value (data absent: {reason})"
    return "has no numeric value"


def _usable_observations(ctx: Context, valueset_id: str) -> list[Entry]:
    """Dated observations of a value set whose status allows their value to be used, newest
    first."""
    key = ("usable", valueset_id, ctx.as_of)
    cached: list[Entry] | None = ctx.record.selection_cache.get(key)
    if cached is None:
        cached = [
            e
            for e in ctx.entries(("Observation",), [valueset_id])
            if e.status in _USABLE and e.when is not None
        ]
        ctx.record.selection_cache[key] = cached
    return cached


def measure(analyte: Analyte, entry: Entry) -> Measurement | str:
    """Read and convert an Observation's value, or say why it cannot be used."""
    quantity = observed_quantity(entry.resource)
    if isinstance(quantity, str):
        return f"{entry.describe()}{_when(entry)} {quantity}"
    unit = normalize_unit(quantity)
    raw_unit = display_unit(unit) if unit else (quantity.get("unit") or quantity.get("code") or "")
    raw = f"{quantity['value']} {raw_unit}".strip()
    value = analyte.to_unit(float(quantity["value"]), unit)
    if value is None:
        if not raw_unit:
            # The LOINC code fixes what is measured but not the unit it is reported in.
            return (
                f"{analyte.label} {raw}{_when(entry)} ({entry.ref}) has no unit, so it cannot "
                f"be read as {display_unit(analyte.unit)}"
            )
        return (
            f"{analyte.label} {raw}{_when(entry)} ({entry.ref}) is in a unit that cannot be "
            f"converted to {display_unit(analyte.unit) or 'a ratio'}"
        )
    comparator = quantity.get("comparator")
    return Measurement(
        entry,
        value,
        raw,
        comparator if comparator in _OPS else None,
        entry.status == "preliminary",
        unit not in (analyte.unit, None),
    )


def _fmt(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".") if value % 1 else f"{value:.0f}"


def _show(m: Measurement, analyte: Analyte) -> str:
    converted = f"{_fmt(m.value)} {display_unit(analyte.unit)}".strip()
    shown = f"{m.raw} (= {converted})" if m.converted else m.raw
    prefix = _OP_TEXT[m.comparator] if m.comparator else ""
    return f"{analyte.label} {prefix}{shown}{_when(m.entry)} ({m.entry.ref})"


def _bound(q: Any, m: Measurement, analyte: Analyte) -> float | None:
    """One referenceRange bound in the analyte's unit. A bound without a unit is read in the
    result's own unit; a bound in a unit that cannot be converted is not used."""
    if not isinstance(q, dict) or not isinstance(q.get("value"), int | float):
        return None
    if q.get("unit") or q.get("code"):
        unit = normalize_unit(q)
        if unit is None:
            return None
    else:
        own = observed_quantity(m.entry.resource)
        unit = normalize_unit(own) if isinstance(own, dict) else None
    return analyte.to_unit(float(q["value"]), unit)


def _reference_range(
    m: Measurement, analyte: Analyte, sexes: dict[str, str], gender: str | None
) -> tuple[float | None, float | None]:
    """(low, high) of the result's own normal range, in the analyte's unit.

    FHIR R4 Observation.referenceRange: a range whose ``type`` is not "normal" (a therapeutic
    or treatment range, say) is not a normal range; when ranges differ by ``appliesTo``, the one
    naming the patient's sex wins over one that names none; a range for the other sex is never
    used. No population range is ever assumed.
    """
    ranked: list[tuple[int, dict[str, Any]]] = []
    for r in m.entry.resource.get("referenceRange") or ():
        if not isinstance(r, dict):
            continue
        kind = codings_of(r.get("type"))
        if kind and kind[0][1] != "normal":
            continue
        applies_to = [c for c in r.get("appliesTo") or () if isinstance(c, dict)]
        named = {sexes.get(f"{s}|{c}") for concept in applies_to for s, c in codings_of(concept)}
        named |= {str(c.get("text", "")).strip().lower() for c in applies_to}
        named &= {"male", "female"}
        if not named:
            ranked.append((1, r))
        elif gender in named:
            ranked.append((0, r))
    for _, r in sorted(ranked, key=lambda x: x[0]):
        low, high = _bound(r.get("low"), m, analyte), _bound(r.get("high"), m, analyte)
        if low is not None or high is not None:
            return low, high
    return None, None


def _decide(m: Measurement, op: str, limit: float) -> bool | None:
    """Whether the measured value meets ``op limit``; ``None`` when a reported bound
    ("< 0.5") leaves it open."""
    compare = _OPS[op]
    if m.comparator is None:
        return compare(m.value, limit)
    # The true value lies beyond the reported bound: decide only if every value there agrees.
    if m.comparator in ("<", "<="):
        if op in ("<", "<="):
            return True if m.value <= limit else None
        return False if m.value <= limit else None
    if op in (">", ">="):
        return True if m.value >= limit else None
    return False if m.value >= limit else None


def _window(lookback_days: int, ctx: Context) -> str:
    return f"the {lookback_days} days before {ctx.as_of}"


def latest_in_window(
    ctx: Context,
    valueset_id: str,
    label: str,
    lookback_days: int,
    show: Callable[[Entry], str] | None = None,
) -> Entry | Outcome:
    """The latest usable, readable observation of a value set if it lies in the look-back
    window; else an UNKNOWN outcome that says what is missing and what would resolve it."""
    entries = _usable_observations(ctx, valueset_id)
    if not entries:
        return Outcome(
            Result.UNKNOWN,
            (ctx.record.patient_ref,),
            f"No {label} on record; one from {_window(lookback_days, ctx)} would decide it.",
        )
    latest = entries[0]
    assert latest.when is not None  # noqa: S101 - filtered by _usable_observations
    if latest.when.end < ctx.window_start(lookback_days):
        return Outcome(
            Result.UNKNOWN,
            (latest.ref,),
            f"Latest {label}: {show(latest) if show else latest.describe() + _when(latest)}, "
            f"older than {_window(lookback_days, ctx)}; a new one would decide it.",
        )
    if ctx.record.invalid_reason(latest):
        return _malformed_unknown(ctx, [latest], f"The latest {label}")
    return latest


def latest_measurement(ctx: Context, analyte: Analyte, lookback_days: int) -> Measurement | Outcome:
    """The latest usable result of ``analyte`` in the look-back window, converted, or an
    UNKNOWN outcome that says what would resolve it. Kept on the record: both trials and the
    creatinine clearance ask for the same analytes."""
    key = ("measurement", analyte.id, lookback_days, ctx.as_of)
    known: Measurement | Outcome | None = ctx.record.selection_cache.get(key)
    if known is None:
        known = _latest_measurement(ctx, analyte, lookback_days)
        ctx.record.selection_cache[key] = known
    return known


def _latest_measurement(
    ctx: Context, analyte: Analyte, lookback_days: int
) -> Measurement | Outcome:

    def show(entry: Entry) -> str:
        measured = measure(analyte, entry)
        return (
            _show(measured, analyte)
            if isinstance(measured, Measurement)
            else entry.describe() + _when(entry)
        )

    latest = latest_in_window(ctx, analyte.valueset, f"{analyte.label} result", lookback_days, show)
    if isinstance(latest, Outcome):
        return latest
    measured = measure(analyte, latest)
    if isinstance(measured, str):
        return Outcome(
            Result.UNKNOWN,
            (latest.ref,),
            f"{measured}; a result with a usable value would decide it.",
        )
    return measured


@rule_kind(
    "lab",
    analyte_param("analyte", required=True),
    value_param("acceptable", {"$ref": "#/$defs/threshold"}, required=True),
    value_param("lookback_days", {"type": "integer", "minimum": 1}),
    value_param("correctable_by_transfusion", {"type": "boolean"}),
    analyte_param(
        "unless_within_normal_range",
        description="analyte whose result within its own reference range overrides a fail",
    ),
    analyte_param(
        "unknown_if_within_normal_range",
        description="analyte whose result within its own reference range contradicts a fail",
    ),
    value_param(
        "acceptable_by_unit",
        {"type": "array", "items": {"$ref": "#/$defs/threshold"}},
    ),
    # a reference range may apply to one sex (Observation.referenceRange.appliesTo)
    patient_elements=SEX_ELEMENTS,
)
def lab(rule: dict[str, Any], ctx: Context) -> Outcome:
    """A laboratory limit, absolute or as a multiple of the result's own ULN."""
    analyte = ctx.trials.analytes[rule["analyte"]]
    lookback = rule.get("lookback_days", ctx.trial.lab_lookback_days)
    measured = latest_measurement(ctx, analyte, lookback)
    if isinstance(measured, Outcome):
        return measured
    acceptable = rule["acceptable"]
    op = acceptable["op"]
    if "uln_multiple" in acceptable:
        uln = _reference_range(
            measured, analyte, ctx.trials.answers.get("sex", {}), ctx.record.gender
        )[1]
        if uln is None:
            return Outcome(
                Result.UNKNOWN,
                (measured.entry.ref,),
                f"{_show(measured, analyte)} has no reference range upper limit, so "
                f"{_OP_TEXT[op]} {_fmt(acceptable['uln_multiple'])} × ULN cannot be judged "
                "(no population ULN is assumed); the lab's reference range would decide it.",
            )
        limit = acceptable["uln_multiple"] * uln
        unit = display_unit(analyte.unit)
        limit_text = (
            f"{_OP_TEXT[op]} {_fmt(acceptable['uln_multiple'])} × ULN "
            f"({_fmt(uln)} {unit}) = {_fmt(limit)} {unit}"
        )
    else:
        # A protocol that states its limit in two units ("Hb < 5.0 mmol/L (< 8.0 g/dL)") means
        # each for results reported in that unit; the two are not exact conversions.
        reported = normalize_unit(_quantity(measured.entry.resource) or {})
        acceptable = next(
            (
                a
                for a in rule.get("acceptable_by_unit", ())
                if a.get("unit") == reported
                and analyte.to_unit(float(a["value"]), a["unit"]) is not None
            ),
            acceptable,
        )
        op = acceptable["op"]
        converted = analyte.to_unit(float(acceptable["value"]), acceptable["unit"])
        assert converted is not None  # noqa: S101 - checked when the definition was loaded
        limit = converted
        limit_text = (
            f"{_OP_TEXT[op]} {_fmt(acceptable['value'])} {display_unit(acceptable['unit'])}"
        )
        limit_text = limit_text.rstrip()
    meets = _decide(measured, op, limit)
    shown = _show(measured, analyte)
    if meets is None:
        return Outcome(
            Result.UNKNOWN,
            (measured.entry.ref,),
            f"{shown} is reported as a bound that does not settle {limit_text}; "
            "an exact value would decide it.",
        )
    if measured.preliminary:
        return Outcome(
            Result.UNKNOWN,
            (measured.entry.ref,),
            f"{shown} is preliminary ({'meets' if meets else 'does not meet'} {limit_text}); "
            "the final result would decide it.",
        )
    if meets:
        return Outcome(Result.PASS, (measured.entry.ref,), f"{shown} meets {limit_text}.")
    explanation = f"{shown} does not meet {limit_text}."
    if rule.get("unless_within_normal_range"):
        rescued = _normal_range_exception(rule["unless_within_normal_range"], ctx, lookback)
        if isinstance(rescued, Outcome):
            return Outcome(
                rescued.result,
                (measured.entry.ref, *rescued.evidence),
                f"{explanation[:-1]}, but {rescued.explanation}",
            )
        explanation += f" {rescued}"
    if rule.get("unknown_if_within_normal_range"):
        contradicted = _normal_range_exception(
            rule["unknown_if_within_normal_range"], ctx, lookback
        )
        if isinstance(contradicted, Outcome):
            return Outcome(
                Result.UNKNOWN,
                (measured.entry.ref, *contradicted.evidence),
                f"{explanation[:-1]}, but {contradicted.explanation[:-1].split(', which')[0]}: "
                "the two are inconsistent; repeat or confirm the results.",
            )
        explanation += f" {contradicted}"
    if rule.get("correctable_by_transfusion"):
        side = "below" if op in (">", ">=") else "above"
        return Outcome(
            Result.UNKNOWN,
            (measured.entry.ref,),
            f"{explanation[:-1]}: {side} the limit now; the protocol allows correction by "
            "transfusion, so a result after transfusion would decide it.",
        )
    return Outcome(Result.FAIL, (measured.entry.ref,), explanation)


def _normal_range_exception(analyte_id: str, ctx: Context, lookback: int) -> Outcome | str:
    """The protocol's "unless <analyte> is within the normal range": an Outcome that passes
    when the latest result lies within its own reference range, else a sentence saying why
    the exception does not apply."""
    analyte = ctx.trials.analytes[analyte_id]
    measured = latest_measurement(ctx, analyte, lookback)
    if isinstance(measured, Outcome):
        return (
            f"The protocol's exception (a {analyte.label} within the normal range) could not be "
            f"applied: {measured.explanation}"
        )
    low, high = _reference_range(
        measured, analyte, ctx.trials.answers.get("sex", {}), ctx.record.gender
    )
    shown = _show(measured, analyte)
    if low is None or high is None:
        return f"{shown} has no complete reference range, so the protocol's exception cannot apply."
    if measured.preliminary or measured.comparator:
        return f"{shown} is not a final exact value, so the protocol's exception cannot apply."
    if low <= measured.value <= high:
        return Outcome(
            Result.PASS,
            (measured.entry.ref,),
            f"{shown} is within its normal range {_fmt(low)}–{_fmt(high)} "
            f"{display_unit(analyte.unit)}, which the protocol accepts.",
        )
    return (
        f"{shown} is outside its normal range {_fmt(low)}–{_fmt(high)} "
        f"{display_unit(analyte.unit)}, so the protocol's exception does not apply."
    )


@rule_kind(
    "condition_with_lab",
    valuesets_param("valuesets", ["Condition"], required=True),
    rule_param("lab", "lab", required=True),
)
def condition_with_lab(rule: dict[str, Any], ctx: Context) -> Outcome:
    """A condition that excludes only when a lab shows it uncontrolled."""
    by_state, bad = _conditions_by_state(ctx, rule["valuesets"])
    active = by_state["active"] + by_state["unconfirmed"]
    what = ctx.titles(rule["valuesets"])
    if not active:
        if bad:
            return _malformed_unknown(ctx, bad, f"A {what} record")
        return Outcome(
            Result.PASS,
            (ctx.record.patient_ref,),
            f"None on record: no active {what} on or before {ctx.as_of}.",
        )
    inner = lab(rule["lab"], ctx)
    return Outcome(
        inner.result,
        _refs(active) + inner.evidence,
        f"{what} on record ({_listing(active)}). {inner.explanation}",
    )


@rule_kind(
    "condition_with_class",
    valuesets_param("valuesets", ["Condition"], required=True),
    # Observations that record the class as their coded value (LOINC 88020-3 "Functional
    # capacity NYHA"); an Observation coded with a class finding itself is read too.
    valuesets_param("class_observations", ["Observation"], required=True),
    # The classes, matched against a class Observation's value or an Observation's own code.
    valuesets_param("passing_classes", ["Observation"], required=True),
    valuesets_param("failing_classes", ["Observation"], required=True),
    value_param("class_label", {"type": "string"}, required=True),
    value_param("lookback_days", {"type": "integer", "minimum": 1}, required=True),
    # A class Observation whose value is words, not a code (valueString or a concept's text:
    # "NYHA class III", "Class 2"): regular expressions, matched whole and in any case.
    value_param(
        "class_text",
        {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                side: {"type": "array", "items": {"type": "string", "minLength": 1}}
                for side in ("passing", "failing")
            },
        },
    ),
)
def condition_with_class(rule: dict[str, Any], ctx: Context) -> Outcome:
    """A condition that excludes only in some classes (heart failure in NYHA class II-IV): the
    latest class recorded in the look-back window decides while the condition is active; a
    condition with no current, readable class is unknown, saying what would resolve it."""
    by_state, bad = _conditions_by_state(ctx, rule["valuesets"])
    what = ctx.titles(rule["valuesets"])
    label = rule["class_label"]
    lookback = rule["lookback_days"]
    active = by_state["active"]
    latest = _latest_class_record(rule, ctx)
    current = (
        latest
        if latest is not None
        and latest.when is not None
        and latest.when.end >= ctx.window_start(lookback)
        and not ctx.record.invalid_reason(latest)
        else None
    )
    if not active:
        if by_state["unconfirmed"]:
            return _unconfirmed(by_state["unconfirmed"], "confirm or refute the diagnosis")
        if bad:
            return _malformed_unknown(ctx, bad, f"A {what} record")
        found = _class_of(rule, ctx, current) if current is not None else None
        if found is not None and found[0] is Result.FAIL and current is not None:
            # The class only describes the condition: a failing class with the condition not
            # coded is a coding gap, never "none on record".
            return Outcome(
                Result.UNKNOWN,
                (current.ref,),
                f"No active {what} coded, but {label} {found[1]}{_when(current)} ({current.ref}) "
                f"is on record; confirm the diagnosis and the class.",
            )
        inactive = by_state["inactive"]
        not_counted = f" (resolved, not counted: {_listing(inactive)})" if inactive else ""
        return Outcome(
            Result.PASS,
            _refs(inactive) or (ctx.record.patient_ref,),
            f"None on record: no active {what} on or before {ctx.as_of}{not_counted}.",
        )
    listed = f"{what} on record ({_listing(active)})"
    evidence = _refs(active)
    if latest is None:
        return Outcome(
            Result.UNKNOWN,
            evidence,
            f"{listed}, but no {label} recorded; a {label} from {_window(lookback, ctx)} "
            "would decide it.",
        )
    assert latest.when is not None  # noqa: S101 - filtered by _latest_class_record
    if latest.when.end < ctx.window_start(lookback):
        old = _class_of(rule, ctx, latest)
        shown = f"{old[1]} ({latest.ref})" if old else latest.describe()
        return Outcome(
            Result.UNKNOWN,
            (*evidence, latest.ref),
            f"{listed}; the latest {label}, {shown}{_when(latest)}, is older than "
            f"{_window(lookback, ctx)}; a current {label} would decide it.",
        )
    if ctx.record.invalid_reason(latest):
        bad_class = _malformed_unknown(ctx, [latest], f"The latest {label}")
        return Outcome(bad_class.result, (*evidence, latest.ref), bad_class.explanation)
    found = _class_of(rule, ctx, latest)
    if found is None:
        return Outcome(
            Result.UNKNOWN,
            (*evidence, latest.ref),
            f"{listed}; the latest {label}, {latest.describe()}{_when(latest)}, states no "
            f"class the service can read (or more than one); a coded {label} would decide it.",
        )
    result, shown = found
    text = f"{listed}; latest {label}: {shown}{_when(latest)} ({latest.ref})"
    if latest.status == "preliminary":
        return Outcome(
            Result.UNKNOWN,
            (*evidence, latest.ref),
            f"{text}, preliminary; the final {label} would decide it.",
        )
    classes = rule["passing_classes"] if result is Result.PASS else rule["failing_classes"]
    return Outcome(result, (*evidence, latest.ref), f"{text}: {ctx.titles(classes)}.")


def _latest_class_record(rule: dict[str, Any], ctx: Context) -> Entry | None:
    """The latest dated Observation of a usable status that records a class, either as its
    value or as its own code."""
    sets = [*rule["class_observations"], *rule["passing_classes"], *rule["failing_classes"]]
    return next(
        (
            e
            for e in ctx.entries(("Observation",), sets)
            if e.status in _USABLE and e.when is not None
        ),
        None,
    )


def _class_of(rule: dict[str, Any], ctx: Context, entry: Entry) -> tuple[Result, str] | None:
    """(PASS or FAIL, the class as recorded) for a class record; ``None`` when it states no
    class of either kind, or classes of both."""
    asks = any(
        ctx.trials.valueset(vs).contains_key(k)
        for vs in rule["class_observations"]
        for k in entry.keys
    )
    concept = entry.resource.get("valueCodeableConcept") if asks else None
    keys = codings_of(concept) if asks else list(entry.keys)

    def holds(valueset_ids: Sequence[str]) -> str | None:
        for vs_id in valueset_ids:
            vs = ctx.trials.valueset(vs_id)
            for k in keys:
                if vs.contains_key(k):
                    return vs.displays.get(k, k[1])
        return None

    passing, failing = holds(rule["passing_classes"]), holds(rule["failing_classes"])
    if asks and passing is None and failing is None and "class_text" in rule:
        words = entry.resource.get("valueString")
        if not isinstance(words, str) and isinstance(concept, dict):
            words = concept.get("text")
        if isinstance(words, str):
            passing = words if _says(rule["class_text"].get("passing", ()), words) else None
            failing = words if _says(rule["class_text"].get("failing", ()), words) else None
    if (passing is None) == (failing is None):
        return None
    result = Result.PASS if passing is not None else Result.FAIL
    named = passing or failing or ""
    if asks:
        shown = concept_display(concept) or named
    else:
        shown = entry.display or named
    return result, shown


@functools.lru_cache(maxsize=256)
def _compiled_whole(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


def _says(patterns: Iterable[str], words: str) -> bool:
    """Whether ``words`` (trimmed) is wholly one of the patterns."""
    text = words.strip()
    return any(_compiled_whole(p).fullmatch(text) for p in patterns)


def _scale_value(resource: dict[str, Any], answers: dict[str, int]) -> int | None:
    if isinstance(resource.get("valueInteger"), int):
        return int(resource["valueInteger"])
    quantity = _quantity(resource)
    if quantity is not None and float(quantity["value"]).is_integer():
        return int(quantity["value"])
    for system, code in codings_of(resource.get("valueCodeableConcept")):
        if f"{system}|{code}" in answers:
            return answers[f"{system}|{code}"]
    return None


@rule_kind(
    "performance_status",
    value_param("scale", {"const": "ecog"}, required=True),
    value_param("max", {"type": "integer", "minimum": 0, "maximum": 5}, required=True),
    value_param("lookback_days", {"type": "integer", "minimum": 1}),
    fixed_valuesets={"Observation": ("ecog",)},
)
def performance_status(rule: dict[str, Any], ctx: Context) -> Outcome:
    """ECOG performance status at most ``max``, from the latest score in the window."""
    lookback = rule.get("lookback_days", ctx.trial.performance_status_lookback_days)
    latest = latest_in_window(ctx, "ecog", "ECOG performance status", lookback)
    if isinstance(latest, Outcome):
        return latest
    score = _scale_value(latest.resource, ctx.trials.answers.get("ecog", {}))
    if score is None or not 0 <= score <= 5:
        return Outcome(
            Result.UNKNOWN,
            (latest.ref,),
            f"ECOG observation {latest.ref}{_when(latest)} has no readable score (0-5); "
            "a recorded score would decide it.",
        )
    limit = rule["max"]
    text = f"ECOG {score}{_when(latest)} ({latest.ref})"
    if latest.status == "preliminary":
        return Outcome(
            Result.UNKNOWN, (latest.ref,), f"{text} is preliminary; a final score would decide it."
        )
    if score <= limit:
        return Outcome(Result.PASS, (latest.ref,), f"{text} is within 0-{limit}.")
    return Outcome(Result.FAIL, (latest.ref,), f"{text} is above {limit}.")


# --- demographics and derived values ----------------------------------------------------


# FHIR R4 ResearchSubject.status values that mean the patient is (about to be) on a study;
# candidate, eligible, screening and the like do not (the sweep's own write-back gives
# candidates "candidate" or "potential-candidate").
_ON_STUDY = {"on-study", "on-study-intervention", "on-study-observation", "pending-on-study"}


@rule_kind(
    "other_study_enrolment",
    value_param("confirm", {"type": "string"}, required=True),
    fixed_types=("ResearchSubject",),
)
def other_study_enrolment(rule: dict[str, Any], ctx: Context) -> Outcome:
    """A manual criterion the record can inform (issue 12: "an active ResearchSubject in another
    study is unknown"): the patient on another study makes it unknown, naming the study;
    nothing on record leaves it manual, never a pass."""
    found: list[tuple[Entry, str]] = []
    readable, bad = ctx.readable(ctx.record.entries.get("ResearchSubject", ()))
    for entry in readable:
        resource = entry.resource
        if resource.get("status") not in _ON_STUDY:
            continue
        if entry.when is not None and entry.when.start > ctx.as_of:
            continue
        if entry.until is not None and entry.until.end < ctx.as_of:
            continue
        study = _study_name(resource.get("study"))
        named_study = resource.get("study")
        reference = named_study.get("reference") if isinstance(named_study, dict) else None
        own_key = f"{ctx.trial.id}:"
        if ctx.trial.id in f"{study} {reference}" or any(
            isinstance(i, dict) and str(i.get("value", "")).startswith(own_key)
            for i in resource.get("identifier") or ()
        ):
            continue  # this trial itself (the sweep's write-back keys it "NCT...:patient")
        found.append((entry, study))
    if found:
        listed = "; ".join(
            f"{study}, {entry.resource['status']}"
            + (f" since {entry.when}" if entry.when else "")
            + f" ({entry.ref})"
            for entry, study in found[:_MAX_LISTED]
        )
        return Outcome(
            Result.UNKNOWN,
            _refs(e for e, _ in found),
            f"On another study: {listed}; {rule['confirm']}.",
        )
    if bad:
        return _malformed_unknown(ctx, bad, "A study enrolment record")
    return Outcome(
        Result.MANUAL,
        (ctx.record.patient_ref,),
        f"No enrolment in another study on record on or before {ctx.as_of}; {rule['confirm']}.",
    )


def _study_name(study: Any) -> str:
    """How a ResearchSubject names its study: the display, the business identifier (a
    registry number), or the reference."""
    if not isinstance(study, dict):
        return "a study"
    identifier = study.get("identifier")
    value = identifier.get("value") if isinstance(identifier, dict) else None
    named = [p for p in (study.get("display"), value) if isinstance(p, str) and p.strip()]
    if named:
        return " ".join(dict.fromkeys(named))
    reference = study.get("reference")
    return f"the study {reference}" if isinstance(reference, str) else "a study"


@rule_kind("alive", patient_elements=("deceasedBoolean", "deceasedDateTime"))
def alive(rule: dict[str, Any], ctx: Context) -> Outcome:
    """The service's precondition: a patient recorded as deceased (FHIR R4
    Patient.deceased[x]) on or before the screening date is never a candidate."""
    ref = ctx.record.patient_ref
    deceased, when = ctx.record.deceased()
    if deceased is None:
        return Outcome(
            Result.UNKNOWN,
            (ref,),
            f"A death date is recorded but cannot be read ({ref}); confirm the patient is alive.",
        )
    if deceased and (when is None or when.start <= ctx.as_of):
        on = f" on {when}" if when else ""
        return Outcome(Result.FAIL, (ref,), f"Recorded as deceased{on} ({ref}).")
    return Outcome(Result.PASS, (ref,), f"No death recorded on or before {ctx.as_of} ({ref}).")


def _add_years(day: date, years: int) -> date:
    try:
        return day.replace(year=day.year + years)
    except ValueError:  # 29 February in a non-leap year: the birthday falls on 1 March
        return date(day.year + years, 3, 1)


def age_years(birth: date, on: date) -> int:
    years = on.year - birth.year
    return years - ((on.month, on.day) < (birth.month, birth.day))


@rule_kind(
    "age",
    value_param("op", {"enum": [">", ">="]}, required=True),
    value_param("years", {"type": "integer", "minimum": 0}, required=True),
    patient_elements=("birthDate",),
)
def age(rule: dict[str, Any], ctx: Context) -> Outcome:
    """Age on the as-of date. "> 18 years" is read literally: the 18th birthday has passed."""
    born = ctx.record.birth_date
    ref = ctx.record.patient_ref
    if born is None:
        return Outcome(
            Result.UNKNOWN, (ref,), f"No birth date on {ref}; a birth date would decide it."
        )
    if ctx.as_of < born.start:
        return Outcome(
            Result.UNKNOWN,
            (ref,),
            f"Birth date {born} ({ref}) is after the screening date {ctx.as_of}; a correct "
            "birth date or screening date would decide it.",
        )
    years = rule["years"]
    strict = rule["op"] == ">"

    def meets(birth: date) -> bool:
        birthday = _add_years(birth, years)
        return ctx.as_of > birthday if strict else ctx.as_of >= birthday

    earliest, latest = meets(born.end), meets(born.start)
    limit = f"{_OP_TEXT[rule['op']]} {years} years"
    if earliest != latest:
        return Outcome(
            Result.UNKNOWN,
            (ref,),
            f"Birth date {born} ({ref}) is too imprecise to tell whether the age on "
            f"{ctx.as_of} is {limit}; a full birth date would decide it.",
        )
    shown_age = age_years(born.start, ctx.as_of)
    text = f"Age {shown_age} on {ctx.as_of} (born {born}, {ref})"
    if earliest:
        return Outcome(Result.PASS, (ref,), f"{text} is {limit}.")
    return Outcome(Result.FAIL, (ref,), f"{text} is not {limit}.")


@rule_kind(
    "creatinine_clearance",
    value_param("min_ml_min", {"type": "number"}, required=True),
    value_param("lookback_days", {"type": "integer", "minimum": 1}),
    fixed_analytes=("creatinine", "body-weight", "measured-creatinine-clearance"),
    patient_elements=("birthDate", *SEX_ELEMENTS),
)
def creatinine_clearance(rule: dict[str, Any], ctx: Context) -> Outcome:
    """Cockcroft-Gault creatinine clearance, with a measured clearance as the protocol's
    confirmatory exam: CrCl = (140 - age) x weight[kg] / (72 x Scr[mg/dL]), x 0.85 if female
    (Cockcroft & Gault, Nephron 1976)."""
    record = ctx.record
    missing: list[str] = []
    evidence: list[str] = [record.patient_ref]
    born = record.birth_date
    if born is None or born.start != born.end:
        missing.append("a full birth date")
    if record.gender not in ("male", "female"):
        missing.append("sex (male or female) for the Cockcroft-Gault formula")
    weight = latest_measurement(
        ctx, ctx.trials.analytes["body-weight"], ctx.trial.weight_lookback_days
    )
    creatinine = latest_measurement(
        ctx, ctx.trials.analytes["creatinine"], ctx.trial.lab_lookback_days
    )
    for name, m in (("body weight", weight), ("serum creatinine", creatinine)):
        if isinstance(m, Outcome):
            missing.append(f"{name} ({m.explanation.rstrip('.')})")
        elif m.preliminary or m.comparator:
            missing.append(f"a final exact {name} (have {m.raw})")
    if missing or isinstance(weight, Outcome) or isinstance(creatinine, Outcome) or born is None:
        return Outcome(
            Result.UNKNOWN,
            tuple(evidence),
            "Creatinine clearance cannot be calculated: missing " + "; ".join(missing) + ".",
        )
    years = age_years(born.start, ctx.as_of)
    female = record.gender == "female"
    if creatinine.value <= 0:
        return Outcome(
            Result.UNKNOWN, (creatinine.entry.ref,), "Serum creatinine of 0 cannot be used."
        )
    clearance = (140 - years) * weight.value / (72 * creatinine.value) * (0.85 if female else 1.0)
    evidence += [weight.entry.ref, creatinine.entry.ref]
    sex, sex_source = record.sex
    if sex_source != "gender":
        sex = f"{sex} (from the {sex_source} extension)"
    inputs = (
        f"age {years}, {sex}, weight {_fmt(weight.value)} kg{_when(weight.entry)} "
        f"({weight.entry.ref}), creatinine {_fmt(creatinine.value)} mg/dL"
        f"{_when(creatinine.entry)} ({creatinine.entry.ref})"
    )
    limit = rule["min_ml_min"]
    text = f"Cockcroft-Gault creatinine clearance {clearance:.0f} mL/min ({inputs})"
    if clearance >= limit:
        return Outcome(Result.PASS, tuple(evidence), f"{text} is ≥ {_fmt(limit)} mL/min.")
    measured = latest_measurement(
        ctx, ctx.trials.analytes["measured-creatinine-clearance"], ctx.trial.lab_lookback_days
    )
    if isinstance(measured, Measurement) and not measured.preliminary and not measured.comparator:
        shown = _show(measured, ctx.trials.analytes["measured-creatinine-clearance"])
        if measured.value >= limit:
            return Outcome(
                Result.PASS,
                (*evidence, measured.entry.ref),
                f"{text} is below {_fmt(limit)} mL/min, but the confirmatory measured clearance "
                f"{shown} is ≥ {_fmt(limit)} mL/min.",
            )
        return Outcome(
            Result.FAIL,
            (*evidence, measured.entry.ref),
            f"{text} is below {_fmt(limit)} mL/min, confirmed by {shown}.",
        )
    return Outcome(
        Result.FAIL,
        tuple(evidence),
        f"{text} is below {_fmt(limit)} mL/min (no measured clearance to confirm; the "
        "protocol treats it as confirmatory only).",
    )


# --- grade -------------------------------------------------------------------------------


def _grade_of_concept(ctx: Context, concept: Any) -> int | None:
    for grade in (1, 2, 3):
        vs = ctx.trials.valueset(f"net-grade-{grade}")
        if any(vs.contains_key(k) for k in codings_of(concept)):
            return grade
    return None


#: the Conditions that name the NET a grade or Ki-67 result may be about
_NET_CONDITIONS = (
    "net-diagnosis",
    "pancreatic-net",
    "poorly-differentiated-net",
    "neuroendocrine-carcinoma-nos",
    "net-grade-1",
    "net-grade-2",
    "net-grade-3",
    "net-morphology-g2-or-g3",
)


def _about_another_tumour(ctx: Context, entry: Entry) -> bool:
    """Whether an Observation's ``focus`` names something other than a NET on record (FHIR R4
    Observation.focus: what the result is about when not the subject itself), such as a
    resolved colon cancer's grade: such a result never decides the NET's grade."""
    focus = entry.resource.get("focus")
    if not isinstance(focus, list) or not focus:
        return False
    nets = {e.ref for e in ctx.entries(("Condition",), _NET_CONDITIONS)}
    for target in focus:
        reference = target.get("reference") if isinstance(target, dict) else None
        if isinstance(reference, str):
            parts = reference.split("/_history/", 1)[0].rstrip("/").split("/")
            if "/".join(parts[-2:]) in nets:
                return False
    return True


# A grade written as text: "G2", "Grade 2", "grade II" (a pathology report's wording).
_GRADE_TEXT = re.compile(r"\b(?:grade|g)\s*[:\-]?\s*(iii|ii|i|[123])\b", re.IGNORECASE)
_ROMAN = {"i": 1, "ii": 2, "iii": 3, "1": 1, "2": 2, "3": 3}


def _grade_of_text(resource: dict[str, Any]) -> int | None:
    """The grade a grade Observation states only as text (valueString, or the text of an
    uncoded valueCodeableConcept); None unless exactly one grade is named."""
    texts = [resource.get("valueString")]
    concept = resource.get("valueCodeableConcept")
    if isinstance(concept, dict):
        texts.append(concept.get("text"))
        texts += [c.get("display") for c in concept.get("coding") or () if isinstance(c, dict)]
    found = {
        _ROMAN[m.group(1).lower()]
        for text in texts
        if isinstance(text, str)
        for m in _GRADE_TEXT.finditer(text)
    }
    return found.pop() if len(found) == 1 else None


def _who_grade(value: float, g2_from: float, g3_above: float) -> int:
    return 1 if value < g2_from else 2 if value <= g3_above else 3


def _who_grades(m: Measurement, g2_from: float, g3_above: float) -> tuple[int, int]:
    """The lowest and highest WHO grade an index result allows: one grade for an exact value,
    possibly one for a reported bound ("> 20 %" is G3, "< 2 %" below 3 %)."""
    eps = 1e-9
    if m.comparator == "<":
        return 1, _who_grade(m.value - eps, g2_from, g3_above)
    if m.comparator == "<=":
        return 1, _who_grade(m.value, g2_from, g3_above)
    if m.comparator == ">":
        return _who_grade(m.value + eps, g2_from, g3_above), 3
    if m.comparator == ">=":
        return _who_grade(m.value, g2_from, g3_above), 3
    g = _who_grade(m.value, g2_from, g3_above)
    return g, g


class _Index(NamedTuple):
    """One grading index's result (a Ki-67 index or a mitotic count): the lowest and highest
    WHO grade it allows, and how to name it in an explanation."""

    low: int
    high: int
    m: Measurement
    text: str

    @property
    def exact(self) -> bool:
        return self.low == self.high

    @property
    def span(self) -> str:
        return f"G{self.low}" if self.exact else f"G{self.low}-G{self.high}"


# A mitotic count's unit as pathology reports and FHIR examples write it: per 10 high power
# fields or per 2 mm² ("/10 HPF", "per 10 HPF", "mitoses/2 mm2", UCUM "/(10.[HPF])").
_MITOSES_UNIT = re.compile(
    r"^(?:mitos[ie]s|\{mitos[ie]s\}|#)?\s*(?:/|per)\s*\(?\s*"
    r"(?:10\s*\.?\s*\[?hpfs?\]?|2\s*\.?\s*mm(?:2|²|\^2))\s*\)?$",
    re.IGNORECASE,
)
# A unit that only counts (UCUM "1", or a bare annotation such as "{HPF}" or "{mitoses}"): the
# count is then per the code's own denominator (SNOMED CT 406094009: per 10 HPF).
_COUNT_ONLY_UNIT = re.compile(r"^(?:1|\{[^{}/]*\})$")


def _mitotic_count(entry: Entry) -> Measurement | str:
    """A mitotic count per 10 HPF (= 2 mm² for the WHO cut-offs), or why it cannot be read: a
    count over another area (per HPF, per 50 HPF, per mm²) is not converted."""
    quantity = observed_quantity(entry.resource)
    if isinstance(quantity, str):
        return f"{entry.describe()}{_when(entry)} {quantity}"
    for unit in (quantity.get("unit"), quantity.get("code")):
        if not isinstance(unit, str) or not unit.strip():
            continue
        unit = unit.strip()
        if not (_MITOSES_UNIT.match(unit) or _COUNT_ONLY_UNIT.match(unit)):
            return (
                f"Mitotic count {quantity['value']} {unit}{_when(entry)} ({entry.ref}) is not "
                "per 10 HPF or per 2 mm², the area the WHO cut-offs count over"
            )
    value = float(quantity["value"])
    if value < 0:
        return f"Mitotic count {quantity['value']}{_when(entry)} ({entry.ref}) is negative"
    comparator = quantity.get("comparator")
    return Measurement(
        entry,
        value,
        _fmt(value),
        comparator if comparator in _OPS else None,
        entry.status == "preliminary",
        False,
    )


def _ki67_text(m: Measurement) -> str:
    bound = _OP_TEXT.get(m.comparator or "", "")
    return f"Ki-67 {bound}{_fmt(m.value)} %{_when(m.entry)} ({m.entry.ref})"


def _mitoses_text(m: Measurement) -> str:
    bound = _OP_TEXT.get(m.comparator or "", "")
    shown = f"{bound}{_fmt(m.value)} per 10 HPF (2 mm²)"
    return f"mitotic count {shown}{_when(m.entry)} ({m.entry.ref})"


def _indices(
    ctx: Context,
    entries: Iterable[Entry],
    read: Callable[[Entry], Measurement | str],
    cut_offs: tuple[float, float],
    show: Callable[[Measurement], str],
    unreadable: list[str] | None = None,
) -> tuple[list[_Index], list[_Index]]:
    """The readable results of one grading index, newest first: (those that decide a grade,
    those whose reported bound leaves it open). Why the others cannot be read is added to
    ``unreadable`` when given."""
    exact: list[_Index] = []
    open_bounds: list[_Index] = []
    for entry in entries:
        invalid = ctx.record.invalid_reason(entry)
        m = (
            f"{entry.describe()}{_when(entry)} could not be read ({invalid})"
            if invalid
            else read(entry)
        )
        if isinstance(m, Measurement):
            low, high = _who_grades(m, *cut_offs)
            (exact if low == high else open_bounds).append(_Index(low, high, m, show(m)))
        elif unreadable is not None:
            unreadable.append(m)
    return exact, open_bounds


def _disagreeing(name: str, exact: list[_Index]) -> Outcome | None:
    """UNKNOWN when results of one index lie on either side of a WHO boundary (different
    specimens, or a progression): which one grades the tumour is a pathologist's call."""
    if len({i.low for i in exact}) <= 1:
        return None
    listed = "; ".join(f"{i.text}: G{i.low}" for i in exact[:_MAX_LISTED])
    return Outcome(
        Result.UNKNOWN,
        tuple(i.m.entry.ref for i in exact),
        f"{name} disagree across a WHO grade boundary: {listed}; pathology review would "
        "decide the grade.",
    )


def _upper(text: str) -> str:
    return text[0].upper() + text[1:]


@rule_kind(
    "grade",
    value_param(
        "allowed", {"type": "array", "minItems": 1, "items": {"enum": [1, 2, 3]}}, required=True
    ),
    # the NET Conditions: differentiation and grade codes, and what a result's focus may name
    fixed_valuesets={
        "Observation": ("tumour-grade", "mitotic-count"),
        "Condition": _NET_CONDITIONS,
    },
    fixed_analytes=("ki67",),
)
def grade(rule: dict[str, Any], ctx: Context) -> Outcome:
    """The NET's histologic grade from, in order of authority: a recorded grade, a poorly
    differentiated diagnosis code, the Ki-67 index and the mitotic count (WHO 2019 cut-offs;
    the higher of the two). A grade or index result about another tumour (its ``focus``) is
    set aside and said so."""
    allowed = set(rule["allowed"])
    evidence: list[str] = []
    notes: list[str] = []
    explicit: tuple[int, Entry] | None = None
    set_aside: list[Entry] = []

    def about_the_net(entries: list[Entry]) -> list[Entry]:
        kept: list[Entry] = []
        for e in entries:
            (set_aside if _about_another_tumour(ctx, e) else kept).append(e)
        return kept

    for entry in ctx.readable(
        about_the_net(
            [e for e in ctx.entries(("Observation",), ["tumour-grade"]) if e.status in _USABLE]
        )
    )[0]:
        found = _grade_of_concept(ctx, entry.resource.get("valueCodeableConcept"))
        if found is None:
            found = _grade_of_text(entry.resource)
        if found is not None:
            explicit = (found, entry)
            break
    if explicit is None:
        for entry in ctx.readable(
            ctx.entries(("Condition",), ["net-grade-1", "net-grade-2", "net-grade-3"])
        )[0]:
            found = next(
                (
                    g
                    for g in (1, 2, 3)
                    if any(
                        ctx.trials.valueset(f"net-grade-{g}").contains_key(k) for k in entry.keys
                    )
                ),
                None,
            )
            if found is not None:
                explicit = (found, entry)
                break
    poorly = ctx.readable(ctx.entries(("Condition",), ["poorly-differentiated-net"]))[0]
    ki67_analyte = ctx.trials.analytes["ki67"]
    ki_exact, ki_open = _indices(
        ctx,
        about_the_net(_usable_observations(ctx, "ki67")),
        functools.partial(measure, ki67_analyte),
        (_KI67_G2_FROM, _KI67_G3_ABOVE),
        _ki67_text,
    )
    mc_unreadable: list[str] = []
    mc_exact, mc_open = _indices(
        ctx,
        about_the_net(_usable_observations(ctx, "mitotic-count")),
        _mitotic_count,
        (_MITOSES_G2_FROM, _MITOSES_G3_ABOVE),
        _mitoses_text,
        mc_unreadable,
    )
    for name, exact in (("Ki-67 results", ki_exact), ("Mitotic counts", mc_exact)):
        disagreement = _disagreeing(name, exact)
        if disagreement is not None:
            return disagreement
    # the latest result of each index: one that decides a grade, else a bound that leaves it open
    ki67: _Index | None = next(iter(ki_exact or ki_open), None)
    mitoses: _Index | None = next(iter(mc_exact or mc_open), None)
    exact_indices = [i for i in (ki67, mitoses) if i is not None and i.exact]
    index_grade = max((i.low for i in exact_indices), default=None)
    aside = (
        f" ({_listing(set_aside)} is about another tumour, not a NET on record)"
        if set_aside
        else ""
    )
    decided: int | None = None
    if explicit is not None:
        decided, entry = explicit
        evidence.append(entry.ref)
        notes.append(f"grade G{decided} recorded in {entry.describe()}{_when(entry)}")
        if poorly and decided != 3:
            return Outcome(
                Result.UNKNOWN,
                (entry.ref, *_refs(poorly)),
                f"Conflicting grade: G{decided} recorded in {entry.describe()}, but "
                f"{_listing(poorly)} says poorly differentiated; pathology review would decide it.",
            )
        higher = [i for i in exact_indices if i.low > decided]
        if higher:
            # WHO assigns the higher of the indices: a recorded grade below what an index says
            # cannot be taken at face value.
            i = max(higher, key=lambda x: x.low)
            return Outcome(
                Result.UNKNOWN,
                (entry.ref, i.m.entry.ref),
                f"Discordant grade: G{decided} recorded in {entry.describe()}, but {i.text} "
                f"means G{i.low} and WHO assigns the higher grade; pathology review would "
                "decide it.",
            )
        if index_grade is not None and index_grade < decided:
            rests = "" if mitoses is not None else "(which may rest on the mitotic count) "
            notes.append(
                f"{' and '.join(i.text for i in exact_indices)} alone would mean "
                f"G{index_grade}; the recorded grade {rests}is used"
            )
    elif poorly:
        nos = ctx.trials.valueset("neuroendocrine-carcinoma-nos")
        if (
            index_grade is not None
            and index_grade < 3
            and all(any(nos.contains_key(k) for k in e.keys) for e in poorly)
        ):
            # "Neuroendocrine carcinoma" without "poorly differentiated" against a G1/G2
            # index: older usage called well-differentiated NETs carcinomas.
            verb = "means" if len(exact_indices) == 1 else "mean"
            return Outcome(
                Result.UNKNOWN,
                (*_refs(poorly), *(i.m.entry.ref for i in exact_indices)),
                f"{_listing(poorly)} says neuroendocrine carcinoma without saying poorly "
                f"differentiated, but {' and '.join(i.text for i in exact_indices)} {verb} "
                f"G{index_grade}; pathology review would decide the grade.",
            )
        decided = 3
        evidence.extend(_refs(poorly))
        notes.append(f"poorly differentiated: {_listing(poorly)}")
    elif ki67 is not None and mitoses is not None:
        # WHO 2019: the higher of the two; a reported bound may leave the grade open.
        low, high = max(ki67.low, mitoses.low), max(ki67.high, mitoses.high)
        refs = (ki67.m.entry.ref, mitoses.m.entry.ref, *_refs(set_aside))
        if low != high:
            return Outcome(
                Result.UNKNOWN,
                refs,
                f"{_upper(ki67.text)} ({ki67.span}) and {mitoses.text} ({mitoses.span}) leave "
                f"the grade between G{low} and G{high}{aside}; an exact index or the pathology "
                "grade would decide it.",
            )
        decided = low
        evidence.extend((ki67.m.entry.ref, mitoses.m.entry.ref))
        notes.append(
            f"{ki67.text} means {ki67.span} and {mitoses.text} means {mitoses.span} by the "
            "WHO 2019 cut-offs (Ki-67 G1 < 3 %, G2 3-20 %, G3 > 20 %; mitoses G1 < 2, G2 2-20, "
            f"G3 > 20 per 2 mm²), which take the higher: G{decided}"
        )
    elif ki67 is not None:
        if mitoses is None and mc_unreadable:
            # A mitotic count on record that cannot be read may be the higher index.
            return Outcome(
                Result.UNKNOWN,
                (ki67.m.entry.ref, *_refs(_usable_observations(ctx, "mitotic-count"))),
                f"{_upper(ki67.text)} means {ki67.span}, but {mc_unreadable[0]}; WHO 2019 "
                "grades by the higher of the two, so a mitotic count per 10 HPF or per 2 mm² "
                "(or the pathology grade) would decide it.",
            )
        if not ki67.exact:
            return Outcome(
                Result.UNKNOWN,
                (ki67.m.entry.ref, *_refs(set_aside)),
                f"{ki67.text} leaves the grade between G{ki67.low} and G{ki67.high}{aside}; an "
                "exact index or the pathology grade would decide it.",
            )
        decided = ki67.low
        evidence.append(ki67.m.entry.ref)
        notes.append(
            f"{ki67.text} means G{decided} by the WHO 2019 cut-offs (G1 < 3 %, G2 3-20 %, "
            "G3 > 20 %)"
        )
    elif mitoses is not None:
        # With no Ki-67 index the mitotic count is only a floor: WHO 2019 takes the higher of
        # the two, and the Ki-67 grade may be the higher (CAP NET checklist). It decides only
        # when every grade from it up to G3 gives the same answer (for G3, always).
        possible = {g in allowed for g in range(mitoses.low, 4)}
        if len(possible) > 1:
            return Outcome(
                Result.UNKNOWN,
                (mitoses.m.entry.ref, *_refs(set_aside)),
                f"{_upper(mitoses.text)} means at least G{mitoses.low}, but no Ki-67 index is "
                f"recorded{aside} and WHO 2019 grades by the higher of the two, so the grade "
                "could be higher; the Ki-67 index or the pathology grade would decide it.",
            )
        decided = mitoses.low
        evidence.append(mitoses.m.entry.ref)
        notes.append(
            f"{mitoses.text} means at least G{decided} by the WHO 2019 cut-offs (G1 < 2, "
            "G2 2-20, G3 > 20 per 2 mm²), whatever the Ki-67 index (none is recorded)"
        )
    # ICD-O-3 8249/3: G2 in ICD-O-3.1 and ICD-O-3.2, and G3 too in ICD-O-3.2, so "G2 or G3".
    morphology = [
        e
        for e in ctx.readable(ctx.entries(("Condition",), ["net-morphology-g2-or-g3"]))[0]
        if _condition_state(e, ctx.as_of) != "inactive"
    ]
    said = "ICD-O-3 8249/3 (NET G2; G2 or G3 in ICD-O-3.2)"
    if morphology and decided == 1:
        return Outcome(
            Result.UNKNOWN,
            (*evidence, *_refs(morphology)),
            f"Discordant grade: {'; '.join(notes)} (G1), but {_listing(morphology)} is coded "
            f"{said}; pathology review would decide it.",
        )
    if morphology and decided is None:
        on_side = {g in allowed for g in (2, 3)}
        if on_side == {True}:
            return Outcome(
                Result.PASS,
                _refs(morphology),
                f"{_listing(morphology)} is coded {said}: either meets this trial's grade.",
            )
        if on_side == {False}:
            return Outcome(
                Result.FAIL,
                _refs(morphology),
                f"{_listing(morphology)} is coded {said}: this trial accepts neither.",
            )
        return Outcome(
            Result.UNKNOWN,
            (*_refs(morphology), *_refs(set_aside)),
            f"{_listing(morphology)} is coded {said}, which does not settle the grade this "
            f"trial requires{aside}; the Ki-67 index, a mitotic count or the pathology grade "
            "would decide it.",
        )
    if decided is None:
        if mc_unreadable:
            return Outcome(
                Result.UNKNOWN,
                (*_refs(_usable_observations(ctx, "mitotic-count")), *_refs(set_aside)),
                f"No histologic grade, Ki-67 index or differentiation recorded for the NET"
                f"{aside}, and {mc_unreadable[0]}; the pathology grade would decide it.",
            )
        return Outcome(
            Result.UNKNOWN,
            (ctx.record.patient_ref, *_refs(set_aside)),
            "No histologic grade, Ki-67 index, mitotic count or differentiation recorded for "
            f"the NET{aside}; the pathology grade would decide it.",
        )
    wanted = " or ".join(f"G{g}" for g in sorted(allowed))
    text = _upper("; ".join(notes))
    if decided in allowed:
        return Outcome(Result.PASS, tuple(evidence), f"{text}: {wanted} as required.")
    if explicit is None and not poorly and mitoses is None and any(g > decided for g in allowed):
        # WHO 2019 grades by the higher of Ki-67 and mitotic count: with the Ki-67 index alone,
        # a mitotic count could still raise the grade to one the trial accepts.
        higher_text = " or ".join(f"G{g}" for g in sorted(g for g in allowed if g > decided))
        return Outcome(
            Result.UNKNOWN,
            tuple(evidence),
            f"{text}, but no mitotic count or pathology grade is recorded and a mitotic count "
            f"could make it {higher_text}; the pathology grade would decide it.",
        )
    return Outcome(Result.FAIL, tuple(evidence), f"{text}: not {wanted}.")


# --- treatment history with dates --------------------------------------------------------


# Days per UCUM time unit in a supply duration (FHIR Duration: unit code from UCUM). A month is
# counted as 31 days, the longest, so that a supply is never taken to end too early.
_DAYS_PER_UNIT = {"d": 1.0, "wk": 7.0, "mo": 31.0, "h": 1 / 24, "min": 1 / 1440}


def _days_of(duration: Any) -> float | None:
    if not isinstance(duration, dict) or not isinstance(duration.get("value"), int | float):
        return None
    per = _DAYS_PER_UNIT.get(str(duration.get("code") or duration.get("unit") or "").strip())
    return None if per is None else float(duration["value"]) * per


def _supply_end(entry: Entry) -> date | None:
    """The last day a medication record's own dosing facts cover, where it states them (issue
    12: the last dose, not the order date): FHIR R4 MedicationRequest
    ``dosageInstruction.timing.repeat.boundsPeriod.end``, else ``authoredOn`` plus
    ``dispenseRequest.expectedSupplyDuration``; MedicationDispense ``whenHandedOver`` plus
    ``daysSupply``. Administration and statement periods are the record's ``until``."""
    resource = entry.resource
    if entry.type == "MedicationRequest":
        ends: list[date] = []
        for dosage in resource.get("dosageInstruction") or ():
            timing = dosage.get("timing") if isinstance(dosage, dict) else None
            repeat = timing.get("repeat") if isinstance(timing, dict) else None
            bounds = repeat.get("boundsPeriod") if isinstance(repeat, dict) else None
            end = parse_date(bounds.get("end")) if isinstance(bounds, dict) else None
            if end is not None:
                ends.append(end.end)
        if ends:
            return max(ends)
        dispense = resource.get("dispenseRequest")
        days = (
            _days_of(dispense.get("expectedSupplyDuration")) if isinstance(dispense, dict) else None
        )
        if days is not None and entry.when is not None:
            return entry.when.end + timedelta(days=max(math.ceil(days) - 1, 0))
        return None
    if entry.type == "MedicationDispense":
        days = _days_of(resource.get("daysSupply"))
        if days is not None and entry.when is not None:
            return entry.when.end + timedelta(days=max(math.ceil(days) - 1, 0))
    return None


def _last_exposure(entry: Entry, as_of: date) -> date | None:
    """The last day a therapy record shows the patient exposed, ``as_of`` if still ongoing."""
    end = _supply_end(entry)
    if end is None and entry.until is not None:
        end = entry.until.end
    ongoing = entry.type in ("MedicationRequest", "MedicationStatement") and entry.status in (
        "active",
        "on-hold",
    )
    if ongoing and (end is None or end >= as_of):
        return as_of
    if end is not None:
        return min(end, as_of)
    return min(entry.when.end, as_of) if entry.when else None


@rule_kind(
    "washout",
    value_param("days", {"type": "integer", "minimum": 1}, required=True),
    valuesets_param("medications", MEDICATION_TYPES),
    valuesets_param("procedures", ["Procedure"]),
    # Drugs that may or may not be what the protocol means (targeted agents, dual-use
    # cytotoxics): inside the window they make the washout unknown, named; never a fail.
    valuesets_param("unknown_medications", MEDICATION_TYPES),
    any_of=("medications", "procedures"),
)
def washout(rule: dict[str, Any], ctx: Context) -> Outcome:
    """At least ``days`` since the last chemotherapy (and/or radiotherapy) on record."""
    found = ctx.entries(MEDICATION_TYPES, rule.get("medications", [])) + ctx.entries(
        ("Procedure",), rule.get("procedures", [])
    )
    good, bad = ctx.readable(found)
    days = rule["days"]
    names = ctx.titles([*rule.get("medications", []), *rule.get("procedures", [])])
    undated = [e for e in good if _last_exposure(e, ctx.as_of) is None]
    dated = sorted(
        ((d, e) for e in good if (d := _last_exposure(e, ctx.as_of)) is not None),
        key=lambda x: (x[0], x[1].ref),
        reverse=True,
    )
    if dated:
        last_day, last = dated[0]
        since = (ctx.as_of - last_day).days
        ongoing = last_day == ctx.as_of and last.status in ("active", "on-hold")
        what = f"{last.describe()}{' (ongoing)' if ongoing else f', last on {last_day}'}"
        if since < days:
            return Outcome(
                Result.FAIL,
                (last.ref,),
                f"Latest therapy: {what}, {since} days before {ctx.as_of}; "
                f"at least {days} days are required.",
            )
        if undated:
            return Outcome(
                Result.UNKNOWN,
                _refs([last, *undated]),
                f"Latest dated therapy: {what}, {since} days before {ctx.as_of}, but "
                f"{_listing(undated)} has no date; its date would decide it.",
            )
        maybe = _maybe_counted(rule, ctx)
        if maybe is not None:
            return maybe
        return Outcome(
            Result.PASS,
            (last.ref,),
            f"Latest therapy: {what}, {since} days before {ctx.as_of} (≥ {days} days).",
        )
    if undated:
        return Outcome(
            Result.UNKNOWN,
            _refs(undated),
            f"Undated therapy on record: {_listing(undated)}; its date would decide it.",
        )
    if bad:
        return _malformed_unknown(ctx, bad, "A therapy record")
    maybe = _maybe_counted(rule, ctx)
    if maybe is not None:
        return maybe
    return Outcome(
        Result.PASS,
        (ctx.record.patient_ref,),
        f"None on record: no {names} on or before {ctx.as_of}.",
    )


def _maybe_counted(rule: dict[str, Any], ctx: Context) -> Outcome | None:
    """UNKNOWN when a drug of ``unknown_medications`` was taken inside the washout window (or
    on an unknown date): whether it is the protocol's chemotherapy is a clinical call."""
    days = rule["days"]
    recent: list[Entry] = []
    for entry in ctx.readable(ctx.entries(MEDICATION_TYPES, rule.get("unknown_medications", [])))[
        0
    ]:
        last_day = _last_exposure(entry, ctx.as_of)
        if last_day is None or (ctx.as_of - last_day).days < days:
            recent.append(entry)
    if not recent:
        return None
    return Outcome(
        Result.UNKNOWN,
        _refs(recent),
        f"Within {days} days before {ctx.as_of} (or undated): {_listing(recent)}, an "
        "antineoplastic that is not cytotoxic chemotherapy or has non-cancer uses; confirm "
        "whether it counts as the protocol's chemotherapy.",
    )


@rule_kind(
    "pregnancy",
    valuesets_param("conditions", ["Condition"], required=True),
    value_param("lookback_days", {"type": "integer", "minimum": 1}),
    fixed_valuesets={"Observation": ("hcg", "pregnancy-status")},
    patient_elements=SEX_ELEMENTS,
)
def pregnancy(rule: dict[str, Any], ctx: Context) -> Outcome:
    """Pregnancy or lactation: an active condition or a positive hCG in the window excludes."""
    ref = ctx.record.patient_ref
    if ctx.record.gender == "male":
        return Outcome(Result.PASS, (ref,), f"Not applicable: {ref} is male.")
    by_state, bad = _conditions_by_state(ctx, rule["conditions"])
    if by_state["active"]:
        active = by_state["active"]
        return Outcome(Result.FAIL, _refs(active), f"Active on record: {_listing(active)}.")
    if by_state["unconfirmed"]:
        return _unconfirmed(by_state["unconfirmed"], "confirm or refute it")
    lookback = rule.get("lookback_days", ctx.trial.lab_lookback_days)
    start = ctx.window_start(lookback)
    answers = ctx.trials.answers
    positive = set(answers.get("qualitative_positive", []))
    negative = set(answers.get("qualitative_negative", []))
    words = answers.get("qualitative_text", {})
    status = _pregnancy_status(ctx, start, answers.get("pregnancy_status", {}))
    if status is not None and status.result is not Result.PASS:
        return status  # pregnant, or a status that cannot be read
    hcg = [
        e
        for e in ctx.entries(("Observation",), ["hcg"])
        if e.status in _FINAL and e.when is not None and e.when.end >= start
    ]
    for entry in hcg:
        if ctx.record.invalid_reason(entry):
            continue
        codes = {f"{s}|{c}" for s, c in codings_of(entry.resource.get("valueCodeableConcept"))}
        interpretation = {
            c
            for concept in entry.resource.get("interpretation") or []
            for _, c in codings_of(concept)
        }
        text = entry.resource.get("valueString")
        word = text.strip().casefold() if isinstance(text, str) else None
        if word in words.get("positive", ()):
            codes.add(next(iter(positive), ""))
        elif word in words.get("negative", ()):
            codes.add(next(iter(negative), ""))
        if codes & positive or interpretation & {"POS", "H", "HH", "A"}:
            return Outcome(
                Result.FAIL,
                (entry.ref,),
                f"Positive pregnancy test: {entry.describe()}{_when(entry)}.",
            )
        if codes & negative or interpretation & {"NEG", "N"}:
            return Outcome(
                Result.PASS,
                (entry.ref,),
                f"Negative pregnancy test: {entry.describe()}{_when(entry)}; no active "
                "pregnancy or lactation on record.",
            )
        # A quantitative hCG without an interpretation is left to the reader: cut-offs differ.
        return Outcome(
            Result.UNKNOWN,
            (entry.ref,),
            f"Pregnancy test {entry.describe()}{_when(entry)} has no interpretation the "
            "service can read; the result's interpretation would decide it.",
        )
    if bad:
        return _malformed_unknown(ctx, bad, "A pregnancy or lactation record")
    if status is not None:
        return status  # recorded as not pregnant, and no pregnancy test says otherwise
    return Outcome(
        Result.PASS,
        (ref,),
        f"None on record: no active pregnancy or lactation, and no positive hCG in the "
        f"{lookback} days before {ctx.as_of}.",
    )


#: the rule functions by kind, from their declarations
def _pregnancy_status(ctx: Context, start: date, meaning: dict[str, str]) -> Outcome | None:
    """The latest final "Pregnancy status" observation in the window, when it says pregnant
    (a fail) or not pregnant (a pass); ``None`` when there is none; an answer that cannot be
    read is unknown."""
    latest = next(
        (
            e
            for e in ctx.entries(("Observation",), ["pregnancy-status"])
            if e.status in _FINAL and e.when is not None and e.when.end >= start
        ),
        None,
    )
    if latest is None:
        return None
    if ctx.record.invalid_reason(latest):
        return _malformed_unknown(ctx, [latest], "The latest pregnancy status")
    said = {
        meaning.get(f"{s}|{c}") for s, c in codings_of(latest.resource.get("valueCodeableConcept"))
    } - {None}
    shown = f"{latest.describe()}{_when(latest)}"
    if said == {"pregnant"}:
        return Outcome(Result.FAIL, (latest.ref,), f"Recorded as pregnant: {shown}.")
    if said == {"not pregnant"}:
        return Outcome(Result.PASS, (latest.ref,), f"Recorded as not pregnant: {shown}.")
    return Outcome(
        Result.UNKNOWN,
        (latest.ref,),
        f"Pregnancy status {shown} has no answer the service can read; a recorded status "
        "or a pregnancy test would decide it.",
    )


RULES: dict[str, Callable[[dict[str, Any], Context], Outcome]] = {
    name: kind.func for name, kind in RULE_KINDS.items()
}


def related_on_record(ctx: Context, valueset_ids: Sequence[str]) -> list[Entry]:
    """Records a person reviewing a manual criterion should see (active conditions, any
    procedure or observation in the value sets).

    They are not validated: a manual result counts neither for nor against the patient, the
    person deciding it reads these records anyway, and validation (about 100 us a resource)
    is kept for what decides a pass or a fail.
    """
    found = ctx.entries(RELATED_TYPES, valueset_ids)
    return [
        e for e in found if e.type != "Condition" or _condition_state(e, ctx.as_of) != "inactive"
    ]
