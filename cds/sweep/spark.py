"""`cds sweep --engine spark`: the NDJSON sweep on Apache Spark, for more patients than one
machine holds.

The same steps as the single-machine sweep (:mod:`cds.sweep.ndjson`), as one Spark job:

1. map: each task reads a byte range of one input file (the lines that start in it), routes
   every line by the NDJSON sweep's own rule (``Partition``: prefilter, patient id,
   ``bucket_of``) and emits, per bucket, one chunk of ``patient TAB line`` bytes keyed by the
   bucket; plus, to an extra partition, its counts and its Medication lines;
2. shuffle: ``partitionBy`` on the bucket (a few large chunks, not a record per line);
3. the extra partition is collected first (counts and the Medication catalogue, which every
   patient reads, as in the single-machine sweep); Spark keeps the map output, so the map
   stage runs once;
4. reduce: each bucket's chunks in input order (sorted by map task), grouped per patient
   (``group_lines``) and evaluated by ``evaluate_patients``, the function the single-machine
   sweep runs; each task writes its part files and returns its tally as data (not an
   accumulator: a retried task would count twice).

The driver holds tallies, the map tasks' counts and the Medication catalogue, never a
population. Task failures are retried by Spark; a part file is written under a temporary name
and renamed, so a retried or speculative task rewrites the same bytes.

PySpark is an optional extra (``pip install 'cds-trial-screening[spark]'``), imported only here.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import IO, Any, TextIO

from cds.criteria import TrialSet, load_trials
from cds.errors import InputError, OutputError
from cds.evaluate_command import parse_as_of
from cds.sweep.core import Tally
from cds.sweep.ndjson import (
    BLOCK_BYTES,
    BUCKET_BYTES,
    MAX_BUCKETS,
    ByteRange,
    CodePrefilter,
    Partition,
    PartitionStats,
    byte_ranges,
    evaluate_patients,
    file_order,
    group_lines,
    ndjson_files,
    read_range,
)
from cds.sweep.report import build_summary, report_html, summary_text
from cds.sweep.spark_output import (
    DEFAULT_ASSEMBLE_LIMIT,
    PARQUET,
    PART_KINDS,
    PARTS,
    HadoopOutput,
    LocalOutput,
    SweepOutput,
    assemble,
    check_out,
    is_url,
    java_message,
    parse_size,
)
from cds.sweep.store import EncodedPartition, atomic_open, encode_partition, json_text

JSONDict = dict[str, Any]

#: the input is read in byte ranges of about this size (one map task each)
SPLIT_BYTES = 64 << 20


@dataclass
class SparkOptions:
    #: a local directory (every executor must see it) or a Hadoop filesystem URL
    out: Path | str
    trials: TrialSet
    as_of: date | None
    #: None: spark-submit's --master when run by spark-submit, else local[*]
    master: str | None = None
    conf: list[tuple[str, str]] = field(default_factory=list)
    overwrite: bool = False
    #: buckets (reduce partitions); default from the input size, as the NDJSON sweep
    buckets: int | None = None
    #: results.ndjson is assembled from its part files only up to this many bytes
    assemble_limit: int = DEFAULT_ASSEMBLE_LIMIT
    #: also the per-patient results as a Parquet dataset (results.parquet/)
    parquet: bool = False


def parse_conf(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key.strip(), value


def spark_conf_pairs(master: str, conf: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The Spark configuration of a sweep: no UI; a local master's driver bound to loopback
    (nothing listens beyond the machine); the user's own settings last, so they win."""
    pairs = [
        ("spark.app.name", "cds sweep"),
        ("spark.ui.enabled", "false"),
        ("spark.ui.showConsoleProgress", "false"),  # the command prints its own summary
        ("spark.log.level", "ERROR"),
        # Python workers stay up between tasks, so trials are loaded once per worker.
        ("spark.python.worker.reuse", "true"),
    ]
    if master.startswith("local"):
        pairs += [
            ("spark.driver.host", "127.0.0.1"),
            ("spark.driver.bindAddress", "127.0.0.1"),
            # The JVM only moves bytes here (the shuffle, the Python workers' streams): its
            # C2 compiler's work did not pay back. Measured (the JVM's CPU seconds after
            # start-up): 18.4 -> 11.6 at 100,000 patients on local[2], 6.2 -> 3.2 at 10,000
            # on local[1].
            # Not for a cluster's executors, which run long. A user's own setting wins.
            ("spark.driver.extraJavaOptions", "-XX:TieredStopAtLevel=1"),
        ]
    return pairs + list(conf)


def start_spark(master: str | None, conf: list[tuple[str, str]]) -> Any:
    try:
        from pyspark import SparkConf, SparkContext
    except ImportError as exc:
        raise InputError(
            "PySpark is not installed; install the extra: pip install 'cds-trial-screening[spark]'",
            source="--engine",
        ) from exc
    # py4j logs each connection at INFO, which `cds -v` aside is noise on the terminal.
    logging.getLogger("py4j").setLevel(logging.WARNING)
    # The Python workers must import cds: the interpreter running this command has it (on a
    # cluster, set PYSPARK_PYTHON to an environment with the cds wheel installed).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    if master is None and "PYSPARK_GATEWAY_PORT" in os.environ:
        # Run by spark-submit (it starts the JVM and says where): its --master and --conf
        # are in the JVM's configuration already; only ours are added.
        spark_conf = SparkConf()
        for key, value in spark_conf_pairs("", conf):
            spark_conf.set(key, value)
        return SparkContext.getOrCreate(spark_conf)
    master = master or "local[*]"
    if master.startswith("local"):
        # Spark otherwise looks up the host's outward address (and warns when the host name
        # resolves to loopback); a local sweep has nothing to reach beyond the machine.
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    spark_conf = SparkConf().setMaster(master)
    for key, value in spark_conf_pairs(master, conf):
        spark_conf.set(key, value)
    return SparkContext.getOrCreate(spark_conf)


# -- the tasks (run in the Python workers) -----------------------------------------------


@functools.cache
def _worker_setup(trial_ids: tuple[str, ...]) -> CodePrefilter:
    """Once per Python worker: the trials and the prefilter loaded, then the single-machine
    sweep's garbage-collector settings (its workers' own: the long-lived definitions frozen
    out of the collector's sight, which measured there halves parsing plus evaluating)."""
    from cds.sweep.runner import quiet_gc

    keep = CodePrefilter(load_trials(trial_ids))
    quiet_gc()
    keep_zip_directories()
    return keep


#: the archives Spark puts on every Python worker's path: PySpark itself, py4j and Spark's
#: core jar ($SPARK_HOME/python/lib/pyspark.zip, py4j-*-src.zip, jars/spark-core_*.jar)
_SPARK_ARCHIVES = re.compile(r"(pyspark|py4j-[0-9.]+-src)\.zip|spark-core_[0-9.]+-[^/]+\.jar")


def keep_zip_directories() -> None:
    """Stop Spark's own archives on the worker's path being read again before every task.

    PySpark's worker calls ``importlib.invalidate_caches()`` at the start of each task
    (pyspark/worker_util.py, ``setup_spark_files``), and Python's ``zipimporter`` answers by
    reading its archive's whole directory again (Lib/zipimport.py, ``invalidate_caches``, to
    3.12 at least), once per package imported from it: pyspark.zip and the spark-core jar
    list thousands of files, and a worker has a dozen importers on them. Measured at 10,000
    patients on local[1], that was 24% of the Python worker's CPU (py-spy). These archives
    are the installed Spark, which does not change while a worker lives, so their
    directories are kept; any other archive (a --py-files one) is read again as before."""
    import zipimport

    invalidate = zipimport.zipimporter.invalidate_caches
    if getattr(invalidate, "keeps_spark_archives", False):
        return

    def invalidate_caches(self: zipimport.zipimporter) -> None:
        if not _SPARK_ARCHIVES.fullmatch(Path(self.archive).name):
            invalidate(self)

    invalidate_caches.keeps_spark_archives = True  # type: ignore[attr-defined]
    zipimport.zipimporter.invalidate_caches = invalidate_caches  # type: ignore[method-assign]


def route_task(
    tasks: Iterable[tuple[int, ByteRange]], buckets: int, trial_ids: tuple[str, ...]
) -> Iterator[tuple[int, Any]]:
    """Map, for local files: route the lines of byte ranges (read by the worker itself) by the
    NDJSON sweep's rule. Yields (bucket, (task, chunk)) per bucket that got lines, and
    (``buckets``, (task, counts, Medication lines))."""
    keep = _worker_setup(trial_ids)
    for index, piece in tasks:
        where = (piece.path, piece.start)
        yield from _route_blocks(index, read_range(piece), buckets, keep, where)


def route_lines(
    index: int, lines: Iterable[bytes], buckets: int, trial_ids: tuple[str, ...], source: str
) -> Iterator[tuple[int, Any]]:
    """Map, for input Spark reads (any URL): a split's lines (without their newlines), put back
    into blocks of whole lines and routed as :func:`route_task` routes a byte range."""
    keep = _worker_setup(trial_ids)
    # Line numbers in reports count from the split's start (Spark does not say where it lies)
    where = (f"{source} (Spark input split {index})", 0)
    yield from _route_blocks(index, _blocks(lines), buckets, keep, where)


def _blocks(lines: Iterable[bytes]) -> Iterator[bytes]:
    block: list[bytes] = []
    size = 0
    for line in lines:
        block.append(line)
        size += len(line) + 1
        if size >= BLOCK_BYTES:
            yield b"\n".join(block) + b"\n"
            block, size = [], 0
    if block:
        yield b"\n".join(block) + b"\n"


def _route_blocks(
    index: int,
    blocks: Iterable[bytes],
    buckets: int,
    keep: CodePrefilter,
    where: tuple[str, int],
) -> Iterator[tuple[int, Any]]:
    started = time.process_time()
    handles = [io.BytesIO() for _ in range(buckets)]
    shared = io.BytesIO()
    partition = Partition(list[IO[bytes]](handles), shared, keep)
    partition.start(*where)
    for block in blocks:
        partition.stats.bytes += len(block)
        partition.block(block)
    cpu = time.process_time() - started  # reading and routing: this task's own work
    for bucket, handle in enumerate(handles):
        if handle.tell():
            yield bucket, (index, handle.getvalue())
    yield buckets, (index, _stats_json(partition.stats), shared.getvalue(), cpu)


def _stats_json(stats: PartitionStats) -> JSONDict:
    data = stats.to_json()
    data["bytes"] = stats.bytes
    return data


def _stats_from_json(data: JSONDict) -> PartitionStats:
    return PartitionStats(
        lines=data["lines"],
        patients=data["patients"],
        resources=data["resources"],
        shared=data["shared_medications"],
        skipped_types=dict(data["skipped_types"]),
        unreadable=data["unreadable_lines"],
        non_resource=data["non_resource_lines"],
        orphans=data["resources_naming_no_patient"],
        bytes=data["bytes"],
        irrelevant=data["irrelevant_resources"],
    )


def values(items: Iterable[tuple[int, Any]]) -> Iterator[Any]:
    for _, value in items:
        yield value


#: error lines a task returns to the driver at most, for summary.json's samples
_ERROR_SAMPLES = 20


def evaluate_bucket(
    index: int,
    items: Iterable[tuple[int, Any]],
    shared_lines: Any,
    trial_ids: tuple[str, ...],
    as_of: date,
) -> tuple[EncodedPartition, JSONDict]:
    """Reduce: one bucket's patients evaluated by the single-machine sweep's function; its
    output bytes, and its tally as data."""
    _worker_setup(trial_ids)
    started = time.process_time()
    chunks = sorted(value for _, value in items)  # (map task, bytes): input order
    received = time.process_time()
    lines = io.BytesIO(b"".join(chunk for _, chunk in chunks))
    del chunks
    trials = load_trials(trial_ids)
    shared = [json.loads(line) for line in shared_lines.value]
    outcomes, tally = evaluate_patients(group_lines(lines), shared, trials, as_of)
    encoded = encode_partition(outcomes)
    del outcomes
    samples = [json.loads(line) for line in encoded.errors.splitlines()[:_ERROR_SAMPLES]]
    cpu = {"receive": received - started, "evaluate": time.process_time() - received}
    return encoded, {"index": index, "tally": tally.to_json(), "error_samples": samples, "cpu": cpu}


def evaluate_task(
    index: int,
    items: Iterable[tuple[int, Any]],
    buckets: int,
    shared_lines: Any,
    trial_ids: tuple[str, ...],
    as_of: date,
    out: LocalOutput,
) -> Iterator[JSONDict]:
    """Reduce, for a local output: the bucket's part files written by the task itself (under a
    temporary name, renamed: a retried task rewrites the same bytes); its tally returned."""
    if index >= buckets:
        return
    encoded, tally = evaluate_bucket(index, items, shared_lines, trial_ids, as_of)
    for kind, data in encoded.files():
        with atomic_open(out.part_path(kind, index), "wb", durable=False) as f:
            f.write(data)
    yield tally


#: the record of a task's tally among its part files' records (no kind is named so)
TALLY = "tally"


def evaluate_records(
    index: int,
    items: Iterable[tuple[int, Any]],
    buckets: int,
    shared_lines: Any,
    trial_ids: tuple[str, ...],
    as_of: date,
) -> Iterator[tuple[str, Any]]:
    """Reduce, for a URL output: the bucket's part files as records (kind, bytes) that Spark
    writes, and its tally as (TALLY, tally). Spark's text writer ends each record with a
    newline, so a part's last newline is left off here (and an empty part gives no record)."""
    if index >= buckets:
        return
    encoded, tally = evaluate_bucket(index, items, shared_lines, trial_ids, as_of)
    yield TALLY, tally
    for kind, data in encoded.files():
        if data:
            yield kind, data[:-1]


def _of_kind(kind: str, record: tuple[str, Any]) -> bool:
    return record[0] == kind


def _identity(key: int) -> int:
    return key


def _collect(rdd: Any, partitions: list[int] | None = None) -> list[Any]:
    """``rdd.collect()``, or of only some partitions. PySpark reads the result from a local
    socket that it leaves to the garbage collector to close (pyspark/util.py,
    _load_from_socket: "The socket will be automatically closed when garbage-collected"),
    which warns as a ResourceWarning: not ours to fix, so not shown."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        if partitions is None:
            return list(rdd.collect())
        return list(rdd.context.runJob(rdd, values, partitions))


# -- the driver ---------------------------------------------------------------------------


def sweep_spark(path: str, opts: SparkOptions, *, context: Any = None) -> JSONDict:
    """Sweep a directory of NDJSON files on Spark; returns summary.json's content. ``path``: a
    local directory (Python workers read byte ranges of its files: every executor must see
    it, locally or on a shared mount) or a URL Spark reads (``hdfs://``, ``s3a://`` with the
    user's Spark configuration, ``file://``); ``opts.out`` likewise (:mod:`spark_output`).
    With ``context``, that SparkContext is used (and left running); else one is started from
    ``opts`` and stopped at the end."""
    started = time.monotonic()
    local = None if is_url(path) else Path(path).resolve()
    local_files = ndjson_files(local) if local is not None else []
    out: SweepOutput | None = None
    existing: list[str] = []
    if not is_url(str(opts.out)):
        # Refused before Spark starts, where no JVM is needed to look; resolved here, as
        # the workers' working directory need not be the driver's
        out = LocalOutput(Path(opts.out).resolve())
        existing = check_out(out, opts.overwrite)
    as_of = opts.as_of or date.today()
    sc = context if context is not None else start_spark(opts.master, opts.conf)
    try:
        startup = time.monotonic() - started
        if out is None:
            out = HadoopOutput(sc, str(opts.out))
            existing = check_out(out, opts.overwrite)
        source: _LocalSource | _SparkSource
        if local is not None:
            source = _LocalSource(sc, local, local_files)
        else:
            source = _SparkSource(sc, path)
        out.prepare(existing)
        summary = _run(sc, source, out, opts, as_of)
        summary["elapsed_seconds"] = round(time.monotonic() - started, 3)
        summary["engine"]["startup_seconds"] = round(startup, 3)
        out.write_bytes("summary.json", json_text(summary).encode())
    finally:
        if context is None:
            sc.stop()
    return summary


class _LocalSource:
    """Local files: map tasks are byte ranges the Python workers read themselves (no line
    passes through the JVM before the shuffle)."""

    def __init__(self, sc: Any, directory: Path, files: list[Path]) -> None:
        self.name = str(directory)
        self.size = sum(p.stat().st_size for p in files)
        self.ranges = byte_ranges(files, pieces=1 << 20, min_bytes=SPLIT_BYTES)
        self.tasks = len(self.ranges)
        self.sc = sc

    def routed(self, buckets: int, trial_ids: tuple[str, ...]) -> Any:
        tasks = self.sc.parallelize(list(enumerate(self.ranges)), len(self.ranges))
        return tasks.mapPartitions(
            functools.partial(route_task, buckets=buckets, trial_ids=trial_ids)
        )


class _SparkSource:
    """Input Spark reads (any Hadoop filesystem URL): one text RDD per file, in the order the
    NDJSON sweep reads files, so split k of the union is the k-th piece of the input."""

    def __init__(self, sc: Any, url: str) -> None:
        root = sc._jvm.org.apache.hadoop.fs.Path(url)
        try:
            fs = root.getFileSystem(sc._jsc.hadoopConfiguration())
            statuses = fs.listStatus(root) if fs.getFileStatus(root).isDirectory() else None
        except Exception as exc:  # py4j wraps the JVM's (file not found, unknown scheme, IO)
            raise InputError(f"cannot list it ({java_message(exc)})", source=url) from exc
        if statuses is None:
            raise InputError("not a directory", source=url)
        files = [
            (str(st.getPath().toString()), int(st.getLen()))
            for st in statuses
            if st.isFile() and str(st.getPath().getName()).endswith(".ndjson")
        ]
        if not files:
            raise InputError("directory holds no *.ndjson file", source=url)
        files.sort(key=lambda f: file_order(f[0].rsplit("/", 1)[-1]))
        self.name = url
        self.size = sum(size for _, size in files)
        self.text = sc.union([sc.textFile(name, use_unicode=False) for name, _ in files])
        self.tasks = int(self.text.getNumPartitions())

    def routed(self, buckets: int, trial_ids: tuple[str, ...]) -> Any:
        return self.text.mapPartitionsWithIndex(
            functools.partial(route_lines, buckets=buckets, trial_ids=trial_ids, source=self.name)
        )


def _run(
    sc: Any,
    source: _LocalSource | _SparkSource,
    out: SweepOutput,
    opts: SparkOptions,
    as_of: date,
) -> JSONDict:
    trial_ids = opts.trials.ids
    buckets = opts.buckets or max(
        1, min(MAX_BUCKETS, max(sc.defaultParallelism, -(-source.size // BUCKET_BYTES)))
    )
    routed = source.routed(buckets, trial_ids).partitionBy(buckets + 1, _identity)
    # Only the extra partition is read here (the buckets' shuffle blocks are not); the map
    # output stays for the evaluation below, which Spark runs without mapping again.
    side = _collect(routed, [buckets])
    stats = PartitionStats()
    shared_lines: list[bytes] = []
    # CPU seconds of the Python workers' own steps (the rest of their time is PySpark's)
    task_cpu = {"route": 0.0, "receive": 0.0, "evaluate": 0.0}
    for _, counts, medications, cpu in sorted(side, key=lambda item: item[0]):
        task_cpu["route"] += cpu
        stats.merge(_stats_from_json(counts))
        shared_lines += [line for line in medications.splitlines() if line.strip()]
    shared = sc.broadcast(shared_lines)
    common = {"buckets": buckets, "shared_lines": shared, "trial_ids": trial_ids, "as_of": as_of}
    if isinstance(out, LocalOutput):
        tallies = _collect(
            routed.mapPartitionsWithIndex(functools.partial(evaluate_task, out=out, **common))
        )
    else:
        tallies = _evaluate_through_spark(routed, out, common)
    shared.destroy()
    tally = Tally.for_trials(opts.trials)
    samples: list[JSONDict] = []
    for item in sorted(tallies, key=lambda t: t["index"]):
        tally.merge(Tally.from_json(item["tally"]))
        for step, seconds in item["cpu"].items():
            task_cpu[step] += seconds
        samples += item["error_samples"][: _ERROR_SAMPLES - len(samples)]
    assembled = assemble(out, opts.assemble_limit)
    if opts.parquet:
        write_parquet(sc, out)
    meta = {
        "as_of": as_of.isoformat(),
        "complete": len(tallies) == buckets,
        "source": {
            "key": f"ndjson:{source.name}",
            "description": f"NDJSON files in {source.name}",
        },
        "partitions": {"done": len(tallies), "total": buckets},
        "input": stats.to_json(),
        "error_samples": samples,
        "engine": {
            "name": "spark",
            "master": sc.master,
            "version": sc.version,
            "map_tasks": source.tasks,
            "output": out.name,
            "assembled": assembled,
            "parquet": PARQUET if opts.parquet else None,
            "task_cpu_seconds": {step: round(v, 2) for step, v in task_cpu.items()},
        },
    }
    summary = build_summary(tally, opts.trials, meta)
    out.write_bytes("report.html", report_html(summary).encode())
    return summary


def _evaluate_through_spark(routed: Any, out: SweepOutput, common: JSONDict) -> list[JSONDict]:
    """The evaluation for a URL output: its records kept on the executors' disks (a few
    large records per bucket) while the tallies are collected and Spark writes each kind's
    part files from them, so every bucket is evaluated once."""
    from pyspark import StorageLevel

    evaluated = routed.mapPartitionsWithIndex(
        functools.partial(evaluate_records, **common)
    ).persist(StorageLevel.DISK_ONLY)
    try:
        only_tallies = evaluated.filter(functools.partial(_of_kind, TALLY))
        tallies = [tally for _, tally in _collect(only_tallies)]
        for kind, _, _ in PART_KINDS:
            records = evaluated.filter(functools.partial(_of_kind, kind)).map(_second)
            try:
                records.saveAsTextFile(out.spark_path(PARTS, kind))
            except Exception as exc:  # a Py4JJavaError: the filesystem's, or a task's
                raise OutputError(
                    f"cannot write the {kind} part files ({java_message(exc)})", source=out.name
                ) from exc
    finally:
        evaluated.unpersist()
    return tallies


def _second(record: tuple[str, Any]) -> Any:
    return record[1]


#: results.ndjson's lines as Spark SQL reads them (cds/criteria/model.py, to_json); a
#: criterion's protocol text is left out of the Parquet rows (it is the trial definition's)
RESULT_SCHEMA = (
    "patient STRING, as_of DATE, trials ARRAY<STRUCT<trial: STRING, version: STRING, "
    "status: STRING, criteria: ARRAY<STRUCT<id: STRING, kind: STRING, result: STRING, "
    "evidence: ARRAY<STRING>, explanation: STRING>>>>"
)


def write_parquet(sc: Any, out: SweepOutput) -> None:
    """results.parquet/: one row per patient and trial (patient, as_of, trial, trial_version,
    status, criteria_status: criterion id -> pass/fail/unknown/manual, criteria: each
    criterion's id, kind, result, evidence and explanation), read by Spark SQL from the
    results part files (in the JVM: no Python worker handles a row)."""
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    spark = SparkSession(sc)
    lines = spark.read.schema(RESULT_SCHEMA).option("mode", "FAILFAST")
    results = lines.json(out.spark_path(PARTS, "results"))
    rows = results.select("patient", "as_of", F.explode("trials").alias("t")).select(
        "patient",
        "as_of",
        F.col("t.trial").alias("trial"),
        F.col("t.version").alias("trial_version"),
        F.col("t.status").alias("status"),
        F.map_from_entries(
            F.transform("t.criteria", lambda c: F.struct(c["id"], c["result"]))
        ).alias("criteria_status"),
        F.col("t.criteria").alias("criteria"),
    )
    try:
        rows.write.parquet(out.spark_path(PARQUET))
    except Exception as exc:  # a Py4JJavaError
        raise OutputError(f"cannot write {PARQUET} ({java_message(exc)})", source=out.name) from exc


def print_spark_summary(summary: JSONDict, out: str, stream: TextIO) -> None:
    stream.write(summary_text(summary))
    engine = summary["engine"]
    written = [*engine["assembled"], *([engine["parquet"]] if engine["parquet"] else [])]
    stream.write(
        f"wrote {out.rstrip('/')}/{PARTS}/ (part files), summary.json, report.html"
        + "".join(f", {name}" for name in written)
        + "\n"
    )


def add_spark_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Spark engine (optional extra: cds-trial-screening[spark])")
    group.add_argument(
        "--engine",
        choices=("local", "spark"),
        default="local",
        help="local: this machine's processes (default); spark: an Apache Spark job (--ndjson "
        "input only)",
    )
    group.add_argument(
        "--spark-master",
        metavar="URL",
        help="Spark master (default: spark-submit's --master when run by spark-submit, else "
        "local[*], this machine's cores)",
    )
    group.add_argument(
        "--spark-conf",
        action="append",
        type=parse_conf,
        default=[],
        metavar="KEY=VALUE",
        help="a Spark setting (repeatable)",
    )
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier Spark sweep's outputs in --out (without it, the sweep refuses)",
    )
    group.add_argument(
        "--parquet",
        action="store_true",
        help=f"also write the results as a Parquet dataset, {PARQUET}/ in --out (one row per "
        "patient and trial)",
    )
    group.add_argument(
        "--assemble-limit",
        type=parse_size,
        metavar="SIZE",
        help="assemble results.ndjson from its part files only up to this size (default "
        f"{DEFAULT_ASSEMBLE_LIMIT >> 30}G; 0: never); candidates.csv and errors.ndjson always",
    )


def run_spark(args: argparse.Namespace) -> int:
    """`cds sweep --engine spark`."""
    if args.ndjson is None:
        raise InputError("--engine spark reads --ndjson input", source="--engine")
    for flag, given in (
        ("--resume", args.resume),
        ("--write-back", args.write_back),
        ("--workers", args.workers),
    ):
        if given:
            raise InputError(
                f"{flag} applies to --engine local (Spark retries failed tasks itself; "
                "--spark-master and --spark-conf set its resources)",
                source=flag,
            )
    opts = SparkOptions(
        out=args.out,
        trials=load_trials(args.trial) if args.trial else load_trials(),
        as_of=parse_as_of(args.as_of) if args.as_of else None,
        master=args.spark_master,
        conf=list(args.spark_conf),
        overwrite=args.overwrite,
        parquet=args.parquet,
    )
    if args.assemble_limit is not None:
        opts.assemble_limit = args.assemble_limit
    summary = sweep_spark(str(args.ndjson), opts)
    print_spark_summary(summary, str(args.out), sys.stdout)
    return 0
