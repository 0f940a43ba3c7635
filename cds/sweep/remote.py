"""Sweeping a FHIR server: Bulk Data $export (downloaded, then swept as NDJSON) or REST
paging with the trial-derived queries per patient. Kept apart from :mod:`cds.sweep.runner` so
that an NDJSON sweep never imports the HTTP client stack."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cds.criteria import TrialSet
from cds.criteria.model import PatientEvaluation
from cds.criteria.reads import MEDICATION_TYPES, REFERENCED_TYPES
from cds.errors import FhirAuthError, FhirError, InputError
from cds.fhir.bulk import BulkExporter, group_member_ids, iter_search_pages
from cds.fhir.client import FhirClient
from cds.fhir.queries import (
    PatientQuery,
    build_patient_queries,
    check_patient_id,
    escape_token,
    fetch_patient_resources,
    referenced_reads,
)
from cds.sweep.core import PatientOutcome, Tally, error_outcome, evaluate_resources, outcome_of
from cds.sweep.ndjson import ndjson_files
from cds.sweep.progress import Progress
from cds.sweep.runner import Sweep, SweepOptions, sweep_files
from cds.sweep.store import write_json

log = logging.getLogger(__name__)

JSONDict = dict[str, Any]


def export_types(trials: TrialSet) -> tuple[str, ...]:
    """The resource types an export must hold: what the trial-derived queries read (so an
    export and a REST sweep see the same data), and the Medications their drugs may name."""
    queried = (query.resource_type for query in build_patient_queries(trials))
    return (*dict.fromkeys(queried), *REFERENCED_TYPES)


@dataclass
class RestOptions:
    """How to reach and walk a FHIR server."""

    concurrency: int = 4
    page_size: int = 100
    patients_per_partition: int = 100
    tag: tuple[str, str] | None = None
    group: str | None = None
    patient_ids: Sequence[str] = ()
    #: consecutive patient failures that mean the server itself is failing
    failure_streak: int = 20
    #: seconds one patient's fetch may take in all (every query, page and retry): a server
    #: trickling bytes makes that patient an error instead of stalling the sweep
    patient_deadline_s: float = 300.0
    queries: tuple[PatientQuery, ...] | None = field(default=None)


# -- Bulk $export -----------------------------------------------------------------------------


def sweep_export(
    exporter: BulkExporter,
    base_url: str,
    opts: SweepOptions,
    *,
    group: str | None = None,
) -> JSONDict:
    """Kick off ``$export`` (system or Group), download the NDJSON, and sweep it."""
    where = f"Group/{group}/$export" if group else "$export"
    source = {
        "key": f"export:{base_url}:{group or ''}",
        "description": f"Bulk Data {where} of {base_url}",
    }
    sweep = Sweep(opts, "export", source)
    export_dir = sweep.work.input / "export"

    def download() -> list[Path]:
        if not sweep.state.get("exported"):
            stream = opts.stream

            def note(message: str) -> None:
                if stream is not None:
                    stream.write(f"export: {message}\n")

            types = export_types(opts.trials)
            result = exporter.export(export_dir, types=types, group=group, progress=note)
            # A Group or Patient export holds the patient compartment, which a Medication
            # is not part of: the ones medication records name are read one by one.
            read_referenced(exporter.client, export_dir)
            sweep.state.update(
                exported=True,
                export={
                    "transaction_time": result.transaction_time,
                    "polls": result.polls,
                    "files": len(result.files),
                    "errors": result.errors,
                },
            )
            sweep.save()
        return ndjson_files(export_dir)

    return sweep_files(sweep, download)


def read_referenced(client: FhirClient, export_dir: Path) -> int:
    """Read the resources that exported records reference but the export lacks (a
    medication record's Medication) into ``referenced.ndjson``; how many were read."""
    resources: list[JSONDict] = []
    for path in sorted(export_dir.glob("*.ndjson")):
        stem = path.stem.split(".")[0].split("_")[0].split("-")[0]
        if stem not in MEDICATION_TYPES and stem not in REFERENCED_TYPES:
            continue
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    resource = json.loads(line)
                except ValueError:
                    continue  # the sweep reports unreadable lines itself
                if isinstance(resource, dict):
                    resources.append(resource)
    wanted = referenced_reads(resources)
    if wanted:
        with open(export_dir / "Medication.referenced.ndjson", "w", encoding="utf-8") as f:
            for rtype, rid in wanted:
                f.write(json.dumps(client.read(rtype, rid), separators=(",", ":")) + "\n")
    return len(wanted)


# -- FHIR REST --------------------------------------------------------------------------------


def list_patient_ids(client: FhirClient, rest: RestOptions) -> Iterator[str]:
    """The patients to sweep: the ids given, a Group's members, or every Patient (by _tag)."""
    if rest.patient_ids:
        yield from (check_patient_id(pid) for pid in dict.fromkeys(rest.patient_ids))
        return
    if rest.group:
        yield from group_member_ids(client, rest.group)
        return
    params = [("_count", str(rest.page_size))]
    if rest.tag is not None:
        params.append(("_tag", f"{escape_token(rest.tag[0])}|{escape_token(rest.tag[1])}"))
    for page in iter_search_pages(client, "Patient", params):
        for patient in page:
            if isinstance(patient.get("id"), str):
                yield patient["id"]


def sweep_rest(client: FhirClient, opts: SweepOptions, rest: RestOptions) -> JSONDict:
    """Page through the server's patients, fetch each one's data with the trial-derived
    queries (``concurrency`` patients at a time) and evaluate them as they arrive."""
    scope = (
        f"tag {rest.tag[0]}|{rest.tag[1]}"
        if rest.tag
        else f"Group/{rest.group}"
        if rest.group
        else f"{len(rest.patient_ids)} listed patients"
        if rest.patient_ids
        else "all patients"
    )
    source = {
        "key": f"rest:{client.base_url}:{scope}",
        "description": f"FHIR REST {client.base_url} ({scope})",
    }
    sweep = Sweep(opts, "rest", source)
    ids_path = sweep.work.input / "ids.json"
    partitions = int(sweep.state.get("partitions", 0))
    try:
        if not sweep.state["prepared"]:
            ids = list(dict.fromkeys(list_patient_ids(client, rest)))
            write_json(ids_path, ids)
            partitions = -(-len(ids) // rest.patients_per_partition)
            sweep.state.update(
                prepared=True,
                partitions=partitions,
                patients_total=len(ids),
                per_partition=rest.patients_per_partition,
                input={"patients": len(ids)},
            )
            sweep.save()
        with open(ids_path, encoding="utf-8") as f:
            ids = json.load(f)
        per = int(sweep.state["per_partition"])
        bar = opts.progress("sweeping", len(ids))
        bar.set(sweep.done_patients())
        _run_rest(client, sweep, rest, ids, per, partitions, bar)
        bar.close()
    except KeyboardInterrupt:
        sweep.finish(partitions, complete=False)
        raise
    except _Stopped as stop:
        # The server failed outright: keep what is done, so --resume can pick up from there,
        # and show the failures that stopped it in errors.ndjson.
        sweep.finish(partitions, complete=False, pending_errors=stop.errors)
        raise stop.error from None
    except FhirError:
        sweep.finish(partitions, complete=False)
        raise
    return sweep.finish(partitions, complete=True)


class _Stopped(Exception):
    """The REST sweep stopped (too many failures in a row), with the errors not yet saved."""

    def __init__(self, error: FhirError, errors: list[JSONDict]) -> None:
        self.error = error
        self.errors = errors


def _run_rest(
    client: FhirClient,
    sweep: Sweep,
    rest: RestOptions,
    ids: list[str],
    per: int,
    partitions: int,
    bar: Progress,
) -> None:
    trials = sweep.opts.trials
    as_of = sweep.as_of
    queries = rest.queries or build_patient_queries(trials)
    todo = [i for i in range(partitions) if i not in sweep.work.done()]

    # Each patient's outcome, and its evaluation to tally (None when it could not be had).
    def one(pid: str) -> tuple[PatientOutcome, PatientEvaluation | None]:
        try:
            # One deadline for all of this patient's requests, retries included.
            with client.deadline_in(rest.patient_deadline_s):
                fetched = fetch_patient_resources(
                    client,
                    pid,
                    trials,
                    concurrency=1,
                    page_size=rest.page_size,
                    tag=rest.tag,
                    queries=queries,
                    incomplete_on_refusal=True,
                )
        except FhirAuthError:
            raise
        except (FhirError, InputError) as exc:
            # A failed search (an error OperationOutcome) lands here too: the patient is an
            # error in errors.ndjson, never "no data on record". (A search the server refuses
            # outright, a 4xx, is left incomplete instead: see incomplete_on_refusal.)
            return error_outcome(f"Patient/{pid}", f"{type(exc).__name__}: {exc}"), None
        try:
            evaluation = evaluate_resources(
                fetched.resources,
                trials,
                as_of,
                warnings=fetched.warnings,
                incomplete=fetched.incomplete,
            )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            return error_outcome(f"Patient/{pid}", f"record unreadable: {exc!r}"), None
        return outcome_of(evaluation), evaluation

    def work() -> Iterator[tuple[int, int, str]]:
        for index in todo:
            chunk = ids[index * per : (index + 1) * per]
            for position, pid in enumerate(chunk):
                yield index, position, pid

    slots: dict[int, list[PatientOutcome | None]] = {
        i: [None] * len(ids[i * per : (i + 1) * per]) for i in todo
    }
    tallies = {i: Tally.for_trials(trials) for i in todo}
    streak = 0
    last_error = ""
    pool = ThreadPoolExecutor(max_workers=rest.concurrency, thread_name_prefix="sweep")
    running: dict[Future[tuple[PatientOutcome, PatientEvaluation | None]], tuple[int, int]] = {}
    feed = work()
    interrupted = False
    try:
        while True:
            while len(running) < rest.concurrency * 2:
                item = next(feed, None)
                if item is None:
                    break
                index, position, pid = item
                running[pool.submit(one, pid)] = (index, position)
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                index, position = running.pop(future)
                outcome, evaluation = future.result()  # FhirAuthError ends the sweep
                if evaluation is not None:
                    tallies[index].add(evaluation)
                else:
                    tallies[index].errors += 1
                slot = slots[index]
                slot[position] = outcome
                if outcome.error is not None:
                    streak += 1
                    last_error = outcome.error
                    if streak >= rest.failure_streak:
                        error = FhirError(
                            f"{client.base_url} is failing: {streak} patients in a row could "
                            f"not be fetched (last: {last_error}); stopped, what was done is "
                            "saved (--resume continues; errors.ndjson lists the failures)"
                        )
                        pending = [
                            {"patient": o.patient, "error": o.error}
                            for s in slots.values()
                            for o in s
                            if o is not None and o.error is not None
                        ]
                        raise _Stopped(error, pending)
                else:
                    streak = 0
                bar.advance()
                if all(o is not None for o in slot):
                    outcomes = [o for o in slot if o is not None]
                    sweep.work.write_partition(index, outcomes, tallies.pop(index))
                    del slots[index]
    except BaseException:
        interrupted = True
        raise
    finally:
        if interrupted:
            # Ctrl-C or a stop: cut the requests in flight and refuse new ones while the
            # threads wind down (a trickling server would otherwise hold a thread, and this
            # shutdown, for as long as it likes). Queued fetches are dropped.
            with client.interrupted():
                pool.shutdown(wait=True, cancel_futures=True)
        else:
            pool.shutdown(wait=True, cancel_futures=True)


__all__ = ["RestOptions", "export_types", "list_patient_ids", "sweep_export", "sweep_rest"]
