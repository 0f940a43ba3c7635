"""`cds evaluate`: both formats, directories, and bad input that exits 2 with one clear line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cds.cli import main
from cds.criteria.definitions import load_trials

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fhir_fixtures"
SYNTHEA = ROOT.parent / "shared" / "data" / "synthea-r4"


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_json_format_is_one_object_per_patient_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(
        capsys,
        "evaluate",
        str(FIXTURES / "searchset-two-patients.json"),
        "--as-of",
        "2026-11-01",
        "--format",
        "json",
    )
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [d["patient"] for d in lines] == ["Patient/searchset-first", "Patient/searchset-second"]
    first = lines[0]
    assert first["as_of"] == "2026-11-01"
    assert [t["trial"] for t in first["trials"]] == ["NCT04339036", "NCT05610826"]
    trial = first["trials"][0]
    assert set(trial) == {"trial", "version", "status", "criteria"}
    assert set(trial["criteria"][0]) == {"id", "kind", "text", "result", "evidence", "explanation"}
    assert lines[1]["trials"][0]["status"] == "excluded"


def test_text_format_is_a_checklist(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(
        capsys,
        "evaluate",
        str(FIXTURES / "labs-out-of-range.json"),
        "--as-of",
        "2026-11-01",
        "--format",
        "text",
        "--trial",
        "NCT04339036",
    )
    assert code == 0
    version = load_trials()["NCT04339036"].version
    assert f"NCT04339036 CapTem + Y90 v{version} [registry: RECRUITING]: EXCLUDED" in out
    assert "FAIL     inc  Total bilirubin ≤ 2.0 mg/dL" in out
    assert "NCT05610826" not in out


def test_a_directory_means_every_json_file_in_it(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(
        capsys, "evaluate", str(FIXTURES), "--as-of", "2026-11-01", "--format", "json"
    )
    assert code == 0
    patients = {json.loads(line)["patient"] for line in out.splitlines()}
    assert len(patients) == len(list(FIXTURES.glob("*.json"))) + 1  # one holds two patients


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{ not json", "not valid JSON (line 1, column 3"),
        ('{"resourceType": "Patient", "id": "x"}', "not a FHIR Bundle (resourceType 'Patient')"),
        (
            '{"resourceType": "Bundle", "type": "collection", "entry": []}',
            "no Patient resource in any file",
        ),
        ("[1, 2]", "not a FHIR Bundle (resourceType 'list')"),
    ],
)
def test_bad_files_exit_2_naming_file_and_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    code, out, err = cli(capsys, "evaluate", str(bad), "--as-of", "2026-11-01")
    assert code == 2
    assert out == ""
    assert err == f"cds: error: {bad}: {message}" + err.split(message, 1)[1]
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--trial", "NCT00000000"],
            "--trial: unknown trial NCT00000000 (known: NCT04339036, NCT05610826)",
        ),
        (["--as-of", "2026-13-01"], "--as-of: '2026-13-01' is not a date (YYYY-MM-DD)"),
    ],
)
def test_bad_arguments_exit_2(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, _, err = cli(capsys, "evaluate", str(FIXTURES / "both-candidate.json"), *args)
    assert code == 2
    assert err.strip() == f"cds: error: {message}"


def test_missing_file_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = cli(capsys, "evaluate", str(tmp_path / "nope.json"))
    assert code == 2 and "nope.json: no such file or directory" in err


def test_one_bad_file_leaves_no_partial_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad.json").write_text("nope")
    code, out, _ = cli(
        capsys, "evaluate", str(FIXTURES / "both-candidate.json"), str(tmp_path / "bad.json")
    )
    assert code == 2 and out == ""


def test_malformed_resource_warns_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(
        capsys,
        "evaluate",
        str(FIXTURES / "malformed-observation.json"),
        "--as-of",
        "2026-11-01",
        "--format",
        "json",
    )
    assert code == 0 and out
    assert "cds: warning: Observation/malformed-observation-obs4 skipped" in err


def test_console_script_runs_without_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text("{")
    proc = subprocess.run(
        [sys.executable, "-m", "cds.cli", "evaluate", str(bad)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("cds: error:") and "Traceback" not in proc.stderr


@pytest.mark.skipif(
    not SYNTHEA.is_dir(), reason="shared/data/synthea-r4 is not beside this checkout"
)
def test_synthea_population_evaluates_without_error_and_no_candidates(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = cli(
        capsys, "evaluate", str(SYNTHEA), "--as-of", "2026-11-01", "--format", "json"
    )
    assert code == 0
    results = [json.loads(line) for line in out.splitlines()]
    assert len(results) == 50
    statuses = {t["status"] for r in results for t in r["trials"]}
    assert statuses == {"excluded"}
    assert "error" not in err
