"""The hook handlers: gather the record, evaluate it, and turn evaluations into cards."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from cds.criteria.engine import evaluate
from cds.criteria.model import PatientEvaluation
from cds.criteria.record import PatientRecord
from cds.hooks.auth import ClientIdentity
from cds.hooks.calllog import CallLog
from cds.hooks.cards import (
    BrokenCriterion,
    CardContext,
    order_warning_card,
    screening_card,
)
from cds.hooks.evidence import index_resources
from cds.hooks.orders import draft_orders, orders_at_risk, trials_at_stake
from cds.hooks.prefetch import PrefetchResult, gather
from cds.hooks.registry import Service
from cds.hooks.state import HooksState
from cds.hooks.store import IssuedCard

__all__ = ["HookCall", "order_check", "patient_view"]

log = logging.getLogger("cds.hooks")

JSONDict = dict[str, Any]


@dataclass
class HookCall:
    """One validated hook request on its way to an answer."""

    service: Service
    body: JSONDict
    identity: ClientIdentity
    state: HooksState
    log: CallLog
    #: time.monotonic() past which no FHIR query is waited for
    deadline: float
    #: "Type/id" -> the resources the evaluation read (set by :func:`screen`; cards cite them)
    resources: dict[str, JSONDict] = field(default_factory=dict)
    #: absolute URL of the screening page's SMART launch, for the cards' smart link
    launch_url: str | None = None

    @property
    def context(self) -> JSONDict:
        context: JSONDict = self.body["context"]
        return context

    @property
    def patient_id(self) -> str:
        return str(self.context["patientId"])

    @property
    def scope(self) -> str:
        """The namespace of the patient id: the calling EHR (iss, tenant)."""
        return f"{self.identity.iss or '-'}|{self.identity.tenant or '-'}"

    def card_context(self) -> CardContext:
        settings = self.state.settings
        return CardContext(
            patient_id=self.patient_id,
            user_id=self.context.get("userId"),
            encounter_id=self.context.get("encounterId"),
            as_of=settings.as_of or date.today(),
            resources=self.resources,
            launch_url=self.launch_url,
        )


def _dedupe(resources: Iterable[JSONDict]) -> list[JSONDict]:
    seen: set[tuple[Any, Any]] = set()
    out: list[JSONDict] = []
    for resource in resources:
        rid = resource.get("id")
        key = (resource.get("resourceType"), rid)
        if rid is not None:
            if key in seen:
                continue
            seen.add(key)
        out.append(resource)
    return out


def screen(call: HookCall, trial_ids: Iterable[str] | None = None) -> PatientEvaluation | None:
    """The patient's evaluation, from prefetch and fhirServer; None when nothing can be said."""
    st = call.state
    auth = call.body.get("fhirAuthorization") or {}
    data: PrefetchResult = gather(
        prefetch=call.body.get("prefetch"),
        queries=st.queries,
        trials=st.trials,
        patient_id=call.patient_id,
        fhir_server=call.body.get("fhirServer"),
        access_token=auth.get("access_token"),
        trusted=st.settings.trusted_fhir_servers(call.identity.iss),
        settings=st.settings,
        deadline=call.deadline,
    )
    cl = call.log
    cl.prefetch_used, cl.prefetch_fetched = data.used, data.fetched
    cl.prefetch_empty, cl.prefetch_incomplete = data.empty, data.incomplete
    cl.fhir_calls, cl.timed_out = data.fhir_calls, data.timed_out
    resources = _dedupe(data.resources)
    call.resources = index_resources(resources)
    patients = [
        r
        for r in resources
        if r.get("resourceType") == "Patient" and r.get("id") == call.patient_id
    ]
    if not patients:
        if "patient" in data.incomplete:
            # Past the budget without even the Patient: nothing can be said.
            cl.note = "no Patient within the time budget"
            return None
        # null Patient: no demographics; the criteria that need them become unknown.
        patients = [{"resourceType": "Patient", "id": call.patient_id}]
    incomplete = None
    if data.incomplete:
        # A pass or a fail read from data we did not get in full is not known (the engine
        # makes it unknown): an absent Procedure list would read as "no prior embolization".
        why = (
            "Not assessed: the data it needs could not be fetched in time"
            if data.timed_out
            else "Not assessed: the data it needs was not available in full"
        )
        incomplete = {q.resource_type: why for q in st.queries if q.key in data.incomplete}
    record = PatientRecord.from_resources(
        [r for r in resources if r.get("resourceType") != "Patient"],
        st.trials,
        patient=patients[0],
        warnings=data.warnings,
        incomplete=incomplete,
    )
    trials = st.trials if trial_ids is None else st.trials.only(trial_ids)
    evaluation = evaluate(record, trials, call.card_context().as_of)
    for trial in evaluation.trials:
        cl.trial_statuses[trial.trial] = trial.status.value
        cl.rules_version[trial.trial] = trial.version
    return evaluation


def _record(call: HookCall, cards: list[tuple[str, JSONDict]]) -> list[JSONDict]:
    """Remember what each card uuid stood for (feedback names only the uuid)."""
    call.state.store.record_cards(
        IssuedCard(
            uuid=card["uuid"],
            service=call.service.id,
            hook=call.service.hook,
            hook_instance=str(call.body["hookInstance"]),
            scope=call.scope,
            patient=call.patient_id,
            trial=trial,
        )
        for trial, card in cards
    )
    call.log.cards = [card["uuid"] for _, card in cards]
    return [card for _, card in cards]


def patient_view(call: HookCall) -> list[JSONDict]:
    """patient-view: at most one card per trial the patient may be a candidate for."""
    # A trial whose cards the site turned off is not screened here at all (sweeps still do).
    off = set(call.state.settings.cards_off)
    shown = [t for t in call.state.trials.ids if t not in off]
    if not shown:
        call.log.note = "cards are turned off for every enabled trial"
        return []
    evaluation = screen(call, shown if off else None)
    if evaluation is None:
        return []
    suppressed = call.state.store.suppressed(call.scope, call.patient_id)
    ctx = call.card_context()
    cards: list[tuple[str, JSONDict]] = []
    for trial in evaluation.trials:
        if trial.trial in suppressed:
            # An override "already screened" / "patient declined" hides it for a while.
            call.log.suppressed.append(trial.trial)
            continue
        card = screening_card(trial, call.state.infos[trial.trial], ctx)
        if card is not None:
            cards.append((trial.trial, card))
    return _record(call, cards)


def order_check(call: HookCall) -> list[JSONDict]:
    """order-select / order-sign: warn when a draft order would break a trial at stake."""
    st = call.state
    selections = call.context.get("selections") if call.service.hook == "order-select" else None
    orders = draft_orders(call.context["draftOrders"], selections)
    shown = [t for t in st.trials.ids if t not in st.settings.cards_off]
    at_stake = trials_at_stake(st.trials, shown, orders)
    if not at_stake:
        # Nothing when no trial is at stake: answered without touching any patient data.
        call.log.note = "no draft order concerns an enabled trial"
        return []
    evaluation = screen(call, sorted(at_stake))
    if evaluation is None:
        return []
    declined = {
        trial
        for trial, reasons in st.store.suppressed(call.scope, call.patient_id).items()
        if "patient-declined" in reasons
    }
    ctx = call.card_context()
    cards: list[tuple[str, JSONDict]] = []
    for trial in evaluation.trials:
        if trial.trial in declined:
            call.log.suppressed.append(trial.trial)
            continue
        risks = orders_at_risk(trial, st.trials, orders)
        broken = [BrokenCriterion(r.criterion, r.order.name, r.order.reference) for r in risks]
        card = order_warning_card(trial, st.infos[trial.trial], broken, ctx)
        if card is not None:
            cards.append((trial.trial, card))
    return _record(call, cards)
