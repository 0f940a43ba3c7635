"""Running a sweep: partitions out to workers, results committed per partition, resumable."""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, TextIO

from cds.criteria import TrialSet, load_trials
from cds.errors import FhirAuthError, FhirError, InputError
from cds.fhir.bulk import BulkExporter, group_member_ids, iter_search_pages
from cds.fhir.client import FhirClient
from cds.fhir.queries import (
    PatientQuery,
    build_patient_queries,
    check_patient_id,
    escape_token,
    fetch_patient_resources,
)
from cds.sweep.core import PatientOutcome, Tally, error_outcome, evaluate_resources, outcome_of
from cds.sweep.ndjson import (
    BucketTask,
    CodePrefilter,
    choose_buckets,
    evaluate_bucket,
    evaluate_partition,
    ndjson_files,
    partition_ndjson,
)
from cds.sweep.progress import Progress
from cds.sweep.report import build_summary, report_html, summary_text
from cds.sweep.store import WorkDir, atomic_open, encode_partition, write_json

log = logging.getLogger(__name__)

JSONDict = dict[str, Any]

#: the resource types a sweep needs from an export (what the trial-derived queries read)
EXPORT_TYPES = (
    "Patient",
    "Condition",
    "Procedure",
    "Observation",
    "MedicationRequest",
    "MedicationStatement",
    "MedicationAdministration",
    "Medication",
)


@dataclass
class SweepOptions:
    """What every sweep needs, whatever the source."""

    out: Path
    trials: TrialSet
    as_of: date | None
    resume: bool = False
    workers: int = 1
    stream: TextIO | None = None
    tty: bool | None = None
    progress_interval: float = 10.0

    def progress(self, label: str, total: int | None, unit: str = "patients") -> Progress:
        return Progress(
            label,
            total,
            unit=unit,
            stream=self.stream,
            tty=self.tty,
            interval=self.progress_interval,
        )


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
    queries: tuple[PatientQuery, ...] | None = field(default=None)


class _Sweep:
    """One sweep's bookkeeping: the work directory, its checkpoint, and the final files."""

    def __init__(self, opts: SweepOptions, kind: str, source: JSONDict) -> None:
        self.opts = opts
        self.work = WorkDir(opts.out)
        identity = {"kind": kind, "source": source.get("key"), "trials": list(opts.trials.ids)}
        saved = self.work.start(opts.resume, identity)
        if saved is not None:
            saved_as_of = date.fromisoformat(saved["as_of"])
            if opts.as_of is not None and opts.as_of != saved_as_of:
                raise InputError(
                    f"the interrupted sweep ran as of {saved_as_of}; a resumed sweep must too",
                    source="--as-of",
                )
            self.as_of = saved_as_of
            self.state: JSONDict = saved
            self.state["complete"] = False
        else:
            self.as_of = opts.as_of or date.today()
            self.state = {
                "identity": identity,
                "as_of": self.as_of.isoformat(),
                "source": source,
                "prepared": False,
                "complete": False,
                "elapsed": 0.0,
            }
            self.work.save_state(self.state)
        self.started = time.monotonic()

    def save(self) -> None:
        self.work.save_state(self.state)

    def finish(self, partitions: int, *, complete: bool) -> JSONDict:
        """Write results.ndjson, candidates.csv, errors.ndjson, summary.json and report.html
        from the partitions done so far (all of them when ``complete``)."""
        done = self.work.done() & set(range(partitions))
        complete = complete and len(done) == partitions
        self.work.assemble(done, complete=complete)
        tally = self.work.merged_tally(Tally.for_trials(self.opts.trials), done)
        self.state["elapsed"] = self.state.get("elapsed", 0.0) + time.monotonic() - self.started
        self.started = time.monotonic()
        self.state["complete"] = complete
        meta = {
            "as_of": self.as_of.isoformat(),
            "complete": complete,
            "source": self.state["source"],
            "partitions": {"done": len(done), "total": partitions},
            "input": self.state.get("input", {}),
            "elapsed_seconds": round(self.state["elapsed"], 3),
            "error_samples": self.work.error_samples(done),
        }
        summary = build_summary(tally, self.opts.trials, meta)
        write_json(self.opts.out / "summary.json", summary)
        with atomic_open(self.opts.out / "report.html") as f:
            f.write(report_html(summary))
        self.save()
        if complete:
            self.work.clean_inputs()
        return summary


def _worker_init() -> None:
    # Workers leave Ctrl-C to the parent, which stops them once it has saved what is done.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _quiet_gc()


def _quiet_gc() -> None:
    """Fewer garbage-collector passes. A sweep allocates millions of short-lived, acyclic
    dicts (reference counting frees them), and with the default thresholds the collector
    rescans the long-lived trial definitions over and over: measured, it doubled the time of
    parsing plus evaluating. Freezing moves what exists now out of the collector's sight."""
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)


@contextmanager
def _quiet_gc_here() -> Iterator[None]:
    """_quiet_gc for the calling process, undone afterwards (the inline, one-worker path)."""
    before = gc.get_threshold()
    _quiet_gc()
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def _run_buckets(sweep: _Sweep, buckets: int, progress: Progress) -> None:
    opts = sweep.opts
    done = sweep.work.done()
    tasks = [
        BucketTask(
            i,
            sweep.work.input / f"b{i:05d}.ndjson",
            sweep.work.input / "shared.ndjson",
            opts.out,
            opts.trials.ids,
            sweep.as_of,
        )
        for i in range(buckets)
        if i not in done
    ]
    if opts.workers <= 1:
        with _quiet_gc_here():
            _run_inline(sweep.work, tasks, progress)
        return
    # fork: workers inherit the loaded trial definitions; each still calls load_trials(),
    # which is cached per process, so a spawned (or remote) worker loads them once too.
    context = multiprocessing.get_context("fork")
    pool = context.Pool(opts.workers, initializer=_worker_init)
    try:
        for _, patients, errors in pool.imap_unordered(evaluate_bucket, tasks):
            progress.advance(patients + errors)
        pool.close()
    except BaseException:
        # Ctrl-C or a worker's crash: committed partitions stay; the rest is redone on resume.
        pool.terminate()
        raise
    finally:
        pool.join()


#: encoded partitions waiting for the committer at most (each is a few MB in memory)
_MAX_PENDING_COMMITS = 2


def _run_inline(work: WorkDir, tasks: list[BucketTask], progress: Progress) -> None:
    """Evaluate the buckets in this process, their outputs appended to one segment (so the
    outputs of a sweep run in one go need no copying). Committing a partition is mostly
    waiting on the disk (writes, fsync), so one background thread commits each partition, in
    order and with its marker last as always, while the next one is evaluated. Leaving the
    block (done, or Ctrl-C) waits for every evaluated partition to be committed."""
    if not tasks:
        return
    with (
        work.segment(tasks[0].index) as segment,
        ThreadPoolExecutor(1, thread_name_prefix="sweep-commit") as committer,
    ):
        pending: list[Future[None]] = []
        for task in tasks:
            outcomes, tally = evaluate_partition(task)
            pending.append(
                committer.submit(segment.commit, task.index, encode_partition(outcomes), tally)
            )
            del outcomes
            progress.advance(tally.patients + tally.errors)
            while len(pending) > _MAX_PENDING_COMMITS or (pending and pending[0].done()):
                pending.pop(0).result()  # re-raises a failed commit here
        for commit in pending:
            commit.result()


def sweep_ndjson(
    directory: Path, opts: SweepOptions, *, source: JSONDict | None = None
) -> JSONDict:
    """Sweep a directory of NDJSON files (a Bulk export, or the generator's output)."""
    directory = directory.resolve()
    source = source or {"key": f"ndjson:{directory}", "description": f"NDJSON files in {directory}"}
    sweep = _Sweep(opts, "ndjson", source)
    return _sweep_files(sweep, lambda: ndjson_files(directory))


def _sweep_files(sweep: _Sweep, files: Callable[[], list[Path]]) -> JSONDict:
    opts = sweep.opts
    buckets = int(sweep.state.get("buckets", 0))
    try:
        if not sweep.state["prepared"]:
            found = files()
            buckets = choose_buckets(found, max(opts.workers, 1))
            for old in sweep.work.input.glob("b*.ndjson"):
                old.unlink()
            total = sum(p.stat().st_size for p in found)
            bar = opts.progress("partitioning", total, unit="bytes")
            stats = partition_ndjson(
                found,
                sweep.work,
                buckets,
                progress=bar.set,
                keep=CodePrefilter(opts.trials),
            )
            bar.close()
            sweep.state.update(
                prepared=True, buckets=buckets, input=stats.to_json(), patients_total=stats.patients
            )
            sweep.save()
        done_patients = _done_patients(sweep)
        bar = opts.progress("evaluating", sweep.state.get("patients_total"))
        bar.set(done_patients)
        _run_buckets(sweep, buckets, bar)
        bar.close()
    except KeyboardInterrupt:
        sweep.finish(buckets, complete=False)
        raise
    return sweep.finish(buckets, complete=True)


def _done_patients(sweep: _Sweep) -> int:
    total = 0
    for index in sweep.work.done():
        data = sweep.work.marker(index)["tally"]
        total += int(data["patients"]) + int(data["errors"])
    return total


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
    sweep = _Sweep(opts, "export", source)
    export_dir = sweep.work.input / "export"

    def download() -> list[Path]:
        if not sweep.state.get("exported"):
            stream = opts.stream

            def note(message: str) -> None:
                if stream is not None:
                    stream.write(f"export: {message}\n")

            result = exporter.export(export_dir, types=EXPORT_TYPES, group=group, progress=note)
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

    return _sweep_files(sweep, download)


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
    sweep = _Sweep(opts, "rest", source)
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
        bar.set(_done_patients(sweep))
        _run_rest(client, sweep, rest, ids, per, partitions, bar)
        bar.close()
    except KeyboardInterrupt:
        sweep.finish(partitions, complete=False)
        raise
    except FhirError:
        # The server failed outright: keep what is done, so --resume can pick up from there.
        sweep.finish(partitions, complete=False)
        raise
    return sweep.finish(partitions, complete=True)


def _run_rest(
    client: FhirClient,
    sweep: _Sweep,
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

    def one(pid: str) -> PatientOutcome:
        try:
            fetched = fetch_patient_resources(
                client,
                pid,
                trials,
                concurrency=1,
                page_size=rest.page_size,
                tag=rest.tag,
                queries=queries,
            )
        except FhirAuthError:
            raise
        except FhirError as exc:
            return error_outcome(f"Patient/{pid}", f"{type(exc).__name__}: {exc}")
        try:
            evaluation = evaluate_resources(
                fetched.resources, trials, as_of, warnings=fetched.warnings
            )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            return error_outcome(f"Patient/{pid}", f"record unreadable: {exc!r}")
        return outcome_of(evaluation)

    def work() -> Iterator[tuple[int, int, str]]:
        for index in todo:
            chunk = ids[index * per : (index + 1) * per]
            for position, pid in enumerate(chunk):
                yield index, position, pid

    slots: dict[int, list[PatientOutcome | None]] = {
        i: [None] * len(ids[i * per : (i + 1) * per]) for i in todo
    }
    streak = 0
    last_error = ""
    pool = ThreadPoolExecutor(max_workers=rest.concurrency, thread_name_prefix="sweep")
    running: dict[Future[PatientOutcome], tuple[int, int]] = {}
    feed = work()
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
                outcome = future.result()  # FhirAuthError ends the sweep
                if outcome.error is not None:
                    streak += 1
                    last_error = outcome.error
                    if streak >= rest.failure_streak:
                        raise FhirError(
                            f"{client.base_url} is failing: {streak} patients in a row could "
                            f"not be fetched (last: {last_error}); stopped, what was done is "
                            "saved (--resume continues)"
                        )
                else:
                    streak = 0
                bar.advance()
                slot = slots[index]
                slot[position] = outcome
                if all(o is not None for o in slot):
                    _commit(sweep, trials, index, [o for o in slot if o is not None])
                    del slots[index]
    finally:
        # Queued fetches are dropped; the ones running finish (a request or two each).
        pool.shutdown(wait=True, cancel_futures=True)


def _commit(sweep: _Sweep, trials: TrialSet, index: int, outcomes: list[PatientOutcome]) -> None:
    tally = Tally.for_trials(trials)
    for outcome in outcomes:
        if outcome.evaluation is not None:
            tally.add(outcome.evaluation)
        else:
            tally.errors += 1
    sweep.work.write_partition(index, outcomes, tally)


def print_summary(summary: JSONDict, stream: TextIO) -> None:
    stream.write(summary_text(summary))


__all__ = [
    "EXPORT_TYPES",
    "RestOptions",
    "SweepOptions",
    "load_trials",
    "print_summary",
    "sweep_export",
    "sweep_ndjson",
    "sweep_rest",
]
