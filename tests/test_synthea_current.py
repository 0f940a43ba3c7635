"""Today's Synthea output, as it is (conditional references to practitioner and hospital
bundles, one transaction per patient), loaded into the real local FHIR server: a second load
changes nothing, and every door gives the same answer for every patient."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from cds.criteria import load_trials
from cds.evaluate_command import evaluate_files
from cds.fhir.bulk import BulkExporter
from cds.fhir.loader import DEFAULT_TAG_SYSTEM, files_of, load_fixtures
from cds.sweep.remote import RestOptions, sweep_export, sweep_rest
from cds.sweep.runner import sweep_ndjson
from tests.helpers import AS_OF, printed_lines, put_group, sweep_lines, sweep_options, write_ndjson
from tests.hooks_data.support import PV, hook_body, post
from tests.plugins.fhir_server import FhirTestServer

pytestmark = pytest.mark.integration

SYNTHEA = Path(__file__).resolve().parents[2] / "shared" / "data" / "synthea-current"


@pytest.fixture(scope="module")
def loaded(fhir_server: FhirTestServer) -> tuple[str, str]:
    if not SYNTHEA.is_dir():
        pytest.skip(f"{SYNTHEA} not present")
    tag = (DEFAULT_TAG_SYSTEM, f"synthea-current-{fhir_server.id_prefix or 'local'}")
    with fhir_server.client() as client:
        first = load_fixtures(client, tag=tag, files=files_of([SYNTHEA]))
        second = load_fixtures(client, tag=tag, files=files_of([SYNTHEA]))
    assert first.total("created") + first.total("updated") == sum(first.counts.values())
    assert first.counts["Patient"] == 10
    # loading unchanged data again creates no new versions
    assert second.total("created") == second.total("updated") == 0
    assert second.total("unchanged") == sum(first.counts.values())
    return tag


def _reference() -> list[str]:
    return printed_lines(evaluate_files([str(SYNTHEA)], load_trials(), AS_OF))


def test_every_door_agrees_on_synthea_current(
    loaded: tuple[str, str], fhir_server: FhirTestServer, tmp_path: Path
) -> None:
    tag = loaded
    reference = _reference()
    assert len(reference) == 10
    statuses = {t["status"] for line in reference for t in json.loads(line)["trials"]}
    assert statuses == {"excluded"}  # none of them has a NET

    with fhir_server.client() as client:
        rest = sweep_rest(client, sweep_options(tmp_path / "rest"), RestOptions(tag=tag))
        assert rest["complete"] and rest["errors"] == 0
        assert sweep_lines(tmp_path / "rest") == reference

        ids = sorted(json.loads(line)["patient"] for line in reference)
        group = f"{fhir_server.id_prefix}synthea-current"
        put_group(client, group, ids)
        export = sweep_export(
            BulkExporter(client), fhir_server.base_url, sweep_options(tmp_path / "x"), group=group
        )
        assert export["complete"] and export["errors"] == 0
        assert sweep_lines(tmp_path / "x") == reference

    source = write_ndjson(files_of([SYNTHEA]), tag, tmp_path / "ndjson")
    ndjson = sweep_ndjson(source, sweep_options(tmp_path / "nd"))
    assert ndjson["complete"] and ndjson["errors"] == 0
    assert sweep_lines(tmp_path / "nd") == reference


def test_the_hooks_service_shows_no_card_for_synthea_current(
    loaded: tuple[str, str], loaded_fhir_base_url: str, fhir_server: FhirTestServer
) -> None:
    from tests.hooks_data.support import dev_app

    hooks: FlaskClient = dev_app(
        fhir_trusted_servers=[fhir_server.base_url], time_budget_s=20
    ).test_client()
    for line in _reference():
        pid = json.loads(line)["patient"].removeprefix("Patient/")
        response = post(
            hooks, f"/cds-services/{PV}", hook_body(patient_id=pid, fhirServer=fhir_server.base_url)
        )
        assert response.status_code == 200
        assert response.get_json()["cards"] == []
