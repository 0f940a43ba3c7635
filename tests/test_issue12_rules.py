"""Issue 12's rule changes: the protocol sentences read as written, and the codings real NET
patients carry (each test builds the record it is about; fixed as-of date 2026-11-01)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import A, B, criterion, obs, run

SNOMED = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


def condition(cid: str, system: str, code: str, *, onset: str = "2025-11-03") -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": cid,
        "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": system, "code": code}]},
        "clinicalStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                    "code": "active",
                }
            ]
        },
        "onsetDateTime": onset,
    }


def med_admin(mid: str, rxcui: str, when: str) -> dict[str, Any]:
    return {
        "resourceType": "MedicationAdministration",
        "id": mid,
        "status": "completed",
        "subject": {"reference": "Patient/p1"},
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": rxcui}]},
        "effectiveDateTime": when,
    }


LIVER = condition("liver", ICD10, "C78.7")


# --------------------------------------------------------------------------- 4. labs


@pytest.mark.parametrize(
    ("analyte", "code", "value", "unit"),
    [
        ("inc-platelets", "777-3", 90, "10*3/uL"),
        ("inc-inr", "6301-6", 1.7, "{INR}"),
    ],
)
def test_transfusion_correctable_limits_are_unknown_not_fail(
    analyte: str, code: str, value: float, unit: str
) -> None:
    result = criterion(run([obs("o1", code, value, unit)]), A, analyte)
    assert result.result.value == "unknown"
    assert "the limit now" in result.explanation
    assert "transfusion" in result.explanation


def test_transfusion_correctable_limit_met_passes() -> None:
    result = criterion(run([obs("o1", "777-3", 150, "10*3/uL")]), A, "inc-platelets")
    assert result.result.value == "pass"


def test_pt_waiver_belongs_to_albumin_not_inr() -> None:
    pt_normal = obs("pt", "5902-2", 12.0, "s", high=13.5, low=11.0)
    ev = run([obs("inr", "6301-6", 1.7, "{INR}"), obs("alb", "1751-7", 2.8, "g/dL"), pt_normal])
    inr = criterion(ev, B, "exc-inr")
    assert inr.result.value == "unknown"
    assert "inconsistent" in inr.explanation
    assert criterion(ev, B, "exc-albumin").result.value == "pass"


def test_inr_above_limit_with_prolonged_pt_fails() -> None:
    pt_long = obs("pt", "5902-2", 16.0, "s", high=13.5, low=11.0)
    ev = run([obs("inr", "6301-6", 1.7, "{INR}"), pt_long])
    assert criterion(ev, B, "exc-inr").result.value == "fail"


@pytest.mark.parametrize(
    ("value", "unit", "expected"),
    [
        (4.98, "mmol/L", "fail"),  # < 5.0 mmol/L, though 4.98 x 1.61 = 8.02 g/dL
        (5.0, "mmol/L", "pass"),
        (7.9, "g/dL", "fail"),
        (8.0, "g/dL", "pass"),
        (79, "g/L", "fail"),  # a mass unit: compared with 8.0 g/dL
    ],
)
def test_hemoglobin_threshold_follows_the_result_unit(
    value: float, unit: str, expected: str
) -> None:
    result = criterion(run([obs("hb", "718-7", value, unit)]), B, "exc-hemoglobin")
    assert result.result.value == expected, result.explanation


# --------------------------------------------------------------------------- 1. NET signals


def test_no_net_signal_at_all_fails() -> None:
    ev = run([condition("htn", ICD10, "I10"), LIVER])
    assert criterion(ev, A, "inc-net-diagnosis").result.value == "fail"
    assert criterion(ev, B, "inc-pancreatic-net").result.value == "fail"


def test_ki67_without_a_coded_net_is_unknown() -> None:
    ev = run([obs("k", "29593-1", 8, "%", "2025-11-10"), LIVER])
    for trial, cid in ((A, "inc-net-diagnosis"), (B, "inc-pancreatic-net")):
        result = criterion(ev, trial, cid)
        assert result.result.value == "unknown", result.explanation
        assert "Ki-67" in result.explanation


def test_somatostatin_analogue_without_a_coded_net_is_unknown() -> None:
    ev = run([med_admin("m", "312068", "2026-10-01"), LIVER])
    assert criterion(ev, A, "inc-net-diagnosis").result.value == "unknown"


def test_benign_coded_net_is_unknown() -> None:
    ev = run([condition("d3a", ICD10, "D3A.8"), LIVER])
    result = criterion(ev, A, "inc-net-diagnosis")
    assert result.result.value == "unknown"
    assert "benign" in result.explanation


def worded(rid: str, rtype: str, text: str, **extra: Any) -> dict[str, Any]:
    """A Condition or Procedure that says what it is in words, with no standard code."""
    resource: dict[str, Any] = {
        "resourceType": rtype,
        "id": rid,
        "subject": {"reference": "Patient/p1"},
        "code": {"text": text},
        **extra,
    }
    if rtype == "Procedure":
        resource.setdefault("status", "completed")
        resource.setdefault("performedDateTime", "2024-06-11")
    else:
        resource.setdefault("onsetDateTime", "2025-11-03")
    return resource


@pytest.mark.parametrize(
    "text",
    [
        "Neuroendocrine tumour of the pancreas, G2",
        "Pancreatic NET",
        "Malignant carcinoid of ileum",
        "Islet cell carcinoma",
        "Insulinoma, malignant",
    ],
)
def test_net_named_only_in_words_is_unknown_quoting_it(text: str) -> None:
    ev = run([worded("net", "Condition", text), LIVER])
    for trial, cid in ((A, "inc-net-diagnosis"), (B, "inc-pancreatic-net")):
        result = criterion(ev, trial, cid)
        assert result.result.value == "unknown", result.explanation
        assert text in result.explanation and "named in words" in result.explanation


@pytest.mark.parametrize(
    "text",
    [
        "Family history of carcinoid tumour",
        "Rule out neuroendocrine tumor",
        "PNET (primitive neuroectodermal tumour) in childhood",
        "Hypertension",
    ],
)
def test_words_that_do_not_name_a_net_of_the_patient_leave_no_net_on_record(text: str) -> None:
    ev = run([worded("c", "Condition", text), LIVER])
    assert criterion(ev, A, "inc-net-diagnosis").result.value == "fail"


def test_a_net_named_in_words_on_a_refuted_or_resolved_condition_does_not_count() -> None:
    void = {"coding": [{"code": "refuted"}], "text": "refuted"}
    void["coding"][0]["system"] = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
    resolved = {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                "code": "resolved",
            }
        ]
    }
    ev = run(
        [
            worded("r", "Condition", "Pancreatic NET", verificationStatus=void),
            worded("s", "Condition", "Carcinoid tumour", clinicalStatus=resolved),
            LIVER,
        ]
    )
    assert criterion(ev, A, "inc-net-diagnosis").result.value == "fail"


def test_a_coded_net_decides_before_any_words() -> None:
    ev = run([condition("net", ICD10, "C7A.8"), worded("w", "Condition", "carcinoid"), LIVER])
    assert criterion(ev, A, "inc-net-diagnosis").result.value == "pass"


def test_a_local_code_with_net_display_counts_as_words() -> None:
    """An EHR's own code (not one the criteria read) whose display names a NET."""
    local = condition("loc", "urn:oid:2.999.1", "PL-4411")
    local["code"]["coding"][0]["display"] = "Neuroendocrine carcinoma, pancreas"
    result = criterion(run([local, LIVER]), A, "inc-net-diagnosis")
    assert result.result.value == "unknown", result.explanation


def test_liver_metastases_named_only_in_words_are_unknown() -> None:
    ev = run([condition("net", ICD10, "C7A.8"), worded("m", "Condition", "Liver metastases")])
    result = criterion(ev, A, "inc-liver-metastases")
    assert result.result.value == "unknown", result.explanation
    ev = run([condition("net", ICD10, "C7A.8"), worded("m", "Condition", "NET without liver mets")])
    assert criterion(ev, A, "inc-liver-metastases").result.value == "fail"


@pytest.mark.parametrize(
    "text", ["TACE right lobe", "Y90 radioembolization", "Hepatic artery embolization", "SIRT"]
)
def test_liver_embolization_named_only_in_words_is_unknown(text: str) -> None:
    ev = run([worded("p", "Procedure", text)])
    for trial, cid in (
        (A, "exc-prior-liver-embolization"),
        (B, "exc-prior-liver-directed-therapy"),
    ):
        result = criterion(ev, trial, cid)
        assert result.result.value == "unknown", result.explanation
        assert text in result.explanation


def test_embolization_words_on_a_procedure_not_done_do_not_count() -> None:
    ev = run([worded("p", "Procedure", "TACE", status="not-done")])
    assert criterion(ev, A, "exc-prior-liver-embolization").result.value == "pass"


def test_a_trial_naming_an_unknown_text_signal_is_refused(tmp_path: Any) -> None:
    import json
    import shutil

    from cds.criteria.definitions import TRIALS_DIR, VALUESETS_DIR, load_trial_set
    from cds.errors import DefinitionError

    shutil.copytree(TRIALS_DIR, tmp_path / "trials")
    path = tmp_path / "trials" / "NCT04339036.json"
    data = json.loads(path.read_text())
    for item in data["criteria"]:
        if item["id"] == "inc-net-diagnosis":
            item["rule"]["signal_text"] = ["no-such-signal"]
    path.write_text(json.dumps(data))
    with pytest.raises(DefinitionError) as err:
        load_trial_set(tmp_path / "trials", VALUESETS_DIR)
    assert "no-such-signal" in str(err.value) and "signal_text" in str(err.value)


def test_a_text_signal_file_with_a_bad_pattern_is_refused(tmp_path: Any) -> None:
    import json

    from cds.criteria.texts import load_text_signals
    from cds.errors import DefinitionError

    bad = tmp_path / "signals.json"
    bad.write_text(
        json.dumps(
            {
                "version": "1",
                "signals": [{"id": "x", "title": "x", "types": ["Condition"], "words": ["("]}],
            }
        )
    )
    with pytest.raises(DefinitionError) as err:
        load_text_signals(bad)
    assert "signals[0]" in str(err.value)


def test_net_code_with_a_pancreas_site_code_is_a_pancreatic_net() -> None:
    ev = run([condition("net", ICD10, "C7A.8"), condition("site", ICD10, "C25.0"), LIVER])
    assert criterion(ev, B, "inc-pancreatic-net").result.value == "pass"


def test_net_of_unknown_primary_is_unknown_for_the_pancreatic_trial() -> None:
    ev = run([condition("net", ICD10, "C7A.00"), LIVER])
    assert criterion(ev, A, "inc-net-diagnosis").result.value == "pass"
    result = criterion(ev, B, "inc-pancreatic-net")
    assert result.result.value == "unknown"
    assert "pancreatic primary" in result.explanation


def test_net_of_another_known_site_still_fails_the_pancreatic_trial() -> None:
    ev = run([condition("net", ICD10, "C7A.012"), LIVER])
    assert criterion(ev, B, "inc-pancreatic-net").result.value == "fail"


@pytest.mark.parametrize("code", ["C7B.00", "C7B.8", "C7B.09"])
def test_secondary_net_of_unstated_site_is_unknown_for_liver_metastases(code: str) -> None:
    ev = run([condition("net", ICD10, "C7A.012"), condition("sec", ICD10, code)])
    result = criterion(ev, A, "inc-liver-metastases")
    assert result.result.value == "unknown"
    assert "liver" in result.explanation


# --------------------------------------------------------------------------- 3. washouts


def test_other_antineoplastic_makes_the_washout_unknown_naming_the_drug() -> None:
    ev = run([med_admin("m", "845507", "2026-10-22")])  # everolimus 10 MG Oral Tablet
    for trial, cid in ((A, "inc-washout"), (B, "inc-chemotherapy-washout")):
        result = criterion(ev, trial, cid)
        assert result.result.value == "unknown", result.explanation
        assert "everolimus" in result.explanation


def test_other_antineoplastic_long_ago_does_not_matter() -> None:
    ev = run([med_admin("m", "845507", "2025-01-10")])
    assert criterion(ev, A, "inc-washout").result.value == "pass"


def test_somatostatin_analogue_never_counts_in_a_washout() -> None:
    ev = run([med_admin("m", "312068", "2026-10-30")])
    assert criterion(ev, B, "inc-chemotherapy-washout").result.value == "pass"


# --------------------------------------------------------------------------- 2. grade


def test_ki67_below_3_alone_is_unknown_for_the_grade_2_trial() -> None:
    ev = run([condition("net", ICD10, "C25.4"), obs("k", "29593-1", 2, "%", "2025-11-10")])
    result = criterion(ev, A, "inc-grade-2")
    assert result.result.value == "unknown", result.explanation
    assert "mitotic count" in result.explanation
    assert criterion(ev, B, "inc-grade-1-2").result.value == "pass"


# --------------------------------------------------------------------------- 3. exposure dates


def capecitabine_request(**extra: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "resourceType": "MedicationRequest",
        "id": "rx",
        "status": "completed",
        "intent": "order",
        "subject": {"reference": "Patient/p1"},
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "200328"}]},
        "authoredOn": "2026-09-20",  # 42 days before the as-of date
    }
    r.update(extra)
    return r


def test_order_date_alone_is_the_exposure_date() -> None:
    ev = run([capecitabine_request()])
    assert criterion(ev, A, "inc-washout").result.value == "pass"


def test_expected_supply_duration_extends_exposure_past_the_order_date() -> None:
    supply = {"expectedSupplyDuration": {"value": 21, "unit": "days", "code": "d"}}
    result = criterion(run([capecitabine_request(dispenseRequest=supply)]), A, "inc-washout")
    assert result.result.value == "fail", result.explanation
    assert "2026-10-10" in result.explanation  # 21 days from 2026-09-20, inclusive


def test_bounds_period_end_is_the_last_dose() -> None:
    dosage = [
        {"timing": {"repeat": {"boundsPeriod": {"start": "2026-09-20", "end": "2026-10-15"}}}}
    ]
    result = criterion(run([capecitabine_request(dosageInstruction=dosage)]), A, "inc-washout")
    assert result.result.value == "fail"
    assert "2026-10-15" in result.explanation


def test_active_request_whose_dosing_ended_is_not_ongoing() -> None:
    dosage = [
        {"timing": {"repeat": {"boundsPeriod": {"start": "2026-08-01", "end": "2026-08-21"}}}}
    ]
    request = capecitabine_request(
        status="active", authoredOn="2026-08-01", dosageInstruction=dosage
    )
    assert criterion(run([request]), A, "inc-washout").result.value == "pass"


def test_dispense_date_plus_days_supply() -> None:
    dispense = {
        "resourceType": "MedicationDispense",
        "id": "d1",
        "status": "completed",
        "subject": {"reference": "Patient/p1"},
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "200328"}]},
        "whenHandedOver": "2026-09-25",
        "daysSupply": {"value": 14, "unit": "day", "code": "d"},
    }
    result = criterion(run([dispense]), A, "inc-washout")
    assert result.result.value == "fail", result.explanation
    assert "2026-10-08" in result.explanation


def grade_obs(oid: str, **value: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "21858-6"}]},
        "effectiveDateTime": "2025-11-10",
        **value,
    }


PNET = condition("net", ICD10, "C25.4")


@pytest.mark.parametrize(
    "value",
    [
        {"valueString": "Grade 2"},
        {"valueString": "NET, G2 (WHO 2019)"},
        {"valueCodeableConcept": {"text": "grade II"}},
        {"valueCodeableConcept": {"coding": [{"system": SNOMED, "code": "1286893008"}]}},
    ],
)
def test_grade_as_text_or_mcode_value_is_read(value: dict[str, Any]) -> None:
    ev = run([PNET, grade_obs("g", **value)])
    result = criterion(ev, A, "inc-grade-2")
    assert result.result.value == "pass", result.explanation


def test_text_naming_two_grades_is_not_read() -> None:
    ev = run([PNET, grade_obs("g", valueString="G1 or G2")])
    assert criterion(ev, A, "inc-grade-2").result.value == "unknown"


@pytest.mark.parametrize(
    ("comparator", "value", "a", "b"),
    [
        (">", 20, "fail", "fail"),  # > 20 %: G3
        ("<", 2, "unknown", "pass"),  # < 2 %: below 3 %, G1 (a mitotic count could make G2)
        ("<", 10, "unknown", "unknown"),  # G1 or G2: not decided
    ],
)
def test_ki67_bounds_decide_when_they_can(comparator: str, value: float, a: str, b: str) -> None:
    ki67 = obs("k", "29593-1", value, "%", "2025-11-10", comparator=comparator)
    ev = run([PNET, ki67])
    assert criterion(ev, A, "inc-grade-2").result.value == a
    assert criterion(ev, B, "inc-grade-1-2").result.value == b


def test_ki67_results_across_a_boundary_are_unknown_naming_both() -> None:
    older = obs("k1", "29593-1", 8, "%", "2025-06-01")
    newer = obs("k2", "29593-1", 25, "%", "2025-11-10")
    result = criterion(run([PNET, older, newer]), B, "exc-grade-3")
    assert result.result.value == "unknown"
    assert "Observation/k1" in result.explanation and "Observation/k2" in result.explanation


def test_neuroendocrine_carcinoma_nos_against_a_low_ki67_is_unknown() -> None:
    nec = condition("nec", SNOMED, "253000007")
    ev = run([PNET, nec, obs("k", "29593-1", 8, "%", "2025-11-10")])
    for trial, cid in ((A, "inc-grade-2"), (B, "exc-grade-3")):
        result = criterion(ev, trial, cid)
        assert result.result.value == "unknown", result.explanation
        assert "without saying poorly" in result.explanation


def test_explicitly_poorly_differentiated_stays_grade_3() -> None:
    poorly = condition("pd", SNOMED, "123631000119103")
    ev = run([PNET, poorly, obs("k", "29593-1", 8, "%", "2025-11-10")])
    assert criterion(ev, B, "exc-grade-3").result.value == "fail"


# --------------------------------------------------------------------------- biliary


def pcs(pid: str, code: str, when: str) -> dict[str, Any]:
    return {
        "resourceType": "Procedure",
        "id": pid,
        "status": "completed",
        "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": "http://www.cms.gov/Medicare/Coding/ICD10", "code": code}]},
        "performedDateTime": when,
    }


def test_whipple_coded_as_its_parts_is_a_biliary_enteric_anastomosis() -> None:
    ev = run([pcs("a", "0FBG0ZZ", "2024-03-05"), pcs("b", "0DT90ZZ", "2024-03-05")])
    result = criterion(ev, A, "exc-biliary-intervention")
    assert result.result.value == "fail"
    assert set(result.evidence) == {"Procedure/a", "Procedure/b"}
    assert "Whipple" in result.explanation


def test_whipple_parts_on_different_days_do_not_count() -> None:
    ev = run([pcs("a", "0FBG0ZZ", "2024-03-05"), pcs("b", "0DT90ZZ", "2025-01-10")])
    assert criterion(ev, A, "exc-biliary-intervention").result.value == "pass"


def test_percutaneous_biliary_stent_is_unknown() -> None:
    stent = {
        "resourceType": "Procedure",
        "id": "s",
        "status": "completed",
        "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "47538"}]},
        "performedDateTime": "2025-09-02",
    }
    result = criterion(run([stent]), A, "exc-biliary-intervention")
    assert result.result.value == "unknown"
    assert "transpapillary" in result.explanation


# --------------------------------------------------------------------------- 5. allergies


def allergy(aid: str, system: str, code: str, **extra: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "resourceType": "AllergyIntolerance",
        "id": aid,
        "patient": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": system, "code": code}]},
        "clinicalStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
                    "code": "active",
                }
            ]
        },
        "recordedDate": "2024-05-01",
    }
    r.update(extra)
    return r


CONTRAINDICATION = "exc-capecitabine-temozolomide-contraindication"


@pytest.mark.parametrize("rxcui", ["194000", "4492", "37776"])  # capecitabine, 5-FU, TMZ
def test_allergy_to_a_captem_drug_is_unknown_naming_it(rxcui: str) -> None:
    result = criterion(run([allergy("al", RXNORM, rxcui)]), A, CONTRAINDICATION)
    assert result.result.value == "unknown", result.explanation
    assert "AllergyIntolerance/al" in result.evidence


def test_no_allergy_on_record_stays_manual_never_pass() -> None:
    ev = run([])
    assert criterion(ev, A, CONTRAINDICATION).result.value == "manual"
    assert criterion(ev, A, "exc-iodinated-contrast").result.value == "manual"


def test_refuted_or_resolved_allergy_does_not_count() -> None:
    refuted = allergy(
        "al",
        RXNORM,
        "4492",
        verificationStatus={
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification",
                    "code": "refuted",
                }
            ]
        },
    )
    assert criterion(run([refuted]), A, CONTRAINDICATION).result.value == "manual"
    resolved = allergy(
        "al2",
        RXNORM,
        "4492",
        clinicalStatus={
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
                    "code": "resolved",
                }
            ]
        },
    )
    assert criterion(run([resolved]), A, CONTRAINDICATION).result.value == "manual"


def test_iodinated_contrast_allergy_is_unknown() -> None:
    ev = run([allergy("al", SNOMED, "426722004")])
    result = criterion(ev, A, "exc-iodinated-contrast")
    assert result.result.value == "unknown"
    assert "pre-medication" in result.explanation


def test_radiotherapy_on_record_makes_the_marrow_item_unknown_silence_manual() -> None:
    ebrt = {
        "resourceType": "Procedure",
        "id": "rt",
        "status": "completed",
        "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "77385"}]},
        "performedDateTime": "2024-02-01",
    }
    result = criterion(run([ebrt]), B, "exc-bone-marrow-radiation")
    assert result.result.value == "unknown"
    assert "25%" in result.explanation
    assert criterion(run([]), B, "exc-bone-marrow-radiation").result.value == "manual"


def test_ordering_radiotherapy_does_not_warn_for_a_criterion_it_cannot_fail() -> None:
    from cds.criteria import load_trials

    marrow = next(c for c in load_trials()[B].criteria if c.id == "exc-bone-marrow-radiation")
    assert marrow.breaking_valuesets == frozenset()
    washout = next(c for c in load_trials()[A].criteria if c.id == "inc-washout")
    assert {"radiotherapy", "chemotherapy-administration"} <= washout.breaking_valuesets
    assert "other-antineoplastics" not in washout.breaking_valuesets


def test_a_ki67_bound_that_spans_a_boundary_says_so() -> None:
    ki67 = obs("k", "29593-1", 10, "%", "2025-11-10", comparator="<")
    result = criterion(run([PNET, ki67]), B, "inc-grade-1-2")
    assert result.result.value == "unknown"
    assert "between G1 and G2" in result.explanation


# ------------------------------------------------------ 1. sites and ICD-O-3 morphologies

ICDO3 = "http://terminology.hl7.org/CodeSystem/icd-o-3"
MCODE_MORPHOLOGY = (
    "http://hl7.org/fhir/us/mcode/StructureDefinition/mcode-histology-morphology-behavior"
)


def at_site(resource: dict[str, Any], system: str, code: str) -> dict[str, Any]:
    resource["bodySite"] = [{"coding": [{"system": system, "code": code}]}]
    return resource


def mcode_primary(cid: str, morphology: str, site: tuple[str, str] | None) -> dict[str, Any]:
    """An mCODE PrimaryCancerCondition coded by SNOMED CT 'malignant neoplastic disease'
    (363346000, VSAC All Primary and Secondary Cancer) with the ICD-O-3 morphology in its
    extension and the site in bodySite."""
    resource = condition(cid, SNOMED, "363346000")
    resource["extension"] = [
        {
            "url": MCODE_MORPHOLOGY,
            "valueCodeableConcept": {"coding": [{"system": ICDO3, "code": morphology}]},
        }
    ]
    return at_site(resource, *site) if site else resource


@pytest.mark.parametrize(
    "site", [(ICDO3, "C25.0"), (ICDO3, "C25.4"), (SNOMED, "15776009"), (SNOMED, "73239005")]
)
def test_mcode_net_morphology_with_a_pancreas_body_site_is_a_pancreatic_net(
    site: tuple[str, str],
) -> None:
    result = criterion(run([mcode_primary("p", "8240/3", site), LIVER]), B, "inc-pancreatic-net")
    assert result.result.value == "pass", result.explanation
    assert site[1] in result.explanation


def test_a_net_whose_body_site_is_elsewhere_is_not_a_pancreatic_net() -> None:
    ev = run([mcode_primary("p", "8240/3", (ICDO3, "C22.0")), LIVER])
    assert criterion(ev, B, "inc-pancreatic-net").result.value == "unknown"  # confirm primary
    assert criterion(ev, A, "inc-net-diagnosis").result.value == "pass"


@pytest.mark.parametrize("morphology", ["8241/3", "8242/3", "8153/3", "8155/3", "8156/3"])
def test_added_net_morphologies_are_a_net_of_unstated_primary(morphology: str) -> None:
    ev = run([mcode_primary("p", morphology, None), LIVER])
    assert criterion(ev, A, "inc-net-diagnosis").result.value == "pass"
    assert criterion(ev, B, "inc-pancreatic-net").result.value == "unknown"


@pytest.mark.parametrize("morphology", ["8151/3", "8152/3"])
def test_insulinoma_and_glucagonoma_morphologies_are_pancreatic(morphology: str) -> None:
    ev = run([mcode_primary("p", morphology, None), LIVER])
    assert criterion(ev, B, "inc-pancreatic-net").result.value == "pass"


@pytest.mark.parametrize("morphology", ["8243/3", "8244/3", "8245/3", "8247/3", "8154/3"])
def test_mixed_goblet_or_merkel_morphology_is_a_signal_never_a_net_or_no_net(
    morphology: str,
) -> None:
    ev = run([mcode_primary("p", morphology, None), LIVER])
    for trial, cid in ((A, "inc-net-diagnosis"), (B, "inc-pancreatic-net")):
        result = criterion(ev, trial, cid)
        assert result.result.value == "unknown", result.explanation
        assert morphology in result.explanation or "not a well-differentiated" in (
            result.explanation
        )


@pytest.mark.parametrize(
    ("code", "system", "site"),
    [
        ("128462008", SNOMED, (SNOMED, "10200004")),
        ("C79.9", ICD10, (ICDO3, "C22.0")),
        ("C7B.00", ICD10, (SNOMED, "10200004")),
    ],
)
def test_metastatic_disease_with_a_liver_body_site_is_liver_metastases(
    code: str, system: str, site: tuple[str, str]
) -> None:
    mets = at_site(condition("m", system, code), *site)
    result = criterion(run([condition("n", ICD10, "C7A.8"), mets]), A, "inc-liver-metastases")
    assert result.result.value == "pass", result.explanation


def test_metastatic_disease_without_a_site_is_unknown_for_liver_metastases() -> None:
    ev = run([condition("n", ICD10, "C7A.8"), condition("m", SNOMED, "128462008")])
    result = criterion(ev, A, "inc-liver-metastases")
    assert result.result.value == "unknown", result.explanation
    assert "confirm whether the metastases involve the liver" in result.explanation


def test_a_primary_net_with_a_liver_body_site_is_not_liver_metastases() -> None:
    """A primary tumour in the liver is not a metastasis to it."""
    ev = run([at_site(condition("n", ICD10, "C7A.8"), SNOMED, "10200004")])
    assert criterion(ev, A, "inc-liver-metastases").result.value == "fail"


def procedure(pid: str, system: str, code: str, when: str = "2024-06-11") -> dict[str, Any]:
    return {
        "resourceType": "Procedure",
        "id": pid,
        "status": "completed",
        "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": system, "code": code}]},
        "performedDateTime": when,
    }


CPT = "http://www.ama-assn.org/go/cpt"


def test_embolization_of_unstated_target_on_the_liver_is_hepatic() -> None:
    emb = at_site(procedure("e", CPT, "37243"), SNOMED, "10200004")
    for trial, cid in (
        (A, "exc-prior-liver-embolization"),
        (B, "exc-prior-liver-directed-therapy"),
    ):
        result = criterion(run([emb]), trial, cid)
        assert result.result.value == "fail", result.explanation
        assert "10200004" in result.explanation


def test_embolization_of_unstated_target_elsewhere_stays_unknown() -> None:
    emb = at_site(procedure("e", CPT, "37243"), SNOMED, "15776009")
    result = criterion(run([emb]), A, "exc-prior-liver-embolization")
    assert result.result.value == "unknown", result.explanation


# ------------------------------------------------------ 5. DPD deficiency (CapTem)


@pytest.mark.parametrize(
    "resource",
    [
        condition("dpd", SNOMED, "77365006"),
        worded("dpd", "Condition", "DPYD c.1905+1G>A heterozygous (DPD deficiency)"),
    ],
)
def test_dpd_deficiency_makes_the_captem_contraindication_unknown(resource: dict[str, Any]) -> None:
    result = criterion(run([resource]), A, "exc-capecitabine-temozolomide-contraindication")
    assert result.result.value == "unknown", result.explanation
    assert "Condition/dpd" in result.evidence


@pytest.mark.parametrize(
    "text", ["DPYD genotype: wild type", "Family history of DPD deficiency", "Hypertension"]
)
def test_words_that_do_not_say_the_patient_is_dpd_deficient_leave_it_manual(text: str) -> None:
    result = criterion(
        run([worded("c", "Condition", text)]), A, "exc-capecitabine-temozolomide-contraindication"
    )
    assert result.result.value == "manual", result.explanation


# ------------------------------------------------------ 5. enrolment in another study


def research_subject(rid: str, status: str, **extra: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "ResearchSubject",
        "id": rid,
        "status": status,
        "study": {"reference": "ResearchStudy/s9", "display": "Study nine"},
        "individual": {"reference": "Patient/p1"},
        "period": {"start": "2026-09-01"},
    }
    resource.update(extra)
    return resource


@pytest.mark.parametrize(
    "status", ["on-study", "on-study-intervention", "on-study-observation", "pending-on-study"]
)
def test_on_another_study_is_unknown_naming_it(status: str) -> None:
    result = criterion(run([research_subject("rs", status)]), A, "exc-investigational-agents")
    assert result.result.value == "unknown", result.explanation
    assert "Study nine" in result.explanation and "ResearchSubject/rs" in result.evidence


@pytest.mark.parametrize(
    "subject",
    [
        research_subject("rs", "candidate"),
        research_subject("rs", "off-study"),
        research_subject("rs", "withdrawn"),
        research_subject("rs", "on-study", period={"start": "2025-01-01", "end": "2025-06-30"}),
        research_subject("rs", "on-study", period={"start": "2026-12-01"}),  # after the as-of
        # another patient's (a server that cannot search ResearchSubject by patient)
        research_subject("rs", "on-study", individual={"reference": "Patient/someone-else"}),
        # this trial itself: by the write-back's key, or named in the study reference
        research_subject(
            "rs",
            "on-study",
            identifier=[{"system": "urn:x", "value": "NCT04339036:p1"}],
        ),
        research_subject("rs", "on-study", study={"display": "NCT04339036 CapTem + Y90"}),
    ],
)
def test_enrolments_that_are_not_another_current_study_leave_it_manual(
    subject: dict[str, Any],
) -> None:
    result = criterion(run([subject]), A, "exc-investigational-agents")
    assert result.result.value == "manual", result.explanation


# ------------------------------------------------------ 2. ICD-O-3 8249/3 as a grade


def net_8249(cid: str = "m") -> dict[str, Any]:
    return mcode_primary(cid, "8249/3", (SNOMED, "15776009"))


def test_8249_alone_does_not_settle_a_grade_2_or_1_2_trial() -> None:
    ev = run([net_8249(), LIVER])
    for trial, cid in ((A, "inc-grade-2"), (B, "inc-grade-1-2")):
        result = criterion(ev, trial, cid)
        assert result.result.value == "unknown", result.explanation
        assert "8249/3" in result.explanation and "Condition/m" in result.evidence


def test_8249_with_a_g2_ki67_is_g2() -> None:
    ev = run([net_8249(), LIVER, obs("k", "29593-1", 8, "%", "2025-11-10")])
    assert criterion(ev, A, "inc-grade-2").result.value == "pass"
    assert criterion(ev, B, "inc-grade-1-2").result.value == "pass"


def test_8249_against_a_g1_from_the_indices_is_discordant() -> None:
    mitoses = {
        "resourceType": "Observation",
        "id": "mc",
        "status": "final",
        "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": SNOMED, "code": "406094009"}]},
        "effectiveDateTime": "2025-11-10",
        "valueQuantity": {"value": 1},
    }
    ev = run([net_8249(), LIVER, obs("k", "29593-1", 1, "%", "2025-11-10"), mitoses])
    result = criterion(ev, B, "inc-grade-1-2")
    assert result.result.value == "unknown", result.explanation
    assert "Discordant" in result.explanation and "8249/3" in result.explanation


@pytest.mark.parametrize(("allowed", "expected"), [([2, 3], "pass"), ([1], "fail")])
def test_8249_decides_when_g2_and_g3_are_on_the_same_side(
    allowed: list[int], expected: str
) -> None:
    from cds.criteria import load_trials
    from cds.criteria.reads import RULE_KINDS
    from cds.criteria.record import PatientRecord
    from cds.criteria.rules import Context
    from tests.helpers import AS_OF, patient

    trials = load_trials()
    record = PatientRecord.from_resources([patient(), net_8249(), LIVER], trials)
    ctx = Context(record=record, trials=trials, trial=trials[A], as_of=AS_OF)
    outcome = RULE_KINDS["grade"].func({"type": "grade", "allowed": allowed}, ctx)
    assert outcome.result.value == expected, outcome.explanation


def test_this_trial_named_by_its_study_reference_is_not_another_study() -> None:
    subject = research_subject("rs", "on-study", study={"reference": "ResearchStudy/NCT04339036"})
    assert criterion(run([subject]), A, "exc-investigational-agents").result.value == "manual"


def test_an_unreadable_enrolment_record_is_unknown_never_silence() -> None:
    subject = research_subject("rs", "on-study", study="not a reference")
    result = criterion(run([subject]), A, "exc-investigational-agents")
    assert result.result.value == "unknown", result.explanation
    assert "could not be read" in result.explanation


def test_another_patients_resources_never_enter_a_record() -> None:
    """Whatever brought them (a server ignoring a search's patient parameter, a prefetch):
    resources naming another patient are set aside, with a warning."""
    theirs = condition("net", ICD10, "C7A.8")
    theirs["subject"] = {"reference": "https://ehr.example/fhir/Patient/someone-else/_history/2"}
    ev = run([theirs, LIVER])
    assert criterion(ev, A, "inc-net-diagnosis").result.value == "fail"
    assert any("Condition/net skipped: it names another patient" in w for w in ev.warnings)
