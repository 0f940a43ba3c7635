"""Each rule reads only what its kind declares (cds/criteria/reads.py), and every door derives
what it fetches from those declarations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cds.criteria import load_trials
from cds.criteria.reads import CLINICAL_TYPES, RECORD_TYPES, RULE_KINDS
from cds.criteria.record import PatientRecord
from cds.criteria.rules import Context
from cds.fhir.bundle import records_from_bundle
from cds.fhir.queries import build_patient_queries
from tests.helpers import AS_OF

ROOT = Path(__file__).resolve().parent.parent


class RecordingPatient(dict[str, Any]):
    """A Patient resource that notes which elements are read."""

    def __init__(self, data: dict[str, Any]) -> None:
        super().__init__(data)
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)


def _fixture_records() -> list[tuple[str, PatientRecord]]:
    trials = load_trials()
    found = []
    for path in sorted((ROOT / "fhir_fixtures").glob("*.json")):
        for record in records_from_bundle(json.loads(path.read_text()), trials):
            found.append((path.name, record))
    return found


def test_every_rule_reads_only_what_its_kind_declares(monkeypatch: pytest.MonkeyPatch) -> None:
    trials = load_trials()
    asked: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
    asked_texts: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
    real_entries, real_named = Context.entries, Context.named

    def recording(self: Context, types: Any, valueset_ids: Any) -> Any:
        ids = tuple(valueset_ids)
        asked.append((tuple(types), ids))
        return real_entries(self, types, ids)

    def recording_texts(self: Context, types: Any, signal_ids: Any) -> Any:
        ids = tuple(signal_ids)
        asked_texts.append((tuple(types), ids))
        return real_named(self, types, ids)

    monkeypatch.setattr(Context, "entries", recording)
    monkeypatch.setattr(Context, "named", recording_texts)
    checked = texts_checked = 0
    for name, record in _fixture_records():
        for trial in trials:
            for criterion in trial.criteria:
                if criterion.rule is None:
                    continue
                kind = RULE_KINDS[criterion.rule["type"]]
                declared = kind.reads(criterion.rule, trials.analytes)
                declared_texts = kind.texts_read(criterion.rule)
                patient = RecordingPatient(record.patient)
                # a fresh record per criterion: the record memoises what it reads
                fresh = PatientRecord(
                    patient=patient,
                    entries=record.entries,
                    _by_valueset=record._by_valueset,
                    _by_text=record._by_text,
                )
                asked.clear()
                asked_texts.clear()
                ctx = Context(record=fresh, trials=trials, trial=trial, as_of=AS_OF)
                kind.func(criterion.rule, ctx)
                for types, ids in asked:
                    for rtype in types:
                        undeclared = set(ids) - declared.get(rtype, set())
                        assert not undeclared, (
                            f"{name}: {trial.id} {criterion.id} ({kind.name}) reads "
                            f"{sorted(undeclared)} from {rtype} without declaring it"
                        )
                for types, ids in asked_texts:
                    texts_checked += 1
                    for rtype in types:
                        undeclared = set(ids) - declared_texts.get(rtype, set())
                        assert not undeclared, (
                            f"{name}: {trial.id} {criterion.id} ({kind.name}) looks for the "
                            f"text signals {sorted(undeclared)} in {rtype} without declaring it"
                        )
                elements = patient.read - {"id"}
                allowed = kind.patient_elements_read(criterion.rule)
                assert elements <= allowed, (
                    f"{name}: {criterion.id} ({kind.name}) reads Patient "
                    f"{sorted(elements - allowed)} without declaring it"
                )
                checked += 1
    assert checked > 1000
    assert texts_checked > 0


def test_a_rule_reading_an_undeclared_value_set_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trace above fails when a rule reads more than it declares."""
    trials = load_trials()
    kind = RULE_KINDS["age"]
    rule = {"type": "age", "op": ">", "years": 18}
    asked: list[tuple[str, ...]] = []
    real_entries = Context.entries

    def recording(self: Context, types: Any, valueset_ids: Any) -> Any:
        asked.append(tuple(valueset_ids))
        return real_entries(self, types, valueset_ids)

    monkeypatch.setattr(Context, "entries", recording)
    _, record = _fixture_records()[0]
    ctx = Context(record=record, trials=trials, trial=trials.trials[0], as_of=AS_OF)
    ctx.entries(("Condition",), ["cirrhosis"])  # what a careless rule might do
    declared = kind.reads(rule, trials.analytes)
    assert any(set(ids) - declared.get("Condition", set()) for ids in asked)


def test_every_door_fetches_what_the_rules_read() -> None:
    trials = load_trials()
    read = {t for t in CLINICAL_TYPES if trials.valueset_ids_for(t) or trials.text_signals_for(t)}
    read |= {
        t
        for trial in trials
        for c in trial.criteria
        if c.rule is not None
        for t in RULE_KINDS[c.rule["type"]].fixed_types
    }
    assert "MedicationDispense" in read  # the drug a pharmacy handed over counts
    assert "ResearchSubject" in read  # enrolment in another study
    queried = {q.resource_type for q in build_patient_queries(trials)}
    assert queried == {"Patient", *read}
    from cds.sweep.remote import export_types

    assert set(export_types(trials)) == {"Patient", *read, "Medication"}
    assert set(RECORD_TYPES) >= set(export_types(trials))


def test_the_trial_schema_rule_branches_come_from_the_declarations() -> None:
    from cds.criteria.reads import rule_schema

    branches = rule_schema()["rule"]["allOf"]
    assert [b["if"]["properties"]["type"]["const"] for b in branches] == list(RULE_KINDS)
    lab = next(b["then"] for b in branches if b["if"]["properties"]["type"]["const"] == "lab")
    assert set(lab["required"]) == {"type", "analyte", "acceptable"}
