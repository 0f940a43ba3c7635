"""Integration tests of the FHIR client, queries and loader against a real FHIR server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cds import cli
from cds.criteria.reads import CLINICAL_TYPES
from cds.errors import FhirNotFound
from cds.fhir.client import FhirClient
from cds.fhir.loader import FixtureLoadError, load_bundle_file, load_fixtures
from cds.fhir.queries import build_patient_queries, fetch_patient_resources
from tests.plugins.fhir_server import FhirTestServer

pytestmark = pytest.mark.integration

LOINC = "http://loinc.org"
CHROMOGRANIN_A = "9811-1"
CREATININE = "2160-0"
HEMOGLOBIN = "718-7"
NOT_READ = "8302-2"  # body height: no trial criterion reads it


class StandInTrials:
    """Stands in for cds.criteria's TrialSet: only codes_for() and types_read() are used."""

    def __init__(self, codes: dict[str, set[tuple[str, str]]]) -> None:
        self._codes = {k: frozenset(v) for k, v in codes.items()}

    def types_read(self) -> tuple[str, ...]:
        return CLINICAL_TYPES

    def codes_for(self, resource_type: str) -> frozenset[tuple[str, str]]:
        return self._codes.get(resource_type, frozenset())


TRIALS = StandInTrials(
    {"Observation": {(LOINC, CHROMOGRANIN_A), (LOINC, CREATININE), (LOINC, HEMOGLOBIN)}}
)


def observation(oid: str, patient_ref: str, code: str, value: float) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": patient_ref},
        "effectiveDateTime": "2026-01-15",
        "valueQuantity": {"value": value, "unit": "ng/mL"},
    }


def write_bundle(directory: Path, name: str, entries: list[dict[str, Any]], kind: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(json.dumps({"resourceType": "Bundle", "type": kind, "entry": entries}))
    return path


@pytest.fixture
def client(fhir_server: FhirTestServer) -> Iterator[FhirClient]:
    with fhir_server.client() as c:
        yield c


@pytest.fixture(scope="module")
def paging_patient(fhir_server: FhirTestServer, tmp_path_factory: pytest.TempPathFactory) -> str:
    """One patient with 25 chromogranin A Observations, a hemoglobin, a height and a condition,
    loaded from a collection bundle whose references are urn:uuid fullUrls."""
    pid = f"{fhir_server.id_prefix}paging-1"
    patient_urn = "urn:uuid:7a0c2b1e-52a4-4f3f-9d61-2f6c3f0a0001"
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": patient_urn,
            "resource": {
                "resourceType": "Patient",
                "id": pid,
                "gender": "female",
                "birthDate": "1961-04-02",
            },
        },
    ]
    for n in range(25):
        oid = f"{pid}-cga-{n:02d}"
        entries.append(
            {
                "fullUrl": f"urn:uuid:00000000-0000-4000-8000-{n:012d}",
                "resource": observation(oid, patient_urn, CHROMOGRANIN_A, 100 + n),
            }
        )
    entries += [
        {"resource": observation(f"{pid}-hgb", patient_urn, HEMOGLOBIN, 12.5)},
        {"resource": observation(f"{pid}-height", patient_urn, NOT_READ, 170)},
        {
            "resource": {
                "resourceType": "Condition",
                "id": f"{pid}-net",
                "subject": {"reference": patient_urn},
                "code": {"text": "Neuroendocrine tumour of pancreas"},
            }
        },
    ]
    path = write_bundle(tmp_path_factory.mktemp("paging"), "paging.json", entries, "collection")
    with fhir_server.client() as c:
        load_bundle_file(c, path, tag=fhir_server.tag)
    return pid


def test_paging_follows_next_links_and_returns_every_observation_once(
    client: FhirClient, paging_patient: str
) -> None:
    result = client.search(
        "Observation",
        [("patient", paging_patient), ("code", f"{LOINC}|{CHROMOGRANIN_A}"), ("_count", "5")],
    )
    ids = [r["id"] for r in result.resources]
    assert sorted(ids) == sorted(f"{paging_patient}-cga-{n:02d}" for n in range(25))
    assert len(ids) == len(set(ids)) == 25
    assert result.pages >= 5
    assert result.outcomes == []


def test_urn_uuid_references_were_rewritten_to_type_id(
    client: FhirClient, paging_patient: str
) -> None:
    obs = client.read("Observation", f"{paging_patient}-hgb")
    assert obs["subject"]["reference"] == f"Patient/{paging_patient}"


def test_fetch_uses_the_trials_codes_and_skips_observations_no_criterion_reads(
    client: FhirClient, paging_patient: str, fhir_server: FhirTestServer
) -> None:
    result = fetch_patient_resources(client, paging_patient, TRIALS, tag=fhir_server.tag)
    by_type: dict[str, list[str]] = {}
    for resource in result.resources:
        by_type.setdefault(resource["resourceType"], []).append(resource["id"])
    assert by_type["Patient"] == [paging_patient]
    assert by_type["Condition"] == [f"{paging_patient}-net"]
    assert len(by_type["Observation"]) == 26  # 25 chromogranin A + hemoglobin, no height
    assert f"{paging_patient}-height" not in by_type["Observation"]
    assert [q.key for q in result.queries] == [q.key for q in build_patient_queries(TRIALS)]
    assert all(q.seconds > 0 for q in result.queries)


def test_chunked_code_queries_give_the_same_resources_once(
    client: FhirClient, paging_patient: str
) -> None:
    one_chunk = fetch_patient_resources(client, paging_patient, TRIALS)
    # A URL limit this small puts each code in its own Observation query.
    small = build_patient_queries(TRIALS, max_url_length=226, base_url_allowance=100)
    assert sum(q.resource_type == "Observation" for q in small) == 3
    chunked = fetch_patient_resources(client, paging_patient, TRIALS, queries=small)
    assert sorted(r["id"] for r in chunked.resources) == sorted(
        r["id"] for r in one_chunk.resources
    )


def test_sequential_and_concurrent_fetches_agree(client: FhirClient, paging_patient: str) -> None:
    sequential = fetch_patient_resources(client, paging_patient, TRIALS, concurrency=1)
    concurrent = fetch_patient_resources(client, paging_patient, TRIALS, concurrency=6)
    assert sequential.concurrency == 1 and concurrent.concurrency > 1
    assert [r["id"] for r in sequential.resources] == [r["id"] for r in concurrent.resources]


def test_unknown_patient_is_fhir_not_found(client: FhirClient, fhir_server: FhirTestServer) -> None:
    missing = f"{fhir_server.id_prefix}no-such-patient"
    with pytest.raises(FhirNotFound) as caught:
        fetch_patient_resources(client, missing, TRIALS)
    assert caught.value.status == 404
    assert missing in str(caught.value)


def test_loading_twice_changes_nothing(
    client: FhirClient, fhir_server: FhirTestServer, tmp_path: Path
) -> None:
    pid = f"{fhir_server.id_prefix}idem-1"
    entries = [
        {
            "resource": {"resourceType": "Patient", "id": pid, "gender": "male"},
            "request": {"method": "PUT", "url": f"Patient/{pid}"},
        },
        {
            "resource": observation(f"{pid}-cr", f"Patient/{pid}", CREATININE, 0.9),
            "request": {"method": "POST", "url": "Observation"},
        },
    ]
    write_bundle(tmp_path, "idem.json", entries, "transaction")

    first = load_fixtures(client, tmp_path, tag=fhir_server.tag)
    versions = {
        ref: client.read(*ref.split("/"))["meta"]["versionId"]
        for ref in (f"Patient/{pid}", f"Observation/{pid}-cr")
    }
    second = load_fixtures(client, tmp_path, tag=fhir_server.tag)

    assert first.counts == second.counts == {"Patient": 1, "Observation": 1}
    assert second.total("unchanged") == 2
    assert second.total("created") == second.total("updated") == 0
    for ref, version in versions.items():
        assert client.read(*ref.split("/"))["meta"]["versionId"] == version
    tagged = client.search("Observation", [("patient", pid), ("_tag", "|".join(fhir_server.tag))])
    assert [r["id"] for r in tagged.resources] == [f"{pid}-cr"]  # no duplicate from the POST


def test_a_rejected_transaction_names_the_file_and_entry_and_rolls_back(
    client: FhirClient,
    fhir_server: FhirTestServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pid = f"{fhir_server.id_prefix}rejected-1"
    entries = [
        {"resource": {"resourceType": "Patient", "id": pid}},
        {"resource": {"resourceType": "NotAFhirType", "id": f"{pid}-x"}},
    ]
    path = write_bundle(tmp_path, "bad.json", entries, "collection")

    with pytest.raises(FixtureLoadError) as caught:
        load_bundle_file(client, path, tag=fhir_server.tag)
    error = caught.value
    assert error.file == str(path)
    assert error.entry_index == 1
    assert str(error).startswith(f"{path}: entry 1 (NotAFhirType/{pid}-x)")
    assert "NotAFhirType" in str(error)
    with pytest.raises(FhirNotFound):  # the transaction was rolled back as a whole
        client.read("Patient", pid)

    status = cli.main(
        [
            "fixtures",
            "load",
            "--fhir-base",
            fhir_server.base_url,
            str(tmp_path),
            "--tag",
            "|".join(fhir_server.tag),
        ]
    )
    assert status == 1
    assert f"cds: error: {path}: entry 1" in capsys.readouterr().err


def test_cli_load_reports_counts_per_type(
    fhir_server: FhirTestServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pid = f"{fhir_server.id_prefix}cli-1"
    entries = [
        {"resource": {"resourceType": "Patient", "id": pid}},
        {"resource": observation(f"{pid}-a", f"Patient/{pid}", HEMOGLOBIN, 13)},
        {"resource": observation(f"{pid}-b", f"Patient/{pid}", HEMOGLOBIN, 14)},
    ]
    write_bundle(tmp_path, "cli.json", entries, "collection")
    argv = [
        "fixtures",
        "load",
        "--fhir-base",
        fhir_server.base_url + "/",
        str(tmp_path),
        "--tag",
        "|".join(fhir_server.tag),
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "Observation 2, Patient 1" in out
    assert "3 created" in out
    assert cli.main(argv) == 0
    assert "3 unchanged" in capsys.readouterr().out


def test_the_session_fixtures_are_loaded(
    loaded_fhir_base_url: str, fhir_server: FhirTestServer
) -> None:
    with fhir_server.client() as c:
        tagged = c.search("Patient", [("_tag", "|".join(fhir_server.tag)), ("_count", "1")])
    from cds.fhir.loader import FIXTURES_DIR, bundle_files

    if FIXTURES_DIR.is_dir() and bundle_files(FIXTURES_DIR):
        assert tagged.resources, "fixtures were loaded but no tagged Patient is found"
    assert loaded_fhir_base_url == fhir_server.base_url


def _fixture_expectations(tag: tuple[str, str]) -> dict[str, set[str]]:
    """Per fixture patient: the Type/id of every fixture resource the derived queries must find."""
    from cds.criteria import load_trials
    from cds.criteria.record import patient_reference
    from cds.fhir.loader import FIXTURES_DIR, bundle_files, prepare_entries

    trials = load_trials()
    codes = trials.codes_for("Observation")
    covered = set(trials.types_read()) - {"Observation"}
    expected: dict[str, set[str]] = {}
    resources = []
    for path in bundle_files(FIXTURES_DIR):
        resources += [
            e.resource
            for e in prepare_entries(json.loads(path.read_text()), file=str(path), tag=tag)
        ]
    for resource in resources:
        if resource["resourceType"] == "Patient":
            expected.setdefault(resource["id"], set()).add(f"Patient/{resource['id']}")
    for resource in resources:
        rtype = resource["resourceType"]
        ref = patient_reference(resource, {}) or ""
        if not ref.startswith("Patient/") or ref[8:] not in expected:
            continue
        # the Observation's code or a component's (combo-code)
        concepts = [resource.get("code") or {}]
        concepts += [c.get("code") or {} for c in resource.get("component") or ()]
        codings = {(c.get("system"), c.get("code")) for k in concepts for c in k.get("coding", ())}
        if rtype in covered or (rtype == "Observation" and codings & codes):
            expected[ref[8:]].add(f"{rtype}/{resource['id']}")
            medication = (resource.get("medicationReference") or {}).get("reference")
            if medication and not medication.startswith("#"):  # read after the searches
                expected[ref[8:]].add(medication)
    return expected


def test_every_fixture_patient_fetched_from_the_server_has_all_its_fixture_resources(
    loaded_fhir_base_url: str, fhir_server: FhirTestServer
) -> None:
    """Loader + trial-derived queries: what a patient's fixture bundle holds comes back."""
    from cds.criteria import load_trials

    trials = load_trials()
    expected = _fixture_expectations(fhir_server.tag)
    assert expected, "no fixture patients"
    with fhir_server.client() as c:
        for patient_id, refs in sorted(expected.items()):
            result = fetch_patient_resources(c, patient_id, trials, tag=fhir_server.tag)
            fetched = {f"{r['resourceType']}/{r['id']}" for r in result.resources}
            assert fetched == refs, patient_id


def _with_a_refused_procedure_search(trials: Any) -> list[Any]:
    """The trials' queries, the Procedure search given a date the server refuses (a 400): a
    real server's answer to a search it cannot run (an error OperationOutcome, which may pass,
    still fails the fetch: tests/test_fhir_hardening.py)."""
    from dataclasses import replace

    return [
        replace(q, template=q.template + "&date=notadate") if q.resource_type == "Procedure" else q
        for q in build_patient_queries(trials)
    ]


def test_a_refused_search_fails_the_fetch_unless_asked_to_leave_it_incomplete(
    client: FhirClient, fhir_server: FhirTestServer, loaded_fhir_base_url: str
) -> None:
    from datetime import date

    from cds.criteria import load_trials
    from cds.errors import FhirRejected
    from cds.sweep.core import evaluate_resources

    trials = load_trials()
    patient = f"{fhir_server.id_prefix}prior-tace"
    queries = _with_a_refused_procedure_search(trials)
    with pytest.raises(FhirRejected):
        fetch_patient_resources(client, patient, trials, queries=queries, tag=fhir_server.tag)
    fetched = fetch_patient_resources(
        client, patient, trials, queries=queries, tag=fhir_server.tag, incomplete_on_refusal=True
    )
    assert set(fetched.incomplete) == {"Procedure"}
    assert not [r for r in fetched.resources if r["resourceType"] == "Procedure"]
    assert any(r["resourceType"] == "Condition" for r in fetched.resources)
    assert any("could not answer" in w and patient not in w for w in fetched.warnings)
    evaluation = evaluate_resources(
        fetched.resources, trials, date(2026, 11, 1), incomplete=fetched.incomplete
    )
    tace = next(
        c
        for c in evaluation.trial("NCT04339036").criteria
        if c.id == "exc-prior-liver-embolization"
    )
    # without the Procedures the TACE on record is not seen: unknown, never "none on record"
    assert tace.result.value == "unknown", tace.explanation
    assert "reported an error" in tace.explanation


def test_a_rest_sweep_leaves_a_refused_search_incomplete_not_the_patient_an_error(
    fhir_server: FhirTestServer, loaded_fhir_base_url: str, tmp_path: Path
) -> None:
    from cds.criteria import load_trials
    from cds.sweep.remote import RestOptions, sweep_rest
    from tests.helpers import sweep_lines, sweep_options

    patient = f"{fhir_server.id_prefix}prior-tace"
    rest = RestOptions(
        tag=fhir_server.tag,
        patient_ids=[patient],
        queries=tuple(_with_a_refused_procedure_search(load_trials())),
    )
    with fhir_server.client() as client:
        summary = sweep_rest(client, sweep_options(tmp_path), rest)
    assert summary["errors"] == 0 and summary["patients"] == 1
    (line,) = sweep_lines(tmp_path)
    trial = next(t for t in json.loads(line)["trials"] if t["trial"] == "NCT04339036")
    tace = next(c for c in trial["criteria"] if c["id"] == "exc-prior-liver-embolization")
    assert tace["result"] == "unknown" and trial["status"] == "needs-review"
