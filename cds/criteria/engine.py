"""The evaluator: one patient record, a set of trials and a date in; results with evidence out."""

from __future__ import annotations

import logging
from datetime import date

from cds.criteria.definitions import Criterion, TrialSet
from cds.criteria.model import CriterionResult, PatientEvaluation, Result, TrialEvaluation
from cds.criteria.record import PatientRecord
from cds.criteria.rules import RULES, Context, Outcome, _listing, related_on_record

log = logging.getLogger(__name__)


def evaluate(record: PatientRecord, trials: TrialSet, as_of: date) -> PatientEvaluation:
    """Evaluate every criterion of every trial for one patient on ``as_of``.

    A pure function of its inputs: no I/O, no clock, no globals, so it can run in a request,
    a worker process or a map step of a distributed job alike.
    """
    evaluations = []
    for trial in trials:
        ctx = Context(record=record, trials=trials, trial=trial, as_of=as_of)
        results = tuple(_evaluate_criterion(criterion, ctx) for criterion in trial.criteria)
        evaluations.append(
            TrialEvaluation(
                trial=trial.id,
                version=trial.version,
                title=trial.title,
                url=trial.url,
                registry_status=trial.registry_status,
                criteria=results,
            )
        )
    return PatientEvaluation(
        patient=record.patient_ref,
        as_of=as_of,
        trials=tuple(evaluations),
        warnings=tuple(dict.fromkeys(record.warnings)),
    )


#: results that are the same for every patient (manual criteria with nothing related to
#: list), by criterion; immutable, so one object serves every evaluation
_CONSTANT_RESULTS: dict[int, tuple[Criterion, CriterionResult]] = {}


def _evaluate_criterion(criterion: Criterion, ctx: Context) -> CriterionResult:
    if criterion.rule is None and not criterion.related:
        known = _CONSTANT_RESULTS.get(id(criterion))
        if known is not None and known[0] is criterion:
            return known[1]
        constant = _result(criterion, _manual(criterion, ctx))
        _CONSTANT_RESULTS[id(criterion)] = (criterion, constant)
        return constant
    if criterion.rule is None:
        return _result(criterion, _manual(criterion, ctx))
    try:
        outcome = RULES[criterion.rule["type"]](criterion.rule, ctx)
    except (TypeError, ValueError, KeyError, AttributeError, ArithmeticError) as exc:
        # Data shaped in a way no rule anticipated must not sink the patient or the
        # sweep: the criterion becomes unknown and the cause is logged by type only (its
        # message could quote patient data; the explanation tells the reader instead).
        log.warning(
            "criterion %s of %s could not be evaluated: %s",
            criterion.id,
            ctx.trial.id,
            type(exc).__name__,
        )
        outcome = Outcome(
            Result.UNKNOWN,
            (ctx.record.patient_ref,),
            "The record could not be evaluated for this criterion (unexpected data shape); "
            "review the record by hand.",
        )
    incomplete = ctx.record.incomplete
    if incomplete and outcome.result in (Result.PASS, Result.FAIL):
        # A pass or a fail read from data we did not get in full is not known: "none on
        # record" may only mean the search failed.
        gaps = [incomplete[t] for t in ctx.trials.resource_types_read(criterion) if t in incomplete]
        if gaps:
            outcome = Outcome(Result.UNKNOWN, outcome.evidence, gaps[0])
    return _result(criterion, outcome)


def _result(criterion: Criterion, outcome: Outcome) -> CriterionResult:
    # Positional, in CriterionResult's field order (id, kind, text, label, then the
    # outcome's result, evidence, explanation): a named tuple is built faster that way.
    return CriterionResult(criterion.id, criterion.kind, criterion.text, criterion.label, *outcome)


def _manual(criterion: Criterion, ctx: Context) -> Outcome:
    reason = criterion.manual_reason or "Not computable from structured data."
    if not criterion.related:
        return Outcome(Result.MANUAL, (), f"To confirm by the study team: {reason}")
    related = related_on_record(ctx, criterion.related)
    if not related:
        return Outcome(
            Result.MANUAL, (), f"To confirm by the study team: {reason} Nothing related on record."
        )
    return Outcome(
        Result.MANUAL,
        tuple(dict.fromkeys(e.ref for e in related)),
        f"To confirm by the study team: {reason} Related on record: {_listing(related)}.",
    )
