"""Issue 12: a NYHA class decides NCT05610826's heart failure exclusion, and the mitotic count is
read with the Ki-67 index for the WHO 2019 grade (each test builds the record it is about; fixed
as-of date 2026-11-01)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import A, B, criterion, obs, run

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"


def condition(
    cid: str, code: str, *, clinical: str = "active", verification: str | None = None
) -> dict[str, Any]:
    r: dict[str, Any] = {
        "resourceType": "Condition",
        "id": cid,
        "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": ICD10, "code": code}]},
        "clinicalStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                    "code": clinical,
                }
            ]
        },
        "onsetDateTime": "2023-01-01",
    }
    if verification:
        r["verificationStatus"] = {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                    "code": verification,
                }
            ]
        }
    return r


HF = condition("hf", "I50.22")
PNET = condition("net", "C25.4")


def nyha(
    oid: str,
    answer: str | None,
    when: str = "2026-09-15",
    *,
    status: str = "final",
    **extra: Any,
) -> dict[str, Any]:
    """A 'Functional capacity NYHA' (LOINC 88020-3) Observation answering ``answer``."""
    r: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "status": status,
        "code": {"coding": [{"system": LOINC, "code": "88020-3"}]},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": when,
    }
    if answer is not None:
        r["valueCodeableConcept"] = {"coding": [{"system": LOINC, "code": answer}]}
    r.update(extra)
    return r


def finding(oid: str, code: str, when: str = "2026-09-15", **extra: Any) -> dict[str, Any]:
    """An Observation coded with a SNOMED CT finding or observable itself."""
    r: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": SNOMED, "code": code}]},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": when,
    }
    r.update(extra)
    return r


def heart_failure(resources: list[dict[str, Any]]) -> Any:
    return criterion(run(resources), B, "exc-heart-failure")


# --------------------------------------------------------------------------- NYHA class


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ([HF, nyha("n", "LA28404-4")], "pass"),  # class I (LOINC answer)
        ([HF, nyha("n", "LA28405-1")], "fail"),  # class II
        ([HF, nyha("n", "LA28406-9")], "fail"),  # class III
        ([HF, nyha("n", "LA28407-7")], "fail"),  # class IV
        ([HF, finding("n", "420300004")], "pass"),  # class I (SNOMED CT finding as the code)
        ([HF, finding("n", "422293003")], "fail"),  # class IV
        (
            [
                HF,
                nyha(
                    "n",
                    None,
                    valueCodeableConcept={"coding": [{"system": SNOMED, "code": "420913000"}]},
                ),
            ],
            "fail",
        ),  # class III as a SNOMED CT value
    ],
)
def test_the_nyha_class_decides_heart_failure(record: list[dict[str, Any]], expected: str) -> None:
    result = heart_failure(record)
    assert result.result.value == expected, result.explanation
    assert "Condition/hf" in result.evidence and "Observation/n" in result.evidence
    assert "NYHA class" in result.explanation


def test_heart_failure_without_a_class_is_unknown_saying_what_would_decide_it() -> None:
    result = heart_failure([HF])
    assert result.result.value == "unknown"
    assert "no NYHA class recorded" in result.explanation
    assert "90 days before 2026-11-01" in result.explanation


def test_a_class_older_than_the_look_back_is_unknown_never_current() -> None:
    # class I on 2026-08-02 is 91 days before the as-of date; the window is 90 days
    result = heart_failure([HF, nyha("n", "LA28404-4", "2026-08-02")])
    assert result.result.value == "unknown"
    assert "older than the 90 days" in result.explanation
    assert heart_failure([HF, nyha("n", "LA28404-4", "2026-08-03")]).result.value == "pass"


def test_the_latest_class_decides_even_against_an_older_one() -> None:
    older_iii = nyha("old", "LA28406-9", "2026-09-01")
    newer_i = nyha("new", "LA28404-4", "2026-10-01")
    result = heart_failure([HF, older_iii, newer_i])
    assert result.result.value == "pass"
    assert "Observation/new" in result.evidence and "Observation/old" not in result.evidence
    # a newer class that cannot be read is unknown; the older readable one does not stand in
    unreadable = nyha("newer", None, "2026-10-20", valueString="improving")
    result = heart_failure([HF, older_iii, newer_i, unreadable])
    assert result.result.value == "unknown"
    assert "Observation/newer" in result.explanation


@pytest.mark.parametrize(
    "shape",
    [
        {"valueCodeableConcept": {"text": "NYHA II-III"}},  # words that are not one class
        {"valueString": "symptomatic on exertion"},
        {"valueCodeableConcept": {"coding": [{"system": LOINC, "code": "LA6576-8"}]}},
        {
            "valueCodeableConcept": {
                "coding": [
                    {"system": LOINC, "code": "LA28404-4"},
                    {"system": LOINC, "code": "LA28406-9"},
                ]
            }
        },  # two classes at once
        {"dataAbsentReason": {"text": "not assessed"}},
    ],
)
def test_an_unreadable_class_is_unknown(shape: dict[str, Any]) -> None:
    result = heart_failure([HF, nyha("n", None, **shape)])
    assert result.result.value == "unknown", result.explanation
    assert "a coded NYHA class would decide it" in result.explanation


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ({"valueString": "NYHA class III"}, "fail"),
        ({"valueString": "Class 2"}, "fail"),
        ({"valueString": " IV "}, "fail"),
        ({"valueString": "class1"}, "pass"),
        ({"valueCodeableConcept": {"text": "NYHA functional class I"}}, "pass"),
    ],
)
def test_a_class_written_only_in_words_is_read(shape: dict[str, Any], expected: str) -> None:
    result = heart_failure([HF, nyha("n", None, **shape)])
    assert result.result.value == expected, result.explanation
    assert "Observation/n" in result.evidence


def test_a_preliminary_class_is_unknown_and_unusable_statuses_do_not_count() -> None:
    result = heart_failure([HF, nyha("n", "LA28404-4", status="preliminary")])
    assert result.result.value == "unknown"
    assert "preliminary" in result.explanation
    for status in ("entered-in-error", "cancelled", "registered"):
        result = heart_failure([HF, nyha("n", "LA28404-4", status=status)])
        assert result.result.value == "unknown"
        assert "no NYHA class recorded" in result.explanation


def test_no_heart_failure_passes_as_before() -> None:
    assert heart_failure([]).result.value == "pass"
    assert heart_failure([nyha("n", "LA28404-4")]).result.value == "pass"
    resolved = condition("hf", "I50.22", clinical="resolved")
    result = heart_failure([resolved, nyha("n", "LA28406-9", "2025-01-01")])
    assert result.result.value == "pass"


def test_a_failing_class_without_heart_failure_coded_is_unknown() -> None:
    result = heart_failure([finding("n", "420913000")])
    assert result.result.value == "unknown"
    assert "No active Congestive heart failure coded" in result.explanation
    assert result.evidence == ("Observation/n",)


def test_provisional_heart_failure_is_unknown() -> None:
    provisional = condition("hf", "I50.22", verification="provisional")
    result = heart_failure([provisional, nyha("n", "LA28404-4")])
    assert result.result.value == "unknown"
    assert "provisional" in result.explanation


def test_the_y90_trial_keeps_heart_failure_unknown_whatever_the_class() -> None:
    """NCT04339036 leaves 'uncontrolled' to judgement: NYHA I never makes it pass."""
    for answer in ("LA28404-4", "LA28406-9"):
        result = criterion(run([HF, nyha("n", answer)]), A, "exc-intercurrent-illness")
        assert result.result.value == "unknown", result.explanation
    assert criterion(run([]), A, "exc-intercurrent-illness").result.value == "manual"


# --------------------------------------------------------------------------- mitotic count


def ki67(value: float, **kw: Any) -> dict[str, Any]:
    return obs("k", "29593-1", value, "%", "2025-11-10", **kw)


def mitoses(
    oid: str = "m", value: float | None = None, unit: str | None = None, **extra: Any
) -> dict[str, Any]:
    """A mitotic count (SNOMED CT 406094009, per 10 HPF)."""
    r = finding(oid, "406094009", extra.pop("when", "2025-11-10"), **extra)
    if value is not None:
        q: dict[str, Any] = {"value": value}
        if unit is not None:
            q["unit"] = unit
        r["valueQuantity"] = q
    return r


def grades(resources: list[dict[str, Any]]) -> tuple[str, str, str]:
    ev = run([PNET, *resources])
    return (
        criterion(ev, A, "inc-grade-2").result.value,
        criterion(ev, B, "inc-grade-1-2").result.value,
        criterion(ev, B, "exc-grade-3").result.value,
    )


@pytest.mark.parametrize(
    ("ki", "count", "expected"),
    [
        (2, 1, ("fail", "pass", "pass")),  # G1 and G1: G1, decided
        (2, 2, ("pass", "pass", "pass")),  # G1 and G2: G2
        (2, 5, ("pass", "pass", "pass")),
        (2, 20, ("pass", "pass", "pass")),
        (2, 21, ("fail", "fail", "fail")),  # mitoses > 20: G3
        (8, 1, ("pass", "pass", "pass")),  # Ki-67 G2 is the higher
        (25, 1, ("fail", "fail", "fail")),  # Ki-67 G3 is the higher
    ],
)
def test_the_higher_of_ki67_and_mitotic_count_decides(
    ki: float, count: float, expected: tuple[str, str, str]
) -> None:
    assert grades([ki67(ki), mitoses(value=count)]) == expected


def test_ki67_below_3_with_a_mitotic_count_explains_both() -> None:
    result = criterion(run([PNET, ki67(2), mitoses(value=5)]), A, "inc-grade-2")
    assert result.result.value == "pass"
    assert set(result.evidence) == {"Observation/k", "Observation/m"}
    assert "Ki-67 2 %" in result.explanation and "mitotic count 5" in result.explanation
    assert "G2" in result.explanation


@pytest.mark.parametrize(
    ("count", "expected"),
    [
        (1, ("unknown", "unknown", "unknown")),  # at least G1: the Ki-67 could be G2 or G3
        (5, ("unknown", "unknown", "unknown")),  # at least G2: the Ki-67 could be G3
        (25, ("fail", "fail", "fail")),  # G3 whatever the Ki-67
    ],
)
def test_a_mitotic_count_alone_is_a_floor(count: float, expected: tuple[str, str, str]) -> None:
    assert grades([mitoses(value=count)]) == expected
    if expected[0] == "unknown":
        result = criterion(run([PNET, mitoses(value=count)]), B, "inc-grade-1-2")
        assert "Ki-67 index" in result.explanation and "would decide" in result.explanation


@pytest.mark.parametrize(
    "value",
    [
        {"valueQuantity": {"value": 5, "unit": "/10 HPF"}},
        {"valueQuantity": {"value": 5, "unit": "per 10 HPF"}},
        {"valueQuantity": {"value": 5, "unit": "mitoses/2 mm2"}},
        {"valueQuantity": {"value": 5, "unit": "/2 mm²"}},
        {"valueQuantity": {"value": 5, "unit": "per 10 HPF", "code": "{HPF}"}},
        {
            "valueQuantity": {
                "value": 5,
                "system": "http://unitsofmeasure.org",
                "code": "/(10.[HPF])",
            }
        },
        {"valueInteger": 5},
        {"valueString": "5/10 HPF"},
        {"valueQuantity": {"value": 5}},  # the code's own denominator: per 10 HPF
    ],
)
def test_mitotic_count_shapes_and_units_are_read(value: dict[str, Any]) -> None:
    assert grades([ki67(2), mitoses(**value)])[0] == "pass"


@pytest.mark.parametrize(
    "value",
    [
        {"valueQuantity": {"value": 5, "unit": "/HPF"}},
        {"valueQuantity": {"value": 5, "unit": "/50 HPF"}},
        {"valueQuantity": {"value": 5, "unit": "/mm2"}},
        {"valueString": "frequent"},
        {"dataAbsentReason": {"text": "not assessable"}},
    ],
)
def test_an_unreadable_mitotic_count_makes_a_ki67_grade_unknown(value: dict[str, Any]) -> None:
    # Ki-67 8 % alone passes the G1/G2 trial; a count on record that cannot be read may be G3
    ev = run([PNET, ki67(8), mitoses(**value)])
    result = criterion(ev, B, "inc-grade-1-2")
    assert result.result.value == "unknown", result.explanation
    assert "Observation/m" in result.evidence
    assert "mitotic count per 10 HPF or per 2 mm²" in result.explanation
    assert criterion(run([PNET, ki67(8)]), B, "inc-grade-1-2").result.value == "pass"


def mitoses_bound(value: float, comparator: str) -> dict[str, Any]:
    return mitoses(valueQuantity={"value": value, "comparator": comparator})


def test_mitotic_count_bounds_in_the_quantity() -> None:
    assert grades([ki67(2), mitoses_bound(2, "<")]) == ("fail", "pass", "pass")
    assert grades([ki67(8), mitoses_bound(20, ">")]) == ("fail", "fail", "fail")
    assert grades([ki67(2), mitoses_bound(5, "<")])[0] == "unknown"


def test_mitotic_counts_across_a_boundary_are_unknown_naming_both() -> None:
    older = mitoses("m1", value=1, when="2024-06-01")
    newer = mitoses("m2", value=5)
    result = criterion(run([PNET, ki67(8), older, newer]), B, "exc-grade-3")
    assert result.result.value == "unknown"
    assert "Observation/m1" in result.explanation and "Observation/m2" in result.explanation


def test_a_recorded_grade_below_the_mitotic_count_is_discordant() -> None:
    recorded_g1 = obs("g", "21858-6", None, None, "2025-11-10")
    recorded_g1["valueCodeableConcept"] = {"coding": [{"system": SNOMED, "code": "54102005"}]}
    result = criterion(run([PNET, recorded_g1, mitoses(value=25)]), B, "exc-grade-3")
    assert result.result.value == "unknown"
    assert "Discordant grade" in result.explanation and "mitotic count 25" in result.explanation


def test_neuroendocrine_carcinoma_nos_against_a_low_mitotic_count_is_unknown() -> None:
    nec = condition("nec", "C7A.1")
    nec["code"] = {"coding": [{"system": SNOMED, "code": "253000007"}]}
    result = criterion(run([PNET, nec, mitoses(value=5)]), B, "exc-grade-3")
    assert result.result.value == "unknown"
    assert "without saying poorly" in result.explanation


def test_a_mitotic_count_about_another_tumour_is_set_aside() -> None:
    other = mitoses(value=25, focus=[{"reference": "Condition/colon"}])
    assert grades([ki67(8), other]) == ("pass", "pass", "pass")
