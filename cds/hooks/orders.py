"""Draft orders (order-select / order-sign ``context.draftOrders``) that would break a criterion."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cds.criteria.model import CriterionResult, Result, TrialEvaluation, TrialStatus
from cds.criteria.record import codings_of, concept_display

__all__ = [
    "AtRisk",
    "DraftOrder",
    "TrialDefinitions",
    "draft_orders",
    "orders_at_risk",
    "trials_at_stake",
]

# Where each draft request type keeps the code of what is ordered (FHIR R4).
_CODE_FIELDS = {
    "MedicationRequest": "medicationCodeableConcept",
    "ServiceRequest": "code",
    "DeviceRequest": "codeCodeableConcept",
    "NutritionOrder": None,
    "VisionPrescription": None,
    "CommunicationRequest": None,
}
_MEDICATION_TYPES = ("MedicationRequest",)


class _ValueSet(Protocol):
    def contains(self, system: str, code: str) -> bool: ...

    def display(self, system: str, code: str) -> str | None: ...


class _Criterion(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def breaking_valuesets(self) -> frozenset[str]: ...


class _Trial(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def criteria(self) -> Sequence[_Criterion]: ...


class TrialDefinitions(Protocol):
    """What order screening needs from ``cds.criteria.TrialSet``."""

    def __getitem__(self, trial_id: str) -> _Trial: ...

    def valueset(self, valueset_id: str) -> _ValueSet: ...


@dataclass(frozen=True, slots=True)
class DraftOrder:
    """One draft request with the normalised codes of what it orders."""

    reference: str  # "MedicationRequest/abc", or "draftOrders.entry[2]" when it has no id
    name: str
    codes: tuple[tuple[str, str], ...]
    #: False when the order carries no text or display and ``name`` is its first code
    named: bool = True


def draft_orders(
    bundle: Mapping[str, Any], selections: Iterable[str] | None = None
) -> list[DraftOrder]:
    """The orders of ``context.draftOrders``; for order-select only the selected ones.

    Hook Library order-select: ``selections`` are "the FHIR id of the newly selected order(s)"
    in draftOrders; the others were selected earlier and already screened by an earlier call.
    """
    entries = [e for e in bundle.get("entry") or [] if isinstance(e, dict)]
    resources = [e.get("resource") for e in entries]
    medications = {
        f"Medication/{r.get('id')}": r
        for r in resources
        if isinstance(r, dict) and r.get("resourceType") == "Medication"
    }
    orders: list[DraftOrder] = []
    for index, resource in enumerate(resources):
        if not isinstance(resource, dict):
            continue
        rtype = resource.get("resourceType")
        if not isinstance(rtype, str) or rtype == "Medication":
            continue
        rid = resource.get("id")
        reference = f"{rtype}/{rid}" if isinstance(rid, str) else f"draftOrders.entry[{index}]"
        concept = _ordered_concept(rtype, resource, medications)
        keys = tuple(codings_of(concept))
        name = concept_display(concept)
        fallback = f"{keys[0][0]}|{keys[0][1]}" if keys else rtype
        orders.append(DraftOrder(reference, name or fallback, keys, named=name is not None))
    if selections is not None:
        wanted = set(selections)
        chosen = [o for o in orders if o.reference in wanted]
        # A client whose selections name no entry still gets its orders checked.
        return chosen or orders
    return orders


def _ordered_concept(
    rtype: str, resource: Mapping[str, Any], medications: Mapping[str, Mapping[str, Any]]
) -> Any:
    field = _CODE_FIELDS.get(rtype, "code")
    if field is None:
        return None
    concept = resource.get(field)
    if concept is None and rtype in _MEDICATION_TYPES:
        reference = (resource.get("medicationReference") or {}).get("reference")
        if isinstance(reference, str):
            if reference.startswith("#"):
                for contained in resource.get("contained") or []:
                    if isinstance(contained, dict) and contained.get("id") == reference[1:]:
                        return contained.get("code")
                return None
            medication = medications.get(reference)
            return medication.get("code") if medication else None
    return concept


@dataclass(frozen=True, slots=True)
class AtRisk:
    """A criterion of a trial at stake that a draft order would make fail."""

    criterion: CriterionResult
    order: DraftOrder


def orders_at_risk(
    evaluation: TrialEvaluation, definitions: TrialDefinitions, orders: Sequence[DraftOrder]
) -> list[AtRisk]:
    """For a trial the patient is candidate or needs-review for: the (criterion, order) pairs
    where the order's code is in a value set whose presence would make the criterion fail."""
    if evaluation.status is TrialStatus.EXCLUDED or not orders:
        return []
    try:
        trial = definitions[evaluation.trial]
    except KeyError:
        return []
    results = {c.id: c for c in evaluation.criteria}
    found: list[AtRisk] = []
    for criterion in trial.criteria:
        result = results.get(criterion.id)
        if result is None or result.result is Result.FAIL or not criterion.breaking_valuesets:
            continue
        valuesets = [definitions.valueset(v) for v in sorted(criterion.breaking_valuesets)]
        for order in orders:
            hits = [
                (vs, system, code)
                for system, code in order.codes
                for vs in valuesets
                if vs.contains(system, code)
            ]
            if hits:
                found.append(AtRisk(result, order if order.named else _named(order, hits)))
    return found


def _named(order: DraftOrder, hits: Sequence[tuple[_ValueSet, str, str]]) -> DraftOrder:
    """An order sent with codes only (an NDC, say) named as the value set that matched it
    names the code, so that a card says "Xeloda (capecitabine) 150 mg oral tablet (NDC
    0004-1100-20)" rather than a system URL."""
    vs, system, code = hits[0]
    name = vs.display(system, code)
    if name is None:
        return order
    return DraftOrder(order.reference, name, order.codes, named=True)


def trials_at_stake(
    definitions: TrialDefinitions, trial_ids: Iterable[str], orders: Sequence[DraftOrder]
) -> set[str]:
    """Trials with a criterion some draft order would break, whatever the patient's status:
    the cheap check that lets an order hook answer ``{"cards": []}`` without any FHIR data."""
    at_stake: set[str] = set()
    codes = [key for order in orders for key in order.codes]
    if not codes:
        return at_stake
    for trial_id in trial_ids:
        trial = definitions[trial_id]
        for criterion in trial.criteria:
            valuesets = [definitions.valueset(v) for v in sorted(criterion.breaking_valuesets)]
            if any(vs.contains(system, code) for system, code in codes for vs in valuesets):
                at_stake.add(trial_id)
                break
    return at_stake
