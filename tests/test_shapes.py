"""The shapes hospitals send, rule by rule: each read as the fixtures' own shape would be, and
anything unreadable or ambiguous unknown, never a pass."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from cds.criteria import load_trials
from cds.criteria.model import Result, TrialStatus
from cds.criteria.record import PatientRecord, parse_instant
from cds.criteria.rules import observed_quantity
from cds.criteria.units import normalize_unit
from cds.evaluate_command import evaluate_files
from cds.sweep.runner import sweep_ndjson
from tests.helpers import AS_OF, A, B, criterion, obs, patient, run, sweep_lines, sweep_options

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("element", "expected"),
    [
        ({"valueString": "<0.2"}, {"value": 0.2, "comparator": "<"}),
        ({"valueString": " ≥ 20 %"}, {"value": 20, "comparator": ">=", "unit": "%"}),
        ({"valueString": "15%"}, {"value": 15, "unit": "%"}),
        ({"valueString": "4.1 g/dL"}, {"value": 4.1, "unit": "g/dL"}),
        ({"valueString": "210 x10E3/uL"}, {"value": 210, "unit": "x10E3/uL"}),
        ({"valueInteger": 3}, {"value": 3}),
        (
            {"valueRatio": {"numerator": {"value": 1.1}, "denominator": {"value": 1}}},
            {"value": 1.1},
        ),
    ],
)
def test_values_are_read_from_every_value_element(
    element: dict[str, Any], expected: dict[str, Any]
) -> None:
    assert observed_quantity(element) == expected


@pytest.mark.parametrize(
    ("element", "says"),
    [
        ({"valueString": "POSITIVE"}, "not a number"),
        ({"valueString": "1,000"}, "not a number"),  # a thousands separator or a decimal comma
        (
            {"valueRatio": {"numerator": {"value": 15}, "denominator": {"value": 100}}},
            "ratio",
        ),
        (
            {
                "dataAbsentReason": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                            "code": "error",
                        }
                    ]
                }
            },
            "without a value (data absent: error)",
        ),
        ({"valueBoolean": True}, "no numeric value"),
    ],
)
def test_values_that_cannot_be_read_say_why(element: dict[str, Any], says: str) -> None:
    reason = observed_quantity(element)
    assert isinstance(reason, str) and says in reason


@pytest.mark.parametrize(
    ("unit", "ucum"),
    [
        ("x10E3/uL", "10*3/uL"),
        ("10^3/uL", "10*3/uL"),
        ("K/uL", "10*3/uL"),
        ("K/mm3", "10*3/mm3"),
        ("thou/uL", "10*3/uL"),
        ("10*3/mm3", "10*3/mm3"),
        ("G/L", "10*9/L"),  # giga per litre
        ("g/L", "g/L"),  # grams per litre
        ("umol/L", "umol/L"),
        ("mmol/L", "mmol/L"),
    ],
)
def test_unit_spellings_labs_send(unit: str, ucum: str) -> None:
    assert normalize_unit({"unit": unit}) == ucum


def test_a_value_string_bound_decides_when_it_can_and_a_missing_unit_is_unknown() -> None:
    bili = obs("b", "1975-2", None, None)
    bili["valueString"] = "<0.2 mg/dL"
    creat = obs("c", "2160-0", 0.9, None)  # LOINC fixes the property, not the unit
    evaluation = run([bili, creat], trials=load_trials([A]))
    assert criterion(evaluation, A, "inc-bilirubin").result is Result.PASS
    creatinine = criterion(evaluation, A, "inc-creatinine")
    assert creatinine.result is Result.UNKNOWN and "has no unit" in creatinine.explanation


def test_latest_is_decided_by_the_instant_with_its_zone() -> None:
    # 09:00 at UTC-5 is 14:00 UTC, later than 12:00 UTC the same day
    early = obs("a-early", "777-3", 40, "10*3/uL", "2026-10-20T12:00:00Z")
    late = obs("z-late", "777-3", 160, "10*3/uL", "2026-10-20T09:00:00-05:00")
    assert (parse_instant("2026-10-20T09:00:00-05:00") or 0) > (
        parse_instant("2026-10-20T12:00:00Z") or 0
    )
    for order in ([early, late], [late, early]):
        result = criterion(run(order, trials=load_trials([A])), A, "inc-platelets")
        assert result.result is Result.PASS and result.evidence == ("Observation/z-late",)


def test_an_as_of_date_before_birth_is_unknown() -> None:
    evaluation = run([], trials=load_trials([A]), pat=patient(birth="2030-01-01"))
    age = criterion(evaluation, A, "inc-age")
    assert age.result is Result.UNKNOWN and "-" not in age.explanation.split("Age")[-1][:3]


@pytest.mark.parametrize(
    ("deceased", "result"),
    [
        ({"deceasedBoolean": True}, Result.FAIL),
        ({"deceasedDateTime": "2026-10-01"}, Result.FAIL),
        ({"deceasedDateTime": "2027-01-01"}, Result.PASS),  # after the as-of date
        ({"deceasedBoolean": False}, Result.PASS),
        ({"deceasedDateTime": "yesterday"}, Result.UNKNOWN),
    ],
)
def test_a_deceased_patient_is_never_a_candidate(deceased: dict[str, Any], result: Result) -> None:
    evaluation = run([], trials=load_trials([A]), pat={**patient(), **deceased})
    assert criterion(evaluation, A, "inc-living-patient").result is result
    if result is Result.FAIL:
        assert evaluation.trial(A).status is TrialStatus.EXCLUDED


@pytest.mark.parametrize(
    ("extension", "sex"),
    [
        (
            {
                "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-sex",
                "valueCoding": {"system": "http://snomed.info/sct", "code": "248152002"},
            },
            ("female", "sex"),
        ),
        (
            {
                "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex",
                "valueCode": "M",
            },
            ("male", "birth sex"),
        ),
    ],
)
def test_sex_from_us_core_extensions_when_gender_says_neither(
    extension: dict[str, Any], sex: tuple[str, str]
) -> None:
    record = PatientRecord.from_resources(
        [{**patient(gender="other"), "extension": [extension]}], load_trials()
    )
    assert record.sex == sex
    assert PatientRecord.from_resources([patient(gender="female")], load_trials()).sex == (
        "female",
        "gender",
    )


def test_pregnancy_status_not_pregnant_is_overruled_by_a_positive_test() -> None:
    status = obs("s", "82810-3", None, None, "2026-10-25")
    status["valueCodeableConcept"] = {
        "coding": [{"system": "http://snomed.info/sct", "code": "60001007"}]
    }
    hcg = obs("h", "2106-3", None, None, "2026-10-28")
    hcg["valueString"] = "Positive"
    woman = patient(gender="female", birth="1990-03-02")
    alone = criterion(run([status], trials=load_trials([A]), pat=woman), A, "exc-pregnancy")
    assert alone.result is Result.PASS and alone.evidence == ("Observation/s",)
    both = criterion(run([status, hcg], trials=load_trials([A]), pat=woman), A, "exc-pregnancy")
    assert both.result is Result.FAIL and both.evidence == ("Observation/h",)


def test_a_malformed_panel_makes_its_component_unknown() -> None:
    panel = obs("cbc", "58410-2", None, None)
    panel["component"] = [
        {
            "code": {"coding": [{"system": "http://loinc.org", "code": "777-3"}]},
            "valueQuantity": {"value": 210, "unit": "10*3/uL"},
        }
    ]
    panel["category"] = "laboratory"  # not a list of CodeableConcepts: the panel is invalid
    result = criterion(run([panel], trials=load_trials([A])), A, "inc-platelets")
    assert result.result is Result.UNKNOWN and "could not be read" in result.explanation


# -- inputs as they come ---------------------------------------------------------------------


def test_one_patient_across_files_is_one_line(tmp_path: Path) -> None:
    whole = json.loads((ROOT / "fhir_fixtures" / "both-candidate.json").read_text())
    entries = whole["entry"]
    half = len(entries) // 2
    for name, part in (("a.json", entries[:half]), ("b.json", entries[half:])):
        (tmp_path / name).write_text(json.dumps({**whole, "entry": part}))
    # a file of practitioners only (as Synthea writes): noted, not fatal
    (tmp_path / "practitioners.json").write_text(
        json.dumps(
            {
                "resourceType": "Bundle",
                "type": "batch",
                "entry": [{"resource": {"resourceType": "Practitioner", "id": "dr"}}],
            }
        )
    )
    split = evaluate_files([str(tmp_path)], load_trials(), AS_OF)
    single = evaluate_files(
        [str(ROOT / "fhir_fixtures" / "both-candidate.json")], load_trials(), AS_OF
    )
    assert [e.to_json() for e in split] == [e.to_json() for e in single]


def test_ndjson_given_to_evaluate_points_to_the_sweep(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cds.cli import main

    lines = tmp_path / "Patient.ndjson"
    lines.write_text('{"resourceType":"Patient","id":"p1"}\n')
    assert main(["evaluate", str(lines), "--as-of", "2026-11-01"]) == 2
    assert "cds sweep --ndjson" in capsys.readouterr().err
    as_json = tmp_path / "export.json"
    as_json.write_text('{"resourceType":"Patient","id":"p1"}\n{"resourceType":"Patient"}\n')
    assert main(["evaluate", str(as_json), "--as-of", "2026-11-01"]) == 2
    err = capsys.readouterr().err
    assert str(as_json) in err and "cds sweep --ndjson" in err


def test_an_unreadable_ndjson_line_makes_its_patient_need_review(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bundle = json.loads((ROOT / "fhir_fixtures" / "both-candidate.json").read_text())
    by_type: dict[str, list[str]] = {}
    for entry in bundle["entry"]:
        resource = entry["resource"]
        by_type.setdefault(resource["resourceType"], []).append(json.dumps(resource))
    # a procedure line cut short: which procedure it was is lost, whose it was is not
    by_type["Procedure"] = [
        '{"resourceType": "Procedure", "id": "cut", "status": "completed", '
        '"subject": {"reference": "Patient/both-candidate"}, "code": {"coding": [{"sys'
    ]
    source = tmp_path / "in"
    source.mkdir()
    for rtype, lines in by_type.items():
        (source / f"{rtype}.ndjson").write_text("\n".join(lines) + "\n")
    # a Bulk export's own log: JSON, but not FHIR resources, and not bad lines
    (source / "log.ndjson").write_text('{"exportId": "x", "eventId": "kickoff"}\n')
    caplog.set_level(logging.WARNING)
    out = tmp_path / "out"
    summary = sweep_ndjson(source, sweep_options(out))
    assert summary["input"]["unreadable_lines"] == 1
    assert summary["input"]["non_resource_lines"] == 1
    assert any(f"{source / 'Procedure.ndjson'} line 1" in r.getMessage() for r in caplog.records)
    (line,) = sweep_lines(out)
    result = json.loads(line)
    for trial in result["trials"]:
        assert trial["status"] == "needs-review"
        history = next(c for c in trial["criteria"] if c["id"].startswith("exc-prior"))
        assert history["result"] == "unknown"
        assert "could not be read" in history["explanation"]


def test_records_are_indexed_one_way() -> None:
    record = PatientRecord.from_resources(
        [patient(), obs("x", "777-3", 200, "10*3/uL")], load_trials()
    )
    assert not hasattr(record, "_index") and not hasattr(record, "_icd_index")
    assert record.may_hold(["platelets"]) and not record.may_hold(["cirrhosis"])
    assert B in load_trials().ids
