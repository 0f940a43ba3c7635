"""Small builders shared by the tests: bundles and records from a few resources."""

from __future__ import annotations

import io
import json
from datetime import date
from pathlib import Path
from typing import Any

from cds.criteria import TrialSet, load_trials
from cds.criteria.engine import evaluate
from cds.criteria.model import CriterionResult, PatientEvaluation
from cds.criteria.record import PatientRecord
from cds.sweep.runner import SweepOptions

AS_OF = date(2026, 11, 1)
A, B = "NCT04339036", "NCT05610826"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"


def patient(
    pid: str = "p1", gender: str = "male", birth: str | None = "1968-05-14"
) -> dict[str, Any]:
    p: dict[str, Any] = {"resourceType": "Patient", "id": pid, "gender": gender}
    if birth:
        p["birthDate"] = birth
    return p


def obs(
    oid: str,
    code: str,
    value: Any,
    unit: str | None,
    when: str = "2026-10-20",
    *,
    status: str = "final",
    high: float | None = None,
    low: float | None = None,
    pid: str = "p1",
    ucum: bool = True,
    comparator: str | None = None,
) -> dict[str, Any]:
    r: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "status": status,
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": when,
    }
    if value is not None:
        q: dict[str, Any] = {"value": value}
        if unit is not None:
            q["unit"] = unit
            if ucum:
                q.update(system=UCUM, code=unit)
        if comparator:
            q["comparator"] = comparator
        r["valueQuantity"] = q
    if high is not None or low is not None:
        rr: dict[str, Any] = {}
        if high is not None:
            rr["high"] = {"value": high, "unit": unit}
        if low is not None:
            rr["low"] = {"value": low, "unit": unit}
        r["referenceRange"] = [rr]
    return r


def run(
    resources: list[dict[str, Any]],
    *,
    as_of: date = AS_OF,
    trials: TrialSet | None = None,
    pat: dict[str, Any] | None = None,
) -> PatientEvaluation:
    record = PatientRecord.from_resources([pat or patient(), *resources], trials or load_trials())
    return evaluate(record, trials or load_trials(), as_of)


def criterion(evaluation: PatientEvaluation, trial: str, cid: str) -> CriterionResult:
    return next(c for c in evaluation.trial(trial).criteria if c.id == cid)


def printed_lines(evaluations: list[PatientEvaluation]) -> list[str]:
    """What `cds evaluate --format json` prints for these evaluations, one line each, sorted:
    the lines a sweep must reproduce (json.dumps here, not the sweep's own encoder)."""
    return sorted(json.dumps(e.to_json(), ensure_ascii=False) + "\n" for e in evaluations)


def sweep_options(out: Path, **kw: Any) -> SweepOptions:
    """Sweep options for tests: all trials, the fixed as-of date, quiet progress."""
    return SweepOptions(
        out=out,
        trials=load_trials(),
        as_of=kw.pop("as_of", AS_OF),
        stream=io.StringIO(),
        tty=False,
        **kw,
    )


def sweep_lines(out: Path) -> list[str]:
    """A finished sweep's results.ndjson lines, sorted."""
    return sorted((out / "results.ndjson").read_text(encoding="utf-8").splitlines(True))


def put_group(client: Any, group_id: str, patients: list[str]) -> None:
    """PUT a Group of these patients (``Patient/id``), for Group/$export."""
    group = {
        "resourceType": "Group",
        "id": group_id,
        "type": "person",
        "actual": True,
        "member": [{"entity": {"reference": ref}} for ref in patients],
    }
    client.transaction(
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {"resource": group, "request": {"method": "PUT", "url": f"Group/{group_id}"}}
            ],
        }
    )


def write_ndjson(files: list[Path], tag: tuple[str, str], out: Path) -> Path:
    """Bundle files as a Bulk export would write them: one NDJSON file per resource type,
    references as Type/id (the loader's preparation, as loaded onto a server)."""
    from cds.fhir.loader import prepare_entries

    by_type: dict[str, list[str]] = {}
    for path in files:
        for e in prepare_entries(json.loads(path.read_text()), file=str(path), tag=tag):
            by_type.setdefault(e.resource_type, []).append(json.dumps(e.resource))
    out.mkdir(parents=True, exist_ok=True)
    for rtype, lines in by_type.items():
        (out / f"{rtype}.ndjson").write_text("\n".join(lines) + "\n")
    return out


#: What a Bulk export from the test server cannot carry, and why: sekmet-fhir 0.1.1 indexes no
#: ResearchSubject search parameter, so its Patient compartment (hence a Group $export) leaves
#: ResearchSubject out, where HAPI follows the R4 compartment definition
#: (ResearchSubject.individual). Its REST search by patient does return them (every patient's,
#: which the fetch narrows to the patient's own). The criterion that reads them, and the
#: result it falls back to without them.
EXPORT_GAP = ("NCT04339036", "exc-investigational-agents", "manual")


def assert_export_matches(exported: list[str], reference: list[str]) -> None:
    """The export sweep's lines equal the reference lines, except that a patient whose
    ResearchSubject the test server's export leaves out may differ in the one criterion that
    reads it (and so in that trial's status), falling back to its no-enrolment result."""
    got = {json.loads(line)["patient"]: line for line in exported}
    want = {json.loads(line)["patient"]: line for line in reference}
    assert set(got) == set(want)
    trial_id, criterion_id, fallback = EXPORT_GAP
    for ref, line in want.items():
        if got[ref] == line:
            continue
        a, b = json.loads(got[ref]), json.loads(line)
        differing = [
            (t["trial"], x["id"], x["result"])
            for t, u in zip(a["trials"], b["trials"], strict=True)
            for x, y in zip(t["criteria"], u["criteria"], strict=True)
            if x != y
        ]
        assert differing == [(trial_id, criterion_id, fallback)], (ref, differing)
