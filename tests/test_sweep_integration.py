"""The sweep against a real FHIR server: REST paging and $export give `cds evaluate`'s results,
an interrupted REST sweep resumes to the same totals, write-back creates each resource once."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from cds.criteria import load_trials
from cds.evaluate_command import evaluate_files
from cds.fhir.bulk import BulkExporter, export_supported
from cds.fhir.client import FhirClient
from cds.fhir.loader import DEFAULT_TAG_SYSTEM, load_bundle_file
from cds.sweep.progress import Progress
from cds.sweep.remote import RestOptions, sweep_export, sweep_rest
from cds.sweep.writeback import SUBJECT_SYSTEM, write_back
from cds.synthetic import Population, write_population
from tests.helpers import (
    AS_OF,
    assert_export_matches,
    printed_lines,
    put_group,
    sweep_lines,
    sweep_options,
)
from tests.plugins.fhir_server import FhirTestServer

pytestmark = pytest.mark.integration

PATIENTS = 200


@dataclass
class Loaded:
    server: FhirTestServer
    tag: tuple[str, str]
    ids: list[str]
    group: str
    expected: list[str]


@pytest.fixture(scope="module")
def loaded(fhir_server: FhirTestServer, tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    """~200 generated patients (a quarter of them NET cases, light histories so loading stays
    quick) loaded under a tag of their own, and a Group of them for Group/$export."""
    root = tmp_path_factory.mktemp("sweep-pop")
    population = Population(
        PATIENTS, seed=21, net_every=4, visits=(1, 3), id_prefix=f"{fhir_server.id_prefix}sw"
    )
    write_population(population, root, "bundles")
    files = sorted(root.glob("*.json"))
    tag = (DEFAULT_TAG_SYSTEM, f"sweep-{fhir_server.id_prefix or 'local'}")
    with fhir_server.client() as client:
        # One transaction per patient, two at a time (the server runs two workers).
        with ThreadPoolExecutor(2) as pool:
            list(
                pool.map(
                    lambda p: load_bundle_file(client, p, tag=tag, skip_unchanged=False), files
                )
            )
        ids = [population.patient_id(i) for i in range(PATIENTS)]
        group = f"{fhir_server.id_prefix}sweep-group"
        put_group(client, group, [f"Patient/{i}" for i in ids])
    evaluations = evaluate_files([str(root)], load_trials(), AS_OF)
    return Loaded(fhir_server, tag, ids, group, printed_lines(evaluations))


@pytest.fixture
def client(loaded: Loaded) -> Iterator[FhirClient]:
    with loaded.server.client() as c:
        yield c


def test_rest_sweep_with_small_pages_equals_cds_evaluate(
    loaded: Loaded, client: FhirClient, tmp_path: Path
) -> None:
    rest = RestOptions(concurrency=4, page_size=15, tag=loaded.tag, patients_per_partition=40)
    summary = sweep_rest(client, sweep_options(tmp_path), rest)
    assert summary["complete"] and summary["errors"] == 0
    assert summary["patients"] == PATIENTS
    assert sweep_lines(tmp_path) == loaded.expected


def test_group_export_sweep_equals_cds_evaluate(
    loaded: Loaded, client: FhirClient, tmp_path: Path
) -> None:
    assert export_supported(client.capabilities(), group=True)
    base = loaded.server.base_url
    summary = sweep_export(
        BulkExporter(client), base, sweep_options(tmp_path, workers=2), group=loaded.group
    )
    assert summary["complete"] and summary["errors"] == 0
    assert summary["patients"] == PATIENTS
    assert_export_matches(sweep_lines(tmp_path), loaded.expected)
    assert not (tmp_path / ".sweep" / "input").exists()  # downloaded files cleaned up


def test_interrupted_rest_sweep_resumes_to_the_same_totals(
    loaded: Loaded, client: FhirClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rest = RestOptions(concurrency=4, page_size=50, tag=loaded.tag, patients_per_partition=25)
    real_advance = Progress.advance
    seen = {"n": 0}

    def advance(self: Progress, n: int = 1) -> None:
        seen["n"] += n
        if seen["n"] == 90:
            raise KeyboardInterrupt  # Ctrl-C in the middle of a partition
        real_advance(self, n)

    monkeypatch.setattr(Progress, "advance", advance)
    with pytest.raises(KeyboardInterrupt):
        sweep_rest(client, sweep_options(tmp_path), rest)
    partial = json.loads((tmp_path / "summary.json").read_text())
    assert not partial["complete"]
    assert partial["patients"] == 75  # three whole partitions of 25; the fourth is redone
    monkeypatch.setattr(Progress, "advance", real_advance)

    summary = sweep_rest(client, sweep_options(tmp_path, resume=True), rest)
    assert summary["complete"] and summary["patients"] == PATIENTS and summary["errors"] == 0
    assert sweep_lines(tmp_path) == loaded.expected


def test_unfetchable_patient_is_recorded_and_the_sweep_goes_on(
    loaded: Loaded, client: FhirClient, tmp_path: Path
) -> None:
    ids = [*loaded.ids[:5], "no-such-patient-xyz", *loaded.ids[5:8]]
    summary = sweep_rest(
        client, sweep_options(tmp_path), RestOptions(patient_ids=ids, tag=loaded.tag)
    )
    assert summary["patients"] == 8 and summary["errors"] == 1
    errors = [json.loads(x) for x in (tmp_path / "errors.ndjson").read_text().splitlines()]
    assert errors[0]["patient"] == "Patient/no-such-patient-xyz"
    assert "FhirNotFound" in errors[0]["error"]


def test_write_back_twice_creates_each_resource_once(
    loaded: Loaded, client: FhirClient, tmp_path: Path
) -> None:
    ids = loaded.ids[:60]
    summary = sweep_rest(
        client, sweep_options(tmp_path), RestOptions(patient_ids=ids, tag=loaded.tag)
    )
    wanted = sum(
        t["status"]["candidate"] + t["status"]["needs-review"] for t in summary["trials"].values()
    )
    assert wanted > 0
    capability = client.capabilities()
    first = write_back(client, load_trials(), tmp_path / "candidates.csv", capability)
    second = write_back(client, load_trials(), tmp_path / "candidates.csv", capability)
    assert first.subjects_created + first.subjects_existing == wanted
    assert second.subjects_created == 0 and second.studies_created == 0
    assert second.subjects_existing == wanted and second.studies_existing == 2
    for pid in ids[:8]:
        keys = [f"{t}:{pid}" for t in ("NCT04339036", "NCT05610826")]
        for key in keys:
            found = client.search("ResearchSubject", {"_tag": f"{SUBJECT_SYSTEM}|{key}"})
            assert len(found.resources) <= 1
