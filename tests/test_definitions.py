"""Trial definitions and value sets: shipped files load, bad files fail naming file, criterion
and field, every seed sentence is present, and a third trial needs only a data file."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from cds.criteria import load_trial_set, load_trials
from cds.criteria.definitions import ANALYTES_FILE, LIVING_PATIENT, TRIALS_DIR, VALUESETS_DIR
from cds.errors import DefinitionError, InputError

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT.parent / "shared" / "seeds"
SEED_FILES = {"NCT04339036": "000_f61f911a9c237b25.txt", "NCT05610826": "002_f60de07f2ecf0be7.txt"}


def _copy_definitions(tmp_path: Path) -> tuple[Path, Path]:
    trials = tmp_path / "trials"
    valuesets = tmp_path / "valuesets"
    shutil.copytree(TRIALS_DIR, trials)
    shutil.copytree(VALUESETS_DIR, valuesets)
    return trials, valuesets


def test_shipped_trials_load_with_identity_and_registry_status() -> None:
    trials = load_trials()
    assert trials.ids == ("NCT04339036", "NCT05610826")
    assert trials["NCT05610826"].registry_status == "WITHDRAWN"
    for trial in trials:
        assert trial.url == f"https://clinicaltrials.gov/study/{trial.id}"
        assert re.fullmatch(r"\d+\.\d+\.\d+", trial.version)
        assert [c.kind for c in trial.criteria] == sorted(
            (c.kind for c in trial.criteria), key=["inclusion", "exclusion"].index
        ), "inclusions come before exclusions, in protocol order"


def _eligibility_text(trial_id: str) -> str:
    text = (SEEDS / SEED_FILES[trial_id]).read_text(encoding="utf-8")
    start = text.index("Inclusion Criteria:")
    end = text.find("Sites / Locations", start)
    return text[start:] if end < 0 else text[start:end]


@pytest.mark.skipif(not SEEDS.is_dir(), reason="shared/seeds is not beside this checkout")
@pytest.mark.parametrize("trial_id", ["NCT04339036", "NCT05610826"])
def test_every_seed_sentence_is_a_criterion_verbatim(trial_id: str) -> None:
    """Each criterion's text is a verbatim piece of the seed, and together the pieces cover
    every character of the eligibility section except the section headings and bullets."""
    section = _eligibility_text(trial_id)
    trial = load_trials()[trial_id]
    from_seed = [c for c in trial.criteria if c is not LIVING_PATIENT]
    pieces = {c.text for c in from_seed} | {c.context for c in from_seed if c.context}
    covered = [False] * len(section)
    for piece in pieces:
        start = section.find(piece)
        assert start >= 0, f"not verbatim in the seed: {piece!r}"
        while start >= 0:
            for i in range(start, start + len(piece)):
                covered[i] = True
            start = section.find(piece, start + 1)
    leftover = "".join(ch if not cov else " " for ch, cov in zip(section, covered, strict=True))
    leftover = re.sub(r"(Inclusion|Exclusion) Criteria:", " ", leftover)
    assert re.sub(r"[\s\-:;.]", "", leftover) == "", f"uncovered seed text: {leftover.split()}"


def test_a_third_trial_needs_only_a_data_file(tmp_path: Path) -> None:
    trials_dir, valuesets_dir = _copy_definitions(tmp_path)
    third = {
        "id": "NCT00000001",
        "title": "A hypothetical NET trial added as data",
        "short_title": "Hypothetical",
        "version": "0.1.0",
        "changelog": [{"version": "0.1.0", "date": "2026-11-21", "changes": "test"}],
        "registry": {
            "url": "https://clinicaltrials.gov/study/NCT00000001",
            "status": "NOT_YET_RECRUITING",
            "status_source": "test",
        },
        "defaults": {"lab_lookback_days": 14},
        "criteria": [
            {
                "id": "inc-net",
                "kind": "inclusion",
                "label": "NET",
                "text": "Has a NET",
                "rule": {"type": "diagnosis_present", "valuesets": ["net-diagnosis"]},
            },
            {
                "id": "exc-hb",
                "kind": "exclusion",
                "label": "Hb < 9",
                "text": "Hb < 9 g/dL",
                "rule": {
                    "type": "lab",
                    "analyte": "hemoglobin",
                    "acceptable": {"op": ">=", "value": 9, "unit": "g/dL"},
                },
            },
        ],
    }
    (trials_dir / "NCT00000001.json").write_text(json.dumps(third))
    trials = load_trial_set(trials_dir, valuesets_dir)
    assert "NCT00000001" in trials.ids
    assert trials["NCT00000001"].lab_lookback_days == 14


def _broken(tmp_path: Path, mutate: object) -> DefinitionError:
    trials_dir, valuesets_dir = _copy_definitions(tmp_path)
    path = trials_dir / "NCT04339036.json"
    data = json.loads(path.read_text())
    mutate(data)  # type: ignore[operator]
    path.write_text(json.dumps(data))
    with pytest.raises(DefinitionError) as info:
        load_trial_set(trials_dir, valuesets_dir)
    return info.value


def test_schema_error_names_file_criterion_and_field(tmp_path: Path) -> None:
    def mutate(d: dict) -> None:
        d["criteria"][12]["rule"]["acceptable"]["op"] = "approximately"

    err = _broken(tmp_path, mutate)
    assert err.file.endswith("NCT04339036.json")
    assert err.criterion == "inc-bilirubin"
    assert err.field == "criteria[12].rule.acceptable.op"
    assert (
        "NCT04339036.json, criterion inc-bilirubin, field criteria[12].rule.acceptable.op"
        in str(err)
    )


def test_unknown_value_set_is_refused_at_load(tmp_path: Path) -> None:
    def mutate(d: dict) -> None:
        d["criteria"][0]["rule"]["valuesets"] = ["no-such-valueset"]

    err = _broken(tmp_path, mutate)
    assert err.criterion == "inc-net-diagnosis"
    assert "no-such-valueset" in str(err)
    assert err.field == "criteria[0].rule.valuesets[0]"


def test_unconvertible_threshold_unit_is_refused_at_load(tmp_path: Path) -> None:
    def mutate(d: dict) -> None:
        d["criteria"][12]["rule"]["acceptable"]["unit"] = "mmHg"

    err = _broken(tmp_path, mutate)
    assert err.criterion == "inc-bilirubin" and "mmHg" in str(err)


def test_duplicate_criterion_id_is_refused(tmp_path: Path) -> None:
    def mutate(d: dict) -> None:
        d["criteria"][1]["id"] = d["criteria"][0]["id"]

    err = _broken(tmp_path, mutate)
    assert "duplicate" in str(err) and err.criterion == "inc-net-diagnosis"


def test_malformed_valueset_names_file_and_field(tmp_path: Path) -> None:
    trials_dir, valuesets_dir = _copy_definitions(tmp_path)
    path = valuesets_dir / "platelets.json"
    data = json.loads(path.read_text())
    data["compose"]["include"][0]["concept"][0]["code"] = "777 3"
    path.write_text(json.dumps(data))
    with pytest.raises(DefinitionError) as info:
        load_trial_set(trials_dir, valuesets_dir)
    assert info.value.file.endswith("platelets.json")
    assert info.value.field == "compose.include[0].concept[0].code"


def test_valueset_filter_on_snomed_is_refused(tmp_path: Path) -> None:
    trials_dir, valuesets_dir = _copy_definitions(tmp_path)
    path = valuesets_dir / "cirrhosis.json"
    data = json.loads(path.read_text())
    data["compose"]["include"].append(
        {
            "system": "http://snomed.info/sct",
            "filter": [{"property": "concept", "op": "is-a", "value": "19943007"}],
        }
    )
    path.write_text(json.dumps(data))
    with pytest.raises(DefinitionError, match="only ICD-10-CM 'is-a' filters"):
        load_trial_set(trials_dir, valuesets_dir)


def test_not_json_definition_names_the_file(tmp_path: Path) -> None:
    trials_dir, valuesets_dir = _copy_definitions(tmp_path)
    (trials_dir / "NCT04339036.json").write_text("{ not json")
    with pytest.raises(DefinitionError, match=r"NCT04339036\.json: not valid JSON"):
        load_trial_set(trials_dir, valuesets_dir, ANALYTES_FILE)


def test_unknown_trial_id_is_an_input_error() -> None:
    with pytest.raises(InputError, match="unknown trial NCT99999999"):
        load_trials(["NCT99999999"])


def test_observation_codes_are_derived_from_the_criteria() -> None:
    codes = load_trials().codes_for("Observation")
    assert ("http://loinc.org", "777-3") in codes  # platelets
    assert ("http://loinc.org", "5902-2") in codes  # PT, for the INR exception
    assert ("http://loinc.org", "1968-7") not in codes  # direct bilirubin is not total
    only_a = load_trials(["NCT04339036"]).codes_for("Observation")
    assert ("http://loinc.org", "1558-6") not in only_a  # fasting glucose is only trial B's
    # Observations coded in SNOMED CT are searched too: a server must return what a file holds
    assert ("http://snomed.info/sct", "406094009") in codes  # mitotic count
    assert ("http://snomed.info/sct", "420913000") in codes  # NYHA class III finding
    assert ("http://snomed.info/sct", "420913000") not in only_a  # only trial B reads NYHA


def test_breaking_valuesets_come_from_history_and_washout_rules() -> None:
    a = load_trials()["NCT04339036"]
    by_id = {c.id: c for c in a.criteria}
    assert by_id["exc-prior-liver-embolization"].breaking_valuesets == {"liver-embolization"}
    assert "cytotoxic-chemotherapy" in by_id["inc-washout"].breaking_valuesets
    assert by_id["inc-bilirubin"].breaking_valuesets == frozenset()
