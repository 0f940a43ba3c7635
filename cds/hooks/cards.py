"""Cards from evaluations: one screening card per trial at stake, one warning per order at risk.

CDS Hooks 2.0 'Card Attributes': a card is a brief, actionable alert whose detail leads on to an
app. So a card says what would settle the open items and links to the screening page (a SMART
app, :mod:`cds.hooks.smart`) for everything else; the criteria met are only counted here.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

from cds.criteria.model import CriterionResult, Result, TrialEvaluation, TrialStatus
from cds.hooks.evidence import resource_date, without_ids
from cds.sweep.writeback import STUDY_SYSTEM, SUBJECT_STATUS, research_subject

__all__ = [
    "OVERRIDE_REASONS",
    "OVERRIDE_SYSTEM",
    "SUPPRESSING_REASONS",
    "TOPIC",
    "BrokenCriterion",
    "CardContext",
    "OpenItems",
    "TrialInfo",
    "open_items",
    "order_warning_card",
    "screening_card",
    "summary_line",
    "trial_infos",
]

#: the code system of this service's override reasons (2.0: overrideReasons are Codings)
OVERRIDE_SYSTEM = "urn:cds-trial-screening:override-reason"
#: source.topic: lets an EHR filter or route "trial screening" cards as a class
TOPIC = {
    "system": "urn:cds-trial-screening:card-topic",
    "code": "clinical-trial-screening",
    "display": "Clinical trial screening",
}

# 2.0: "the CDS Service MUST provide a display" for each override reason.
OVERRIDE_REASONS: tuple[dict[str, str], ...] = (
    {"code": "already-screened", "system": OVERRIDE_SYSTEM, "display": "Already screened"},
    {"code": "patient-declined", "system": OVERRIDE_SYSTEM, "display": "Patient declined"},
    {"code": "not-eligible", "system": OVERRIDE_SYSTEM, "display": "Not eligible"},
    {"code": "not-now", "system": OVERRIDE_SYSTEM, "display": "Not now"},
)
_WARNING_OVERRIDE_REASONS: tuple[dict[str, str], ...] = (
    {
        "code": "treatment-takes-priority",
        "system": OVERRIDE_SYSTEM,
        "display": "Treatment takes priority over the trial",
    },
    {"code": "patient-declined", "system": OVERRIDE_SYSTEM, "display": "Patient declined"},
    {"code": "not-eligible", "system": OVERRIDE_SYSTEM, "display": "Not eligible"},
)
#: an override with one of these hides the trial's screening card for a while
SUPPRESSING_REASONS = ("already-screened", "patient-declined")

_SUMMARY_MAX = 139  # 2.0: summary "<140 characters"
_REGISTRY_URL = "https://clinicaltrials.gov/study/{nct}"
#: ClinicalTrials.gov overall statuses under which a trial takes patients (registry data element
#: "Overall Recruitment Status"); any other status is said on the card
ENROLLING = frozenset({"RECRUITING", "NOT_YET_RECRUITING", "ENROLLING_BY_INVITATION"})
#: open-item lines shown on a card before "N more on the screening page"
_MAX_OPEN_LINES = 6
#: checks named on one shared line before "N more"
_MAX_NAMED = 4
#: rule types whose unknowns are a lab result to (re)draw; the others are shown one by one
_LAB_RULES = frozenset({"lab"})


@dataclass(frozen=True, slots=True)
class TrialInfo:
    """What a card says about a trial besides the evaluation, derived from its definition."""

    id: str
    title: str
    short_title: str
    url: str
    registry_status: str = "RECRUITING"
    #: look-back window of lab results, days (the definition's ``lab_lookback_days``)
    lab_lookback_days: int = 30
    #: criterion id -> (rule type, analyte label) of the definition; manual criteria absent
    rules: Mapping[str, tuple[str, str | None]] = field(default_factory=dict)

    @property
    def registry_url(self) -> str:
        # Cards carry absolute https links only (2.0 Link: url "MUST be absolute").
        if self.url.startswith("https://"):
            return self.url
        return _REGISTRY_URL.format(nct=self.id)

    @property
    def name(self) -> str:
        return " ".join(self.short_title.split()) or " ".join(self.title.split())

    @property
    def enrolling(self) -> bool:
        return self.registry_status.upper() in ENROLLING


@dataclass(frozen=True, slots=True)
class CardContext:
    """The hook call a card answers: who the patient is, who is looking, what was read."""

    patient_id: str
    user_id: str | None
    encounter_id: str | None
    as_of: date
    #: "Type/id" -> the resource the evaluation read (evidence dates come from here)
    resources: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: absolute URL of the screening page's SMART launch (None: no smart link)
    launch_url: str | None = None


@dataclass(frozen=True, slots=True)
class BrokenCriterion:
    """A draft order that would make one criterion of a trial fail."""

    criterion: CriterionResult
    order: str  # what was ordered, as the order names it ("capecitabine 500 MG Oral Tablet")
    reference: str  # the draft order's "Type/id" (or its position in draftOrders)


def _uuid() -> str:
    return str(uuid.uuid4())


_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~#])")


def md(text: str) -> str:
    """Text as literal GitHub-flavoured Markdown: no emphasis, links, tables or raw HTML."""
    text = " ".join(text.split())
    text = text.replace("&", "&amp;").replace("<", "&lt;")
    return _MD_SPECIAL.sub(r"\\\1", text)


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def summary_line(trial: TrialInfo, finding: str) -> str:
    """``"{NCT} {short title}: {finding}"``, the title shortened to keep it under 140."""
    head = f"{trial.id} "
    tail = f": {finding}" if finding else ""
    room = _SUMMARY_MAX - len(head) - len(tail)
    name = trial.name
    if len(name) > room:
        name = name[: max(room - 1, 0)].rstrip() + "…"
    return f"{head}{name}{tail}"[:_SUMMARY_MAX]


# -- open items --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpenItems:
    """A trial's unknown criteria sorted by what settles them."""

    #: analyte labels whose cited latest result is older than the window, and the dates drawn
    labs_to_repeat: tuple[str, ...]
    last_drawn: tuple[date, ...]
    #: the first day a new lab result counts (as-of minus the trial's look-back)
    labs_from: date
    #: every other unknown, those with the same sentence together: (criteria, sentence without
    #: FHIR ids)
    others: tuple[tuple[tuple[CriterionResult, ...], str], ...]

    @property
    def count(self) -> int:
        return len(self.labs_to_repeat) + sum(len(group) for group, _ in self.others)


def open_items(
    evaluation: TrialEvaluation,
    trial: TrialInfo,
    as_of: date,
    resources: Mapping[str, Mapping[str, Any]],
) -> OpenItems:
    """Sort the unknowns: labs whose cited result is older than the trial's window (to repeat),
    and the rest with the engine's own sentence. Dates are read from the cited resources; the
    verdict stays the engine's."""
    labs_from = as_of - timedelta(days=trial.lab_lookback_days)
    repeat: dict[str, None] = {}
    drawn: set[date] = set()
    others: dict[str, list[CriterionResult]] = {}
    for c in evaluation.with_result(Result.UNKNOWN):
        rule_type, analyte = trial.rules.get(c.id, ("", None))
        if rule_type in _LAB_RULES and analyte and c.evidence:
            cited = [resources.get(ref) for ref in c.evidence]
            dates = [d for r in cited if r is not None and (d := resource_date(r)) is not None]
            if dates and max(dates) < labs_from:
                repeat[analyte] = None
                drawn.add(max(dates))
                continue
        others.setdefault(without_ids(c.explanation), []).append(c)
    return OpenItems(
        labs_to_repeat=tuple(repeat),
        last_drawn=tuple(sorted(drawn)),
        labs_from=labs_from,
        others=tuple((tuple(group), sentence) for sentence, group in others.items()),
    )


def _finding(evaluation: TrialEvaluation, trial: TrialInfo, items: OpenItems) -> str:
    """What the screen found, for the summary: registry status when not enrolling, the status,
    and the number of open items by what settles them."""
    status = trial.registry_status.upper().replace("_", " ")
    head = [] if trial.enrolling else [f"trial {status}"]
    counts: list[str] = []
    if evaluation.status is TrialStatus.CANDIDATE:
        head.append("possible candidate")
        manual = len(evaluation.with_result(Result.MANUAL))
        if manual:
            counts.append(_plural(manual, "item", "items") + " for the trial team")
    else:
        head.append("needs review")
        if items.labs_to_repeat:
            counts.append(_plural(len(items.labs_to_repeat), "lab", "labs") + " to repeat")
        others = sum(len(group) for group, _ in items.others)
        if others:
            word = "other item" if counts else "item"
            counts.append(_plural(others, word, word + "s") + " to settle")
    return ", ".join(head) + (" — " + ", ".join(counts) if counts else "")


def _open_lines(items: OpenItems) -> list[str]:
    lines: list[str] = []
    if items.labs_to_repeat:
        last = ", ".join(d.isoformat() for d in items.last_drawn)
        lines.append(
            f"- **Repeat labs** (results dated {items.labs_from.isoformat()} or later;"
            f" last drawn {last}): {md(', '.join(items.labs_to_repeat))}"
        )
    for group, sentence in items.others:
        if len(group) == 1 and group[0].kind == "exclusion":
            # An exclusion is said as what the record shows, never by its name (a label such as
            # "Cirrhosis" above a sentence reads as if the patient had it).
            lines.append(f"- {md(sentence)}")
        else:
            # Several checks with one sentence ("Not assessed: the data it needs could not be
            # fetched in time") name the checks, not a finding.
            names = [c.label for c in group]
            if len(names) > _MAX_NAMED:
                names = [*names[: _MAX_NAMED - 1], f"{len(names) - _MAX_NAMED + 1} more"]
            lines.append(f"- **{md(', '.join(names))}**: {md(sentence)}")
    if len(lines) > _MAX_OPEN_LINES:
        more = len(lines) - (_MAX_OPEN_LINES - 1)
        lines = [*lines[: _MAX_OPEN_LINES - 1], f"- and {more} more on the screening page"]
    return lines


def _count_line(evaluation: TrialEvaluation, as_of: date) -> str:
    met = len(evaluation.with_result(Result.PASS))
    manual = len(evaluation.with_result(Result.MANUAL))
    checked = met + len(evaluation.with_result(Result.UNKNOWN))
    return (
        f"{met} of {checked} record checks met; {manual} items for the trial team to confirm."
        f" Criteria v{md(evaluation.version)}, as of {as_of.isoformat()}."
    )


def _screening_detail(
    evaluation: TrialEvaluation, trial: TrialInfo, ctx: CardContext, items: OpenItems
) -> str:
    # GFM: blocks are separated by a blank line (a single newline joins lines into one).
    blocks: list[str] = []
    if not trial.enrolling:
        blocks.append(
            f"**Registry status {md(trial.registry_status.upper())}**: the trial is not"
            " enrolling; check with the trial team before referring."
        )
    if items.count:
        blocks.append("\n".join(["**To settle:**", *_open_lines(items)]))
    else:
        blocks.append("Nothing on record excludes the patient; nothing is left unknown.")
    blocks.append(_count_line(evaluation, ctx.as_of))
    return "\n\n".join(blocks)


# -- actions and links -------------------------------------------------------------------------


def _referral(trial: TrialInfo, evaluation: TrialEvaluation, ctx: CardContext) -> dict[str, Any]:
    """ "Refer to the trial team": a ResearchSubject in the state the sweep's write-back gives a
    candidate (R4 ResearchSubject.status candidate / potential-candidate), with the same business
    identifier, so a sweep's conditional create and an accepted card cannot make two of them."""
    patient_ref = f"Patient/{ctx.patient_id}"
    resource = research_subject(trial.id, "", patient_ref, evaluation.status.value)
    # The EHR may hold no ResearchStudy resource for the trial: the study is named by its
    # registry identifier, the one the write-back gives ResearchStudy (R4 Reference.identifier).
    resource["study"] = {
        "identifier": {"system": STUDY_SYSTEM, "value": trial.id},
        "display": f"{trial.id} {trial.name}",
    }
    return {
        "label": "Refer to the trial team",
        "uuid": _uuid(),
        "isRecommended": True,
        "actions": [
            {
                "type": "create",
                "description": f"Record the patient as a {trial.id} screening candidate for the"
                " trial team",
                "resource": resource,
            }
        ],
    }


def _source(trial: TrialInfo) -> dict[str, Any]:
    return {"label": f"{trial.id} trial screening", "url": trial.registry_url, "topic": dict(TOPIC)}


def _links(trial: TrialInfo, ctx: CardContext) -> list[dict[str, Any]]:
    links: list[dict[str, Any]] = []
    if ctx.launch_url:
        # 2.0 Link type "smart": the EHR launches the app (SMART App Launch, EHR launch) with
        # iss and launch; appContext comes back in the token response.
        links.append(
            {
                "label": "Open the screening page",
                "url": ctx.launch_url,
                "type": "smart",
                "appContext": f"trial={trial.id}",
            }
        )
    links.append(
        {
            "label": f"{trial.id} on ClinicalTrials.gov",
            "url": trial.registry_url,
            "type": "absolute",
        }
    )
    return links


def screening_card(
    evaluation: TrialEvaluation, trial: TrialInfo, ctx: CardContext
) -> dict[str, Any] | None:
    """The patient-view card for one trial, or None when the patient is excluded."""
    if evaluation.status is TrialStatus.EXCLUDED or evaluation.status.value not in SUBJECT_STATUS:
        return None
    items = open_items(evaluation, trial, ctx.as_of, ctx.resources)
    return {
        "uuid": _uuid(),
        "summary": summary_line(trial, _finding(evaluation, trial, items)),
        "indicator": "info",
        "detail": _screening_detail(evaluation, trial, ctx, items),
        "source": _source(trial),
        "suggestions": [_referral(trial, evaluation, ctx)],
        # 2.0: if suggestions are present, selectionBehavior MUST also be provided.
        "selectionBehavior": "at-most-one",
        "overrideReasons": [dict(r) for r in OVERRIDE_REASONS],
        "links": _links(trial, ctx),
    }


def _order_effect(b: BrokenCriterion, trial: TrialInfo) -> str:
    """What the order would put on the record, said as a fact, never by the exclusion's name."""
    rule_type, _ = trial.rules.get(b.criterion.id, ("", None))
    if rule_type == "washout":
        return f"would restart the trial's washout ({md(b.criterion.label)})"
    return f"would count as {md(b.criterion.label)}, which the trial excludes"


def order_warning_card(
    evaluation: TrialEvaluation,
    trial: TrialInfo,
    broken: Iterable[BrokenCriterion],
    ctx: CardContext,
) -> dict[str, Any] | None:
    """The order-select/order-sign warning for one trial at stake, or None when none is."""
    if evaluation.status is TrialStatus.EXCLUDED:
        return None
    items = list(broken)
    if not items:
        return None
    orders = list(dict.fromkeys(b.order for b in items))
    status = "possible candidate" if evaluation.status is TrialStatus.CANDIDATE else "needs review"
    first = " ".join(orders[0].split())
    more = f" +{len(orders) - 1}" if len(orders) > 1 else ""
    finding = f"{first}{more} would end eligibility"
    if len(f"{trial.id} {trial.name}: {finding}") > _SUMMARY_MAX:
        finding = f"{_plural(len(orders), 'order', 'orders')} would end eligibility"
    lines = [
        f"The patient is a **{status}** for this trial as of {ctx.as_of.isoformat()}"
        + ("" if trial.enrolling else f" (registry status {md(trial.registry_status.upper())})")
        + ". Talk to the trial team before signing if the trial is still an option.",
    ]
    seen: set[tuple[str, str]] = set()
    for b in items:
        effect = _order_effect(b, trial)
        if (b.order, effect) in seen:
            continue
        seen.add((b.order, effect))
        lines.append(f"- **{md(b.order)}** {effect}.")  # effect is Markdown already
    head, orders_lines = lines[0], lines[1 : _MAX_OPEN_LINES + 1]
    detail = "\n\n".join([head, "\n".join(orders_lines), _count_line(evaluation, ctx.as_of)])
    return {
        "uuid": _uuid(),
        "summary": summary_line(trial, finding),
        "indicator": "warning",
        "detail": detail,
        "source": _source(trial),
        "suggestions": [_referral(trial, evaluation, ctx)],
        "selectionBehavior": "at-most-one",
        "overrideReasons": [dict(r) for r in _WARNING_OVERRIDE_REASONS],
        "links": _links(trial, ctx),
    }


def trial_infos(trials: Any) -> Mapping[str, TrialInfo]:
    """Card metadata of each trial of a TrialSet, by NCT number."""
    out: dict[str, TrialInfo] = {}
    for t in trials:
        rules: dict[str, tuple[str, str | None]] = {}
        for c in t.criteria:
            if c.rule is None:
                continue
            analyte_id = c.rule.get("analyte")
            analyte = trials.analytes.get(analyte_id) if isinstance(analyte_id, str) else None
            rules[c.id] = (str(c.rule.get("type", "")), analyte.label if analyte else None)
        out[t.id] = TrialInfo(
            id=t.id,
            title=t.title,
            short_title=getattr(t, "short_title", "") or t.title,
            url=t.url,
            registry_status=t.registry_status,
            lab_lookback_days=t.lab_lookback_days,
            rules=rules,
        )
    return out
