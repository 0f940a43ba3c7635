"""Running a sweep: partitions out to workers, results committed per partition, resumable.

The NDJSON front of a sweep lives here; a FHIR server's (REST paging, Bulk $export) in
:mod:`cds.sweep.remote`, which feeds the same machinery and is imported only when used.
"""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, TextIO

from cds.criteria import TrialSet, load_trials
from cds.errors import InputError
from cds.sweep.core import Tally
from cds.sweep.ndjson import (
    BucketTask,
    CodePrefilter,
    choose_buckets,
    evaluate_bucket,
    evaluate_partition,
    ndjson_files,
    partition_ndjson,
    read_spans,
)
from cds.sweep.progress import Progress
from cds.sweep.report import build_summary, report_html, summary_text
from cds.sweep.store import WorkDir, atomic_open, encode_partition, write_json

log = logging.getLogger(__name__)

JSONDict = dict[str, Any]


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


class Sweep:
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

    def done_patients(self) -> int:
        """Patients (evaluated or failed) in the partitions done so far."""
        tallies = (marker["tally"] for marker in self.work.markers(self.work.done()))
        return sum(int(t["patients"]) + int(t["errors"]) for t in tallies)

    def finish(
        self, partitions: int, *, complete: bool, pending_errors: Sequence[JSONDict] = ()
    ) -> JSONDict:
        """Write results.ndjson, candidates.csv, errors.ndjson, summary.json and report.html
        from the partitions done so far (all of them when ``complete``). ``pending_errors``
        ({"patient", "error"} of patients in partitions not committed) go to errors.ndjson
        too, so a sweep stopped by failures shows them."""
        done = self.work.done() & set(range(partitions))
        complete = complete and len(done) == partitions
        markers = self.work.markers(done)  # read once, for the outputs, tally and samples
        extra = "".join(json.dumps(e) + "\n" for e in pending_errors).encode()
        self.work.assemble(markers, complete=complete, extra_errors=extra)
        tally = Tally.for_trials(self.opts.trials)
        for marker in markers:
            tally.merge(Tally.from_json(marker["tally"]))
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
            "error_samples": (self.work.error_samples(markers) + list(pending_errors))[:20],
        }
        summary = build_summary(tally, self.opts.trials, meta)
        # "complete" says every partition was done; "status" also says whether every patient
        # was evaluated: a failed search is a patient error, never a silent "not eligible".
        summary["status"] = (
            "incomplete" if not complete else "complete-with-errors" if tally.errors else "complete"
        )
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
    _end_with_parent()
    quiet_gc()


#: how often a worker checks that its parent still runs, seconds
PARENT_CHECK_INTERVAL = 0.5


def _end_with_parent() -> None:
    """A worker whose parent was killed (SIGKILL, OOM killer) ends too, instead of waiting
    forever on a task queue no one feeds. Polling the parent id is portable, and unlike
    Linux's PR_SET_PDEATHSIG it is not tied to the thread that forked the worker (the pool
    re-forks workers from its own handler thread)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(PARENT_CHECK_INTERVAL)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def quiet_gc() -> None:
    """Fewer garbage-collector passes. A sweep allocates millions of short-lived, acyclic
    dicts (reference counting frees them), and with the default thresholds the collector
    rescans the long-lived trial definitions over and over: measured, it doubled the time of
    parsing plus evaluating. Freezing moves what exists now out of the collector's sight."""
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)


@contextmanager
def _quiet_gc_here() -> Iterator[None]:
    """quiet_gc for the calling process, undone afterwards (the inline, one-worker path)."""
    before = gc.get_threshold()
    quiet_gc()
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def _run_buckets(sweep: Sweep, buckets: int, progress: Progress) -> None:
    opts = sweep.opts
    done = sweep.work.done()
    spans = read_spans(sweep.work)
    tasks = [
        BucketTask(
            i,
            sweep.work.input / f"b{i:05d}.ndjson",
            sweep.work.input / "shared.ndjson",
            opts.out,
            opts.trials.ids,
            sweep.as_of,
            tuple(spans[i]) if spans is not None else None,
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
    sweep = Sweep(opts, "ndjson", source)
    return sweep_files(sweep, lambda: ndjson_files(directory))


def sweep_files(sweep: Sweep, files: Callable[[], list[Path]]) -> JSONDict:
    opts = sweep.opts
    buckets = int(sweep.state.get("buckets", 0))
    try:
        if not sweep.state["prepared"]:
            found = files()
            buckets = choose_buckets(found, max(opts.workers, 1))
            for old in sweep.work.input.glob("b*.ndjson"):
                old.unlink()
            (sweep.work.input / "spans.json").unlink(missing_ok=True)
            total = sum(p.stat().st_size for p in found)
            bar = opts.progress("partitioning", total, unit="bytes")
            stats = partition_ndjson(
                found,
                sweep.work,
                buckets,
                progress=bar.set,
                keep=CodePrefilter(opts.trials),
                workers=opts.workers,
                worker_init=_worker_init,  # as the evaluation's workers
            )
            bar.close()
            sweep.state.update(
                prepared=True, buckets=buckets, input=stats.to_json(), patients_total=stats.patients
            )
            sweep.save()
        done_patients = sweep.done_patients()
        bar = opts.progress("evaluating", sweep.state.get("patients_total"))
        bar.set(done_patients)
        _run_buckets(sweep, buckets, bar)
        bar.close()
    except KeyboardInterrupt:
        sweep.finish(buckets, complete=False)
        raise
    return sweep.finish(buckets, complete=True)


def print_summary(summary: JSONDict, stream: TextIO) -> None:
    stream.write(summary_text(summary))


__all__ = [
    "Sweep",
    "SweepOptions",
    "load_trials",
    "print_summary",
    "sweep_files",
    "sweep_ndjson",
]
