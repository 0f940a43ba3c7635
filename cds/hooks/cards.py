"""Cards from evaluations: one screening card per trial at stake, one warning per order at risk."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

from cds.criteria.model import CriterionResult, Result, TrialEvaluation, TrialStatus

__all__ = [
    "OVERRIDE_REASONS",
    "OVERRIDE_SYSTEM",
    "SUPPRESSING_REASONS",
    "TOPIC",
    "BrokenCriterion",
    "CardContext",
    "TrialInfo",
    "order_warning_card",
    "screening_card",
    "summary_line",
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
_MAX_EVIDENCE = 3


@dataclass(frozen=True, slots=True)
class TrialInfo:
    """What a card says about a trial besides the evaluation: names and the registry record."""

    id: str
    title: str
    short_title: str
    url: str

    @property
    def registry_url(self) -> str:
        # Cards carry absolute https links only (2.0 Link: url "MUST be absolute").
        if self.url.startswith("https://"):
            return self.url
        return _REGISTRY_URL.format(nct=self.id)


@dataclass(frozen=True, slots=True)
class CardContext:
    """The hook call a card answers: who the patient is and who is looking."""

    patient_id: str
    user_id: str | None
    encounter_id: str | None
    as_of: date


@dataclass(frozen=True, slots=True)
class BrokenCriterion:
    """A draft order that would make one criterion of a trial fail."""

    criterion: CriterionResult
    order: str  # what was ordered, as the order names it ("capecitabine 500 MG Oral Tablet")
    reference: str  # the draft order's "Type/id" (or its position in draftOrders)


def _uuid() -> str:
    return str(uuid.uuid4())


_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~])")


def md(text: str) -> str:
    """Text as literal GitHub-flavoured Markdown: no emphasis, links, tables or raw HTML."""
    text = " ".join(text.split())
    text = text.replace("&", "&amp;").replace("<", "&lt;")
    return _MD_SPECIAL.sub(r"\\\1", text)


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def summary_line(prefix: str, trial: TrialInfo, suffix: str) -> str:
    """``"{prefix}: {NCT} {short title} {suffix}"`` shortened to fit under 140 characters."""
    head = f"{prefix}: {trial.id} "
    tail = f" {suffix}" if suffix else ""
    room = _SUMMARY_MAX - len(head) - len(tail)
    name = " ".join(trial.short_title.split()) or " ".join(trial.title.split())
    if len(name) > room:
        name = name[: max(room - 1, 0)].rstrip() + "…"
    return f"{head}{name}{tail}".strip()[:_SUMMARY_MAX]


def _screening_summary(evaluation: TrialEvaluation, trial: TrialInfo) -> str:
    manual = len(evaluation.with_result(Result.MANUAL))
    unknown = len(evaluation.with_result(Result.UNKNOWN))
    parts = []
    if unknown:
        parts.append(_plural(unknown, "unknown", "unknown"))
    if manual:
        parts.append(
            _plural(manual, "item to confirm", "items to confirm")
            if not unknown
            else f"{manual} to confirm"
        )
    suffix = f"({', '.join(parts)})" if parts else ""
    return summary_line("Possible candidate", trial, suffix)


def _evidence(criterion: CriterionResult) -> str:
    """The evidence references the explanation does not already name."""
    unnamed = [r for r in criterion.evidence if r not in criterion.explanation]
    refs = unnamed[:_MAX_EVIDENCE]
    if not refs:
        return ""
    more = len(unnamed) - len(refs)
    shown = ", ".join(md(r) for r in refs)
    return f" ({shown}{f' and {more} more' if more > 0 else ''})"


def _criteria_section(title: str, criteria: Sequence[CriterionResult], *, text: bool) -> list[str]:
    if not criteria:
        return []
    lines = [f"**{title} ({len(criteria)})**", ""]
    for c in criteria:
        sentence = c.explanation if not text else (c.explanation or c.text)
        line = f"- **{md(c.label)}**: {md(sentence)}"
        if text and c.text and c.text != sentence:
            line += f" Protocol: _{md(c.text)}_"
        lines.append(line + _evidence(c))
    lines.append("")
    return lines


def _screening_detail(evaluation: TrialEvaluation, trial: TrialInfo, ctx: CardContext) -> str:
    status = (
        "possible candidate"
        if evaluation.status is TrialStatus.CANDIDATE
        else "possible candidate, needs review"
    )
    lines = [
        f"**{md(trial.id)}: {md(evaluation.title or trial.title)}**",
        "",
        f"Screening result: **{status}** as of {ctx.as_of.isoformat()}"
        f" (criteria version {md(evaluation.version)}). Nothing in the record excludes the"
        " patient; the trial team makes the final decision.",
        "",
    ]
    lines += _criteria_section("Criteria met", evaluation.with_result(Result.PASS), text=False)
    lines += _criteria_section(
        "Unknown: data that would resolve them",
        evaluation.with_result(Result.UNKNOWN),
        text=False,
    )
    lines += _criteria_section(
        "To confirm by the trial team", evaluation.with_result(Result.MANUAL), text=True
    )
    lines.append(f"Registry record: {trial.registry_url}")
    return "\n".join(lines).strip()


def _referral(trial: TrialInfo, evaluation: TrialEvaluation, ctx: CardContext) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "status": "draft",
        "intent": "order",
        "code": {"text": "Referral to the clinical trial team"},
        "subject": {"reference": f"Patient/{ctx.patient_id}"},
        "reasonCode": [
            {
                "text": f"Screening for {trial.id} ({trial.short_title or trial.title}):"
                f" {evaluation.status.value} as of {ctx.as_of.isoformat()}"
            }
        ],
    }
    if ctx.encounter_id:
        resource["encounter"] = {"reference": f"Encounter/{ctx.encounter_id}"}
    if ctx.user_id and ctx.user_id.split("/", 1)[0] in ("Practitioner", "PractitionerRole"):
        resource["requester"] = {"reference": ctx.user_id}
    return {
        "label": "Refer to the trial team",
        "uuid": _uuid(),
        "actions": [
            {
                "type": "create",
                "description": f"Create a referral to the {trial.id} trial team",
                "resource": resource,
            }
        ],
    }


def _source(trial: TrialInfo) -> dict[str, Any]:
    return {"label": f"{trial.id} trial screening", "url": trial.registry_url, "topic": dict(TOPIC)}


def _registry_link(trial: TrialInfo) -> dict[str, Any]:
    return {
        "label": f"{trial.id} on ClinicalTrials.gov",
        "url": trial.registry_url,
        "type": "absolute",
    }


def screening_card(
    evaluation: TrialEvaluation, trial: TrialInfo, ctx: CardContext
) -> dict[str, Any] | None:
    """The patient-view card for one trial, or None when the patient is excluded."""
    if evaluation.status is TrialStatus.EXCLUDED:
        return None
    return {
        "uuid": _uuid(),
        "summary": _screening_summary(evaluation, trial),
        "indicator": "info",
        "detail": _screening_detail(evaluation, trial, ctx),
        "source": _source(trial),
        "suggestions": [_referral(trial, evaluation, ctx)],
        # 2.0: if suggestions are present, selectionBehavior MUST also be provided.
        "selectionBehavior": "at-most-one",
        "overrideReasons": [dict(r) for r in OVERRIDE_REASONS],
        "links": [_registry_link(trial)],
    }


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
    labels = list(dict.fromkeys(b.criterion.label for b in items))
    suffix = f"({labels[0]}{' +' + str(len(labels) - 1) if len(labels) > 1 else ''})"
    status = evaluation.status.value
    lines = [
        f"**This order may end the patient's eligibility for {md(trial.id)}:"
        f" {md(evaluation.title or trial.title)}.**",
        "",
        f"The patient is currently **{status}** for this trial"
        f" (as of {ctx.as_of.isoformat()}). Talk to the trial team before signing if the"
        " trial is still an option.",
        "",
        "| Order | Criterion it would break |",
        "|---|---|",
    ]
    for b in items:
        lines.append(
            f"| {md(b.order)} | {md(b.criterion.kind)}: {md(b.criterion.label)}"
            f" — {md(b.criterion.text)} |"
        )
    lines += ["", f"Registry record: {trial.registry_url}"]
    return {
        "uuid": _uuid(),
        "summary": summary_line("Order may end trial eligibility", trial, suffix),
        "indicator": "warning",
        "detail": "\n".join(lines),
        "source": _source(trial),
        "overrideReasons": [dict(r) for r in _WARNING_OVERRIDE_REASONS],
        "links": [_registry_link(trial)],
    }


def trial_infos(trials: Iterable[Any]) -> Mapping[str, TrialInfo]:
    """Card metadata of each trial of a TrialSet, by NCT number."""
    return {
        t.id: TrialInfo(
            id=t.id,
            title=t.title,
            short_title=getattr(t, "short_title", "") or t.title,
            url=t.url,
        )
        for t in trials
    }
