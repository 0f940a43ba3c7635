"""NDJSON input: stream the files once into per-patient hash buckets, then evaluate a bucket.

Grouping a population by patient without holding it in memory is an external hash partition:
each line goes, unparsed, to bucket ``crc32(patient id) mod P``; a bucket (a few tens of MB)
holds every resource of its patients, so it is evaluated on its own, in any process or on any
machine. Finding the patient of a line is a regular expression on the raw text in the common
case (compact JSON, one ``subject``/``patient`` reference, nothing contained); anything else
is parsed properly.
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import IO, Any

from cds.criteria import TrialSet, load_trials
from cds.criteria.record import CLINICAL_TYPES
from cds.errors import InputError
from cds.fhir.bundle import patient_reference
from cds.sweep.core import PatientOutcome, Tally, error_outcome, evaluate_resources, outcome_of
from cds.sweep.store import WorkDir

log = logging.getLogger(__name__)

JSONDict = dict[str, Any]

#: target bucket size: small enough for one worker's memory, large enough to keep P modest
BUCKET_BYTES = 24 << 20
MAX_BUCKETS = 2048
#: the resource types read into a record, in the order a record's resources are presented
#: (the order the FHIR queries and the generator use, so results match `cds evaluate`)
TYPE_RANK = {
    t: i
    for i, t in enumerate(
        (
            "Patient",
            "Condition",
            "Procedure",
            "Observation",
            "MedicationRequest",
            "MedicationStatement",
            "MedicationAdministration",
            "MedicationDispense",
            "Medication",
        )
    )
}
_KEPT = frozenset(CLINICAL_TYPES) | {"Patient", "Medication"}

_TYPE_RE = re.compile(rb'^\s*\{\s*"resourceType"\s*:\s*"([A-Za-z]+)"')
_REF_RE = re.compile(rb'"(?:subject|patient)"\s*:\s*\{\s*"reference"\s*:\s*"([^"\\]+)"')


def ndjson_files(directory: Path) -> list[Path]:
    """The ``*.ndjson`` files of a directory, Patient first and then by resource type (a Bulk
    export names each file after its type, possibly with a numeric suffix)."""
    if not directory.is_dir():
        raise InputError("not a directory", source=str(directory))
    files = sorted(p for p in directory.iterdir() if p.suffix == ".ndjson" and p.is_file())
    if not files:
        raise InputError("directory holds no *.ndjson file", source=str(directory))

    def key(path: Path) -> tuple[int, str]:
        stem = path.stem.split(".")[0].split("_")[0].split("-")[0]
        return TYPE_RANK.get(stem, len(TYPE_RANK)), path.name

    return sorted(files, key=key)


def bucket_of(patient_id: str, buckets: int) -> int:
    return zlib.crc32(patient_id.encode()) % buckets


def _reference_id(reference: str) -> str | None:
    """``abc`` for ``Patient/abc``, ``[base]/Patient/abc`` or ``Patient/abc/_history/2``."""
    reference = reference.split("/_history/", 1)[0]
    parts = reference.rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == "Patient":
        return parts[-1]
    return None


@dataclass
class PartitionStats:
    """What the partitioning pass saw."""

    lines: int = 0
    patients: int = 0
    resources: int = 0
    shared: int = 0
    skipped_types: dict[str, int] = field(default_factory=dict)
    unreadable: int = 0
    orphans: int = 0
    bytes: int = 0
    #: Observations no criterion reads, left out before they were parsed or bucketed
    irrelevant: int = 0

    def to_json(self) -> JSONDict:
        return {
            "lines": self.lines,
            "patients": self.patients,
            "resources": self.resources,
            "shared_medications": self.shared,
            "skipped_types": self.skipped_types,
            "unreadable_lines": self.unreadable,
            "resources_naming_no_patient": self.orphans,
            "irrelevant_observations": self.irrelevant,
        }


def choose_buckets(files: list[Path], workers: int) -> int:
    size = sum(p.stat().st_size for p in files)
    return max(1, min(MAX_BUCKETS, max(workers, -(-size // BUCKET_BYTES))))


def partition_ndjson(
    files: list[Path],
    work: WorkDir,
    buckets: int,
    progress: Callable[[int], None] | None = None,
    keep: Callable[[bytes], bool] | None = None,
) -> PartitionStats:
    """Stream every line of ``files`` into ``buckets`` bucket files under the work directory.

    Lines are copied as bytes, never re-serialised; lines ``keep`` rejects (Observations no
    criterion reads, see :func:`observation_prefilter`) are left out here, before they cost a
    route, a write and a read. Medication resources name no patient:
    they go to a shared file every bucket reads, as `records_from_bundle` gives every patient
    of a Bundle its Medications.
    """
    stats = PartitionStats()
    with ExitStack() as stack:
        handles: list[IO[bytes]] = [
            stack.enter_context(open(work.input / f"b{i:05d}.ndjson", "wb", buffering=1 << 16))
            for i in range(buckets)
        ]
        shared = stack.enter_context(open(work.input / "shared.ndjson", "wb"))
        for path in files:
            with open(path, "rb") as f:
                for raw in f:
                    stats.lines += 1
                    stats.bytes += len(raw)
                    if progress is not None and stats.lines % 20000 == 0:
                        progress(stats.bytes)
                    line = raw.strip()
                    if not line:
                        continue
                    line += b"\n"  # the last line of a file may lack its newline
                    if keep is not None and not keep(line):
                        stats.irrelevant += 1
                        continue
                    rtype, pid = _route(line, stats)
                    if rtype is None:
                        continue
                    if rtype == "Medication":
                        shared.write(line)
                        stats.shared += 1
                    elif pid is None:
                        stats.orphans += 1
                    else:
                        # The patient id leads the line, so reading a bucket back never
                        # has to look for it again (ids cannot contain a tab).
                        handles[bucket_of(pid, buckets)].write(pid.encode() + b"\t" + line)
                        if rtype == "Patient":
                            stats.patients += 1
                        else:
                            stats.resources += 1
    if progress is not None:
        progress(stats.bytes)
    return stats


def _route(line: bytes, stats: PartitionStats) -> tuple[str | None, str | None]:
    """(resource type, patient id) of one NDJSON line; (None, None) when it is not kept."""
    m = _TYPE_RE.match(line)
    rtype = m.group(1).decode() if m else None
    fast = rtype is not None and rtype != "Patient" and b'"contained"' not in line
    if fast and rtype in _KEPT:
        if rtype == "Medication":
            return rtype, None
        refs = set(_REF_RE.findall(line))
        if len(refs) == 1:
            return rtype, _reference_id(refs.pop().decode())
    elif fast:
        stats.skipped_types[rtype or "?"] = stats.skipped_types.get(rtype or "?", 0) + 1
        return None, None
    try:
        resource = json.loads(line)
    except ValueError:
        stats.unreadable += 1
        return None, None
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        stats.unreadable += 1
        return None, None
    rtype = resource["resourceType"]
    if rtype not in _KEPT:
        stats.skipped_types[rtype] = stats.skipped_types.get(rtype, 0) + 1
        return None, None
    if rtype == "Patient":
        rid = resource.get("id")
        return (rtype, rid) if isinstance(rid, str) and rid else (None, None)
    if rtype == "Medication":
        return rtype, None
    ref = patient_reference(resource, {})
    return rtype, (ref.removeprefix("Patient/") if ref else None)


# -- the map step -------------------------------------------------------------------------


@dataclass(frozen=True)
class BucketTask:
    """One partition of an NDJSON sweep: everything a worker needs, picklable."""

    index: int
    bucket: Path
    shared: Path
    out: Path
    trial_ids: tuple[str, ...]
    as_of: date


_OBSERVATION_RE = re.compile(rb'"resourceType"\s*:\s*"Observation"')


_CODE_VALUE_RE = re.compile(rb'"code"\s*:\s*"([^"\\]*)"')


def observation_prefilter(trials: TrialSet) -> Callable[[bytes], bool]:
    """A test on a raw NDJSON line: False only for an Observation none of whose ``"code"``
    values is a code the trials read from Observations, so it need not even be parsed.

    Observations are most of a population's lines and most are vital signs no criterion
    reads; parsing JSON is the sweep's largest cost, so they are selected before parsing. Every
    ``"code": "..."`` value in the line is checked (Observation.code, but also units and
    categories, which only keeps a few lines too many: the record's own relevance test then
    drops them); a line is dropped only if none of them can match. A code written with JSON
    escapes is kept, since the pattern does not read it. ICD-10-CM families match with or
    without the dot.
    """
    codes: set[bytes] = set()
    prefixes: list[bytes] = []
    for vs_id in trials.valueset_ids_for("Observation"):
        vs = trials.valueset(vs_id)
        codes.update(code.encode() for _, code in vs.codes)
        prefixes.extend(prefix.encode() for _, prefix in vs.prefixes)
    frozen = frozenset(codes)
    prefix_tuple = tuple(prefixes)

    def keep(line: bytes) -> bool:
        if _OBSERVATION_RE.search(line) is None or b"\\" in line:
            return True
        found = _CODE_VALUE_RE.findall(line)
        if not frozen.isdisjoint(found):
            return True
        # ICD-10-CM keys are dotless and upper case (C7B0); the line may hold "c7b.02".
        return bool(prefix_tuple) and any(
            code[:1].isalpha() and code.replace(b".", b"").upper().startswith(prefix_tuple)
            for code in found
        )

    return keep


def read_bucket(path: Path) -> Iterator[tuple[str, JSONDict | None, list[JSONDict]]]:
    """(patient id, Patient or None, resources) per patient of a bucket, in order of first
    appearance; only one bucket's raw lines are in memory at a time."""
    groups: dict[bytes, list[bytes]] = {}
    with open(path, "rb") as f:
        for line in f:
            pid, _, resource = line.partition(b"\t")
            groups.setdefault(pid, []).append(resource)
    for key, lines in groups.items():
        patient: JSONDict | None = None
        resources: list[JSONDict] = []
        for line in lines:
            resource = json.loads(line.decode())
            if resource.get("resourceType") == "Patient":
                patient = resource
            else:
                resources.append(resource)
        yield key.decode(), patient, resources


def read_shared(path: Path) -> list[JSONDict]:
    with open(path, "rb") as f:
        return [json.loads(line) for line in f if line.strip()]


def evaluate_bucket(task: BucketTask) -> tuple[int, int, int]:
    """Evaluate one bucket and commit it to the work directory; returns (index, patients,
    errors). Deterministic in its inputs: re-running it writes the same files."""
    trials = load_trials(task.trial_ids)  # cached per process: loaded once per worker
    shared = read_shared(task.shared)
    tally = Tally.for_trials(trials)
    outcomes: list[PatientOutcome] = []
    for pid, patient, resources in read_bucket(task.bucket):
        if patient is None:
            # Resources for a patient the export does not contain: nothing to evaluate.
            continue
        try:
            evaluation = evaluate_resources(
                [*resources, *shared], trials, task.as_of, patient=patient
            )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            outcome = error_outcome(f"Patient/{pid}", f"record unreadable: {exc!r}")
            tally.errors += 1
        else:
            outcome = outcome_of(evaluation)
            tally.add(evaluation)
        outcomes.append(outcome)
    WorkDir(task.out).write_partition(task.index, outcomes, tally)
    return task.index, tally.patients, tally.errors
