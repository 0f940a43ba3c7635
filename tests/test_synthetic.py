"""The synthetic population: reproducible, realistic volumes, known codes, NET cases that reach
every criterion outcome of both trials."""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from cds.cli import main
from cds.criteria import load_trials
from cds.criteria.engine import evaluate
from cds.criteria.record import PatientRecord
from cds.synthetic import (
    _METABOLIC,
    _NOISE_CONDITIONS,
    _NOISE_MEDICATIONS,
    _NOISE_PROCEDURES,
    _ROUTINE_LABS,
    _VITALS,
    NET_VARIANTS,
    Population,
    big_patient,
)
from tests.helpers import AS_OF


def _digest(directory: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _codings(node: Any) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if isinstance(node, dict):
        if isinstance(node.get("coding"), list):
            found += [(c["system"], c["code"]) for c in node["coding"]]
        for key, value in node.items():
            if key != "coding":
                found += _codings(value)
    elif isinstance(node, list):
        for value in node:
            found += _codings(value)
    return found


def test_same_seed_same_population_other_seed_another(tmp_path: Path) -> None:
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        assert (
            main(
                [
                    "fixtures",
                    "generate",
                    "--patients",
                    "30",
                    "--seed",
                    str(seed),
                    "--out",
                    str(tmp_path / name),
                    "--format",
                    "ndjson",
                ]
            )
            == 0
        )
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_patient_i_does_not_depend_on_n() -> None:
    assert Population(10, seed=3).patient(5) == Population(1000, seed=3).patient(5)


def test_bundles_and_ndjson_hold_the_same_resources(tmp_path: Path) -> None:
    assert (
        main(
            [
                "fixtures",
                "generate",
                "--patients",
                "12",
                "--seed",
                "1",
                "--out",
                str(tmp_path / "b"),
                "--format",
                "bundles",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "fixtures",
                "generate",
                "--patients",
                "12",
                "--seed",
                "1",
                "--out",
                str(tmp_path / "n"),
                "--format",
                "ndjson",
            ]
        )
        == 0
    )
    from_bundles = sorted(
        json.dumps(e["resource"], sort_keys=True)
        for p in (tmp_path / "b").glob("*.json")
        for e in json.loads(p.read_text())["entry"]
    )
    from_ndjson = sorted(
        json.dumps(json.loads(line), sort_keys=True)
        for p in (tmp_path / "n").glob("*.ndjson")
        for line in p.read_text().splitlines()
    )
    assert len(list((tmp_path / "b").glob("*.json"))) == 12
    assert from_bundles == from_ndjson


def test_realistic_volumes() -> None:
    counts: dict[str, list[int]] = defaultdict(list)
    for resources in Population(60, seed=2, net_every=0):
        per_type = Counter(r["resourceType"] for r in resources)
        for rtype in ("Observation", "Condition", "Procedure", "MedicationRequest"):
            counts[rtype].append(per_type[rtype])
    assert min(counts["Observation"]) >= 18
    assert max(counts["Observation"]) >= 100  # tens to hundreds
    assert min(counts["Condition"]) >= 1
    assert sum(counts["Procedure"]) > 0 and sum(counts["MedicationRequest"]) > 0


def test_only_value_set_codes_and_well_known_noise_codes() -> None:
    trials = load_trials()
    known: set[tuple[str, str]] = set()
    for valueset in trials.valuesets.values():
        known.update(valueset.codes)
    noise = {("http://loinc.org", c[0]) for c in _VITALS + _METABOLIC + _ROUTINE_LABS}
    noise |= {("http://snomed.info/sct", c) for c, _ in _NOISE_CONDITIONS + _NOISE_PROCEDURES}
    noise |= {("http://www.nlm.nih.gov/research/umls/rxnorm", c) for c, _ in _NOISE_MEDICATIONS}
    # Category, clinical-status and answer codes are FHIR/LOINC vocabulary, not clinical data.
    vocab = {
        "http://terminology.hl7.org/CodeSystem/observation-category",
        "http://terminology.hl7.org/CodeSystem/condition-clinical",
        "http://terminology.hl7.org/CodeSystem/condition-ver-status",
        "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
    }
    answers = set(trials.answers["ecog"]) | {"http://loinc.org|LA9623-5"}
    population = Population(len(NET_VARIANTS) * 2, seed=4, net_every=2)
    unknown = set()
    for resources in population:
        for system, code in _codings(resources):
            if system in vocab or f"{system}|{code}" in answers:
                continue
            if (system, code) not in known and (system, code) not in noise:
                unknown.add((system, code))
    # Value sets normalise some systems; compare through the engine's own normalisation.
    from cds.criteria.valuesets import normalize_coding

    valuesets = list(trials.valuesets.values())
    unknown = {
        k for k in unknown if not any(vs.contains_key(normalize_coding(*k)) for vs in valuesets)
    }
    assert not unknown
    # The noise stays out of the trials' value sets, except the routine labs and weight.
    routine = {("http://loinc.org", c[0]) for c in _ROUTINE_LABS} | {
        ("http://loinc.org", "29463-7")
    }
    assert not {normalize_coding(*k) for k in noise - routine} & known


def test_net_cases_reach_every_outcome_of_every_computable_criterion() -> None:
    trials = load_trials()
    seen: dict[tuple[str, str], set[str]] = defaultdict(set)
    population = Population(len(NET_VARIANTS), seed=5, net_every=1)
    statuses = Counter()
    for resources in population:
        evaluation = evaluate(PatientRecord.from_resources(resources, trials), trials, AS_OF)
        for trial in evaluation.trials:
            statuses[trial.status.value] += 1
            for c in trial.criteria:
                seen[(trial.trial, c.id)].add(c.result.value)
    for trial in trials:
        for criterion in trial.criteria:
            results = seen[(trial.id, criterion.id)]
            if criterion.is_manual:
                assert results == {"manual"}
            else:
                assert "pass" in results or "manual" in results, criterion.id
                assert results & {"fail", "unknown"}, (trial.id, criterion.id, results)
    assert set(statuses) == {"candidate", "needs-review", "excluded"}


def test_ordinary_patients_are_not_candidates() -> None:
    trials = load_trials()
    for resources in Population(20, seed=6, net_every=0):
        evaluation = evaluate(PatientRecord.from_resources(resources, trials), trials, AS_OF)
        assert all(t.status.value == "excluded" for t in evaluation.trials)


def test_big_patient_has_the_exact_volumes_and_is_a_candidate() -> None:
    resources = big_patient()
    per_type = Counter(r["resourceType"] for r in resources)
    assert per_type["Observation"] == 2000
    assert per_type["Condition"] == 200
    assert per_type["Procedure"] == 100
    meds = sum(
        per_type[t]
        for t in ("MedicationRequest", "MedicationStatement", "MedicationAdministration")
    )
    assert meds == 100
    evaluation = evaluate(
        PatientRecord.from_resources(resources, load_trials()), load_trials(), AS_OF
    )
    assert [t.status.value for t in evaluation.trials] == ["candidate", "candidate"]
