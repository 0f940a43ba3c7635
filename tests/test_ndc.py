"""NDC-coded drugs: the spellings accepted, the shipped map and how it joins the value sets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cds.criteria import load_trial_set, load_trials
from cds.criteria.definitions import TRIALS_DIR, VALUESETS_DIR
from cds.criteria.ndc import NDC, NDC_MAP_FILE, load_ndc_map, ndc_spellings, normalize_ndc
from cds.criteria.record import PatientRecord
from cds.criteria.valuesets import RXNORM, normalize_coding
from cds.errors import DefinitionError
from cds.hooks.orders import draft_orders, trials_at_stake
from cds.sweep.ndjson import CodePrefilter
from tests.hooks_data.support import draft_bundle


@pytest.mark.parametrize(
    ("sent", "eleven"),
    [
        ("0004-1100-20", "00004110020"),  # 4-4-2: the labeler segment is padded
        ("47335-890-80", "47335089080"),  # 5-3-2: the product segment is padded
        ("53808-0411-1", "53808041101"),  # 5-4-1: the package segment is padded
        ("00004-1100-20", "00004110020"),  # 11 digits, hyphenated 5-4-2
        ("00004110020", "00004110020"),  # 11 digits as billed
        (" 0004-1100-20 ", "00004110020"),
    ],
)
def test_accepted_spellings_normalise_to_eleven_digits(sent: str, eleven: str) -> None:
    assert normalize_ndc(sent) == eleven
    assert normalize_coding(NDC, sent) == (NDC, eleven)
    assert sent.strip() in ndc_spellings(eleven)


@pytest.mark.parametrize(
    "sent",
    [
        "0004110020",  # 10 digits without hyphens: the layout, hence the padding, is unknown
        "0004-1100",  # a product code (labeler-product) names no package
        "004-1100-20",  # 3-4-2 is no NDC layout
        "0004-1100-2O",  # letter O
        "000041100200",  # 12 digits
        "００００４１１００２０",  # 11 full-width digits
    ],
)
def test_other_spellings_are_not_guessed(sent: str) -> None:
    assert normalize_ndc(sent) is None
    # compared as sent, so they match nothing the map holds
    key = normalize_coding(NDC, sent)
    assert load_trials().valuesets_of(key) == ()


def test_the_ndc_oid_is_an_alias_of_the_fhir_system() -> None:
    assert normalize_coding("urn:oid:2.16.840.1.113883.6.69", "0004-1100-20") == (
        NDC,
        "00004110020",
    )


def test_every_mapped_ndc_joins_the_sets_of_its_rxnorm_code() -> None:
    trials = load_trials()
    entries = load_ndc_map()
    assert entries, "the shipped map is not empty"
    for entry in entries:
        holders = trials.valuesets_of((RXNORM, entry.rxnorm))
        assert holders, entry
        assert trials.valuesets_of((NDC, entry.ndc11)) == holders
        assert entry.source.strip() and entry.display.strip()


def test_the_shipped_map_names_its_source_and_each_row_its_own() -> None:
    with open(NDC_MAP_FILE, encoding="utf-8") as f:
        data = json.load(f)
    assert "source" in data and "accepted_forms" in data
    assert all(row["source"] for row in data["map"])


def test_xeloda_and_temodar_ndcs_count_as_their_ingredient() -> None:
    trials = load_trials()
    xeloda = trials.valuesets_of(normalize_coding(NDC, "0004-1100-20"))
    assert {"capecitabine", "cytotoxic-chemotherapy"} <= set(xeloda)
    assert "temozolomide" not in xeloda
    temodar = trials.valuesets_of(normalize_coding(NDC, "0085-1417-02"))
    assert {"temozolomide", "cytotoxic-chemotherapy"} <= set(temodar)
    # 5-4-1 and 5-3-2 packages of other cytotoxic agents
    assert "cytotoxic-chemotherapy" in trials.valuesets_of(normalize_coding(NDC, "60505-6132-6"))
    assert "cytotoxic-chemotherapy" in trials.valuesets_of(normalize_coding(NDC, "63323-750-10"))
    lutathera = trials.valuesets_of(normalize_coding(NDC, "69488-003-01"))
    assert lutathera == ("lutetium-lu177-dotatate",)


def _write_map(tmp_path: Path, rows: list[dict[str, str]]) -> Path:
    path = tmp_path / "ndc.json"
    path.write_text(json.dumps({"source": "test", "map": rows}), encoding="utf-8")
    return path


def _row(ndc: str, rxnorm: str = "194000") -> dict[str, str]:
    return {"ndc": ndc, "rxnorm": rxnorm, "display": "x", "source": "y"}


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([_row("00004110020")], "not a hyphenated package NDC"),
        ([_row("0004-1100")], "not a hyphenated package NDC"),
        ([_row("0004-1100-20"), _row("00004-1100-20")], "listed twice"),
        ([_row("0004-1100-20", "C1794")], "not an RxCUI"),
        ([_row("0004-1100-20", "1")], "is in no value set"),
        ([{"ndc": "0004-1100-20", "rxnorm": "194000"}], "needs the strings"),
    ],
)
def test_a_bad_map_fails_naming_file_and_row(
    tmp_path: Path, rows: list[dict[str, str]], message: str
) -> None:
    path = _write_map(tmp_path, rows)
    with pytest.raises(DefinitionError) as err:
        load_trial_set(TRIALS_DIR, VALUESETS_DIR, ndc_map_file=path)
    assert message in str(err.value)
    assert str(path) in str(err.value) and "map[" in str(err.value)


def _dispense(code: str, system: str = NDC) -> dict[str, object]:
    return {
        "resourceType": "MedicationDispense",
        "id": "d1",
        "status": "completed",
        "subject": {"reference": "Patient/p"},
        "medicationCodeableConcept": {"coding": [{"system": system, "code": code}]},
        "whenHandedOver": "2026-10-15",
    }


@pytest.mark.parametrize("code", ["0004-1100-20", "00004110020", "00004-1100-20"])
def test_a_record_indexes_an_ndc_coded_dispense_under_capecitabine(code: str) -> None:
    trials = load_trials()
    record = PatientRecord.from_resources(
        [{"resourceType": "Patient", "id": "p"}, _dispense(code)], index=trials
    )
    found = record.matching(["MedicationDispense"], trials.valueset("capecitabine"))
    assert [e.ref for e in found] == ["MedicationDispense/d1"]


@pytest.mark.parametrize(
    ("rtype", "extra"),
    [
        ("MedicationRequest", {"intent": "order", "authoredOn": "2026-10-15"}),
        ("MedicationAdministration", {"effectiveDateTime": "2026-10-15"}),
        ("MedicationDispense", {"whenHandedOver": "2026-10-15"}),
        ("MedicationStatement", {"effectivePeriod": {"start": "2026-10-15"}}),
    ],
)
def test_every_medication_resource_coded_only_by_ndc_counts(
    rtype: str, extra: dict[str, object]
) -> None:
    trials = load_trials()
    resource = {
        "resourceType": rtype,
        "id": "m1",
        "status": "completed",
        "subject": {"reference": "Patient/p"},
        "medicationCodeableConcept": {"coding": [{"system": NDC, "code": "0085-1417-02"}]},
        **extra,
    }
    record = PatientRecord.from_resources(
        [{"resourceType": "Patient", "id": "p"}, resource], index=trials
    )
    found = record.matching([rtype], trials.valueset("temozolomide"))
    assert [e.ref for e in found] == [f"{rtype}/m1"]


def test_the_ndjson_prefilter_keeps_every_spelling_and_drops_unmapped_ndcs() -> None:
    prefilter = CodePrefilter(load_trials())
    for code in ("0004-1100-20", "00004110020", "00004-1100-20", "47335-890-80"):
        line = json.dumps(_dispense(code)).encode() + b"\n"
        assert prefilter(line), code
        assert prefilter.candidate_lines(line, b"MedicationDispense") == [(line, True)], code
    unmapped = json.dumps(_dispense("12345-6789-01")).encode() + b"\n"
    assert not prefilter(unmapped)


def _ndc_order(oid: str, code: str) -> dict[str, object]:
    return {
        "resourceType": "MedicationRequest",
        "id": oid,
        "status": "draft",
        "intent": "order",
        "medicationCodeableConcept": {"coding": [{"system": NDC, "code": code}]},
    }


def test_branded_and_injection_rxcuis_from_the_ema_mappings_are_in_the_drug_sets() -> None:
    trials = load_trials()
    for rxcui in ("213292", "213293"):  # Xeloda 150 mg, 500 mg
        assert {"capecitabine", "cytotoxic-chemotherapy"} <= set(
            trials.valuesets_of((RXNORM, rxcui))
        )
    # temozolomide 100 MG Injection
    assert {"temozolomide", "cytotoxic-chemotherapy"} <= set(
        trials.valuesets_of((RXNORM, "835945"))
    )


def test_ndc_and_branded_orders_put_both_trials_at_stake() -> None:
    trials = load_trials()
    for order in (
        _ndc_order("m1", "0004-1100-20"),
        _ndc_order("m2", "00004110020"),
        _ndc_order("m3", "0085-1417-02"),
        {
            "resourceType": "MedicationRequest",
            "id": "m4",
            "status": "draft",
            "intent": "order",
            "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "213293"}]},
        },
    ):
        orders = draft_orders(draft_bundle(order))
        assert trials_at_stake(trials, trials.ids, orders) == set(trials.ids), order["id"]
    unmapped = draft_orders(draft_bundle(_ndc_order("m5", "12345-6789-01")))
    assert trials_at_stake(trials, trials.ids, unmapped) == set()
