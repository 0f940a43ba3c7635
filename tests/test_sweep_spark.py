"""`cds sweep --engine spark` against the single-machine NDJSON sweep: the same result lines
(sorted by patient), candidates, summary and funnel for the same input, on a real local Spark
(PySpark from the project's `spark` extra, which `make test` installs; driver bound to
127.0.0.1, no UI). Also the byte-range reading both engines' map steps share and the parallel
partition pass of the single-machine sweep (no Spark needed)."""

from __future__ import annotations

import argparse
import gc
import io
import json
import random
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import cds.sweep.ndjson as ndjson_module
import cds.sweep.spark as spark_module
import cds.sweep.spark_output as spark_output
from cds.cli import main
from cds.criteria import load_trials
from cds.errors import InputError
from cds.fhir.loader import DEFAULT_TAG
from cds.sweep.ndjson import (
    ByteRange,
    CodePrefilter,
    byte_ranges,
    partition_ndjson,
    read_range,
    read_spans,
)
from cds.sweep.runner import sweep_ndjson
from cds.sweep.spark import SparkOptions, spark_conf_pairs, sweep_spark
from cds.sweep.store import WorkDir
from cds.synthetic import NET_VARIANTS, Population, write_population
from tests.helpers import AS_OF, sweep_options, write_ndjson

REPO_ROOT = Path(__file__).resolve().parents[1]
#: every NET variant several times over, ordinary patients with short histories (speed)
POPULATION = Population(2000, seed=14, net_every=4, visits=(2, 5))


@pytest.fixture(scope="module")
def spark_context() -> Iterator[Any]:
    pytest.importorskip("pyspark", reason="the spark extra is not installed (make test does)")
    sc = spark_module.start_spark("local[2]", [])
    yield sc
    sc.stop()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("spark-inputs")
    write_population(POPULATION, root / "generated", "ndjson")
    # as a Bulk export gives them (the integration tests' own writer)
    fixtures = sorted((REPO_ROOT / "fhir_fixtures").glob("*.json"))
    write_ndjson(fixtures, DEFAULT_TAG, root / "fixtures")
    return {"generated": root / "generated", "fixtures": root / "fixtures"}


def _sorted_lines(path: Path) -> list[bytes]:
    return sorted(path.read_bytes().splitlines(True))


@pytest.mark.parametrize(
    ("which", "as_url"), [("generated", False), ("fixtures", False), ("fixtures", True)]
)
def test_spark_sweep_equals_the_ndjson_sweep(
    which: str,
    as_url: bool,
    inputs: dict[str, Path],
    spark_context: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = inputs[which]
    # Several buckets and several map tasks per file: lines cut at range ends, buckets fed
    # by many tasks, which must still meet in input order.
    monkeypatch.setattr(ndjson_module, "BUCKET_BYTES", 4 << 20)
    monkeypatch.setattr(spark_module, "SPLIT_BYTES", 3 << 20)
    local = sweep_ndjson(source, sweep_options(tmp_path / "local", workers=2))
    # A plain path: Python workers read byte ranges; a URL: Spark's own text reader.
    spark = sweep_spark(
        source.as_uri() if as_url else str(source),
        SparkOptions(out=tmp_path / "spark", trials=load_trials(), as_of=AS_OF, buckets=5),
        context=spark_context,
    )
    if which == "generated":
        assert spark["engine"]["map_tasks"] > len(list(source.iterdir()))
        variants = {name for name, _ in NET_VARIANTS}
        assert {POPULATION.variant(i) for i in range(POPULATION.patients)} >= variants
    assert spark["patients"] == local["patients"] > 0
    for key in ("patients", "errors", "trials", "input", "as_of", "complete"):
        assert spark[key] == local[key], key
    assert spark["error_samples"] == local["error_samples"]
    for name in ("results.ndjson", "candidates.csv", "errors.ndjson"):
        assert _sorted_lines(tmp_path / "spark" / name) == _sorted_lines(tmp_path / "local" / name)
    parts = sorted((tmp_path / "spark" / "parts" / "results").iterdir())
    assert len(parts) == 5
    assert sorted(b"".join(p.read_bytes() for p in parts).splitlines(True)) == _sorted_lines(
        tmp_path / "local" / "results.ndjson"
    )
    saved = json.loads((tmp_path / "spark" / "summary.json").read_text())
    assert saved["trials"] == local["trials"] and saved["engine"]["name"] == "spark"
    assert (tmp_path / "spark" / "report.html").read_text().count("<svg") == 2


def test_a_rerun_refuses_an_earlier_sweeps_outputs_unless_overwrite(
    inputs: dict[str, Path], spark_context: Any, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    opts = SparkOptions(out=out, trials=load_trials(), as_of=AS_OF)
    sweep_spark(str(inputs["fixtures"]), opts, context=spark_context)
    before = _sorted_lines(out / "results.ndjson")
    (out / "notes.txt").write_text("the user's own file")
    with pytest.raises(InputError, match="--overwrite"):
        sweep_spark(str(inputs["fixtures"]), opts, context=spark_context)
    opts.overwrite = True
    sweep_spark(str(inputs["fixtures"]), opts, context=spark_context)
    assert _sorted_lines(out / "results.ndjson") == before
    assert (out / "notes.txt").read_text() == "the user's own file"  # only its outputs go


def test_cli_refuses_spark_with_local_only_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["sweep", "--engine", "spark", "--out", str(tmp_path / "o")]
    cases = [
        ([*base, "--ndjson", str(tmp_path), "--resume"], "--resume"),
        ([*base, "--ndjson", str(tmp_path), "--workers", "2"], "--workers"),
        ([*base, "--fhir-base", "http://127.0.0.1:9/fhir"], "--ndjson"),
    ]
    for argv, named in cases:
        assert main(argv) == 2, argv
        assert named in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main([*base, "--ndjson", str(tmp_path), "--spark-conf", "novalue"])
    assert exited.value.code == 2 and "KEY=VALUE" in capsys.readouterr().err
    local = ["sweep", "--ndjson", str(tmp_path), "--out"]
    for extra in (["--overwrite"], ["--parquet"], ["--assemble-limit", "1G"]):
        assert main([*local, str(tmp_path), *extra]) == 2
        assert "--engine spark" in capsys.readouterr().err
    assert main([*local, "hdfs://namenode:8020/sweeps/x"]) == 2
    assert "--engine spark" in capsys.readouterr().err


def test_a_url_that_is_no_directory_is_an_input_error(spark_context: Any, tmp_path: Path) -> None:
    opts = SparkOptions(out=tmp_path / "out", trials=load_trials(), as_of=AS_OF)
    with pytest.raises(InputError, match="cannot list it"):
        sweep_spark((tmp_path / "missing").as_uri(), opts, context=spark_context)
    assert not (tmp_path / "out").exists()  # nothing left that a rerun would refuse


def test_loopback_and_no_ui_for_local_masters_user_settings_last() -> None:
    pairs = dict(spark_conf_pairs("local[2]", [("spark.ui.enabled", "true")]))
    assert pairs["spark.driver.host"] == pairs["spark.driver.bindAddress"] == "127.0.0.1"
    assert pairs["spark.ui.enabled"] == "true"  # the user's setting wins
    assert "spark.driver.host" not in dict(spark_conf_pairs("spark://cluster:7077", []))


def test_byte_ranges_give_every_line_to_exactly_one_reader(tmp_path: Path) -> None:
    rng = random.Random(5)
    lines = [b"x" * rng.randint(0, 300) + b"\n" for _ in range(2000)]
    lines[-1] = lines[-1].rstrip(b"\n")  # a last line without its newline
    path = tmp_path / "f.ndjson"
    path.write_bytes(b"".join(lines))
    size = path.stat().st_size
    for pieces in (1, 2, 3, 7, 64):
        ranges = byte_ranges([path], pieces, min_bytes=1)
        assert len(ranges) == pieces and ranges[0].start == 0 and ranges[-1].end == size
        got = b"".join(b"".join(read_range(r, block_bytes=97)) for r in ranges)
        assert got == path.read_bytes()
    # a cut exactly at a line start gives that line to the range it starts
    cut = len(lines[0]) + len(lines[1])
    second = b"".join(read_range(ByteRange(str(path), cut, size)))
    assert second.startswith(lines[2])


def test_parallel_partition_pass_gives_each_bucket_in_input_order(
    inputs: dict[str, Path], tmp_path: Path
) -> None:
    files = ndjson_module.ndjson_files(inputs["generated"])
    keep = CodePrefilter(load_trials())
    buckets: dict[int, list[bytes]] = {}
    stats = {}
    for workers in (1, 3):
        work = WorkDir(tmp_path / f"w{workers}")
        work.start(False, {})
        stats[workers] = partition_ndjson(files, work, 4, keep=keep, workers=workers).to_json()
        spans = read_spans(work)
        assert (spans is None) == (workers == 1)
        for b in range(4):
            task_path = work.input / f"b{b:05d}.ndjson"
            got = [
                (p.id, len(p.resources))
                for p in ndjson_module.read_bucket(task_path, tuple(spans[b]) if spans else None)
            ]
            if workers == 1:
                buckets[b] = [line for line in task_path.read_bytes().splitlines(True)]
                assert got
            else:
                pieces = b"".join(
                    (work.input / name).read_bytes()[offset : offset + length]
                    for name, offset, length in spans[b]  # type: ignore[index]
                )
                assert pieces.splitlines(True) == buckets[b]
        assert (work.input / "shared.ndjson").exists()
    assert stats[1] == stats[3]


def _engine_free(summary: dict[str, Any]) -> dict[str, Any]:
    """A summary without what differs between two runs of one sweep (times, output name)."""
    return {k: v for k, v in summary.items() if k not in ("engine", "elapsed_seconds")}


def test_output_to_a_hadoop_url_is_byte_identical_to_a_local_directory(
    inputs: dict[str, Path], spark_context: Any, tmp_path: Path
) -> None:
    """--out as a file:// URL: a real Hadoop local filesystem, written by Spark's text writer
    (part files) and Hadoop's FileSystem (the rest), not by the Python workers."""
    from pyspark.sql import SparkSession

    def opts(out: Path | str) -> SparkOptions:
        return SparkOptions(out=out, trials=load_trials(), as_of=AS_OF, buckets=3, parquet=True)

    source = str(inputs["fixtures"])
    local = sweep_spark(source, opts(tmp_path / "local"), context=spark_context)
    url = (tmp_path / "url").as_uri()
    assert url.startswith("file:///")
    remote = sweep_spark(source, opts(url), context=spark_context)
    assert remote["engine"]["output"] == url and local["patients"] > 0
    assert _engine_free(remote) == _engine_free(local)
    assert remote["engine"]["assembled"] == local["engine"]["assembled"]
    for name in ("results.ndjson", "candidates.csv", "errors.ndjson", "report.html"):
        assert (tmp_path / "url" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    saved = json.loads((tmp_path / "url" / "summary.json").read_text())
    assert _engine_free(saved) == _engine_free(json.loads(json.dumps(local)))
    for kind, suffix in (("results", ".ndjson"), ("csv", ".csv"), ("errors", ".ndjson")):
        local_parts = sorted((tmp_path / "local" / "parts" / kind).glob(f"part-*{suffix}"))
        # Hadoop's names, one part per reduce partition (the last, for the map step's
        # counts, empty)
        url_parts = sorted((tmp_path / "url" / "parts" / kind).glob("part-[0-9]*[0-9]"))
        assert len(local_parts) == 3 and len(url_parts) == 4
        assert [p.read_bytes() for p in url_parts[:3]] == [p.read_bytes() for p in local_parts]
        assert url_parts[3].read_bytes() == b""

    # Parquet: one row per patient and trial, the statuses results.ndjson holds
    spark = SparkSession(spark_context)
    expected = sorted(
        (
            line["patient"],
            trial["trial"],
            trial["status"],
            {c["id"]: c["result"] for c in trial["criteria"]},
        )
        for line in map(
            json.loads, (tmp_path / "local" / "results.ndjson").read_text().splitlines()
        )
        for trial in line["trials"]
    )
    for where in (tmp_path / "local" / "results.parquet", f"{url}/results.parquet"):
        with warnings.catch_warnings():  # PySpark leaves its result socket to the GC
            warnings.simplefilter("ignore", ResourceWarning)
            rows = spark.read.parquet(str(where)).collect()
            gc.collect()
        got = sorted((r.patient, r.trial, r.status, dict(r.criteria_status)) for r in rows)
        assert got == expected
        assert {r.as_of for r in rows} == {AS_OF}
        assert all(sorted(c.id for c in r.criteria) == sorted(r.criteria_status) for r in rows)

    # A rerun is refused as for a local --out; --overwrite replaces only the sweep's outputs
    (tmp_path / "url" / "notes.txt").write_text("the user's own file")
    with pytest.raises(InputError, match="--overwrite"):
        sweep_spark(source, opts(url), context=spark_context)
    again = opts(url)
    again.overwrite, again.parquet, again.assemble_limit = True, False, 0
    rerun = sweep_spark(source, again, context=spark_context)
    assert rerun["engine"]["assembled"] == ["candidates.csv", "errors.ndjson"]
    assert (tmp_path / "url" / "notes.txt").read_text() == "the user's own file"
    assert not (tmp_path / "url" / "results.ndjson").exists()
    assert not (tmp_path / "url" / "results.parquet").exists()


def test_assembly_rule() -> None:
    """results.ndjson up to the limit; candidates and errors always; each only with room."""
    sizes = {"results": 5 << 30, "csv": 1 << 20, "errors": 0}
    room = 100 << 30
    assert spark_output.assembly_plan(sizes, room, 10 << 30) == ["results", "csv", "errors"]
    assert spark_output.assembly_plan(sizes, room, 4 << 30) == ["csv", "errors"]
    assert spark_output.assembly_plan(sizes, (6 << 30) - 1, 10 << 30) == ["csv", "errors"]
    assert spark_output.assembly_plan(sizes, 1 << 29, 10 << 30) == []
    assert spark_output.parse_size("10G") == 10 << 30
    assert spark_output.parse_size("500m") == 500 << 20
    assert spark_output.parse_size("0") == 0
    with pytest.raises(argparse.ArgumentTypeError):
        spark_output.parse_size("ten")


def test_cli_spark_sweep(
    inputs: dict[str, Path],
    spark_context: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The command end to end (it stops the Spark context it used: this test comes last)."""
    out = tmp_path / "out"
    argv = ["sweep", "--engine", "spark", "--spark-master", "local[2]", "--as-of", "2026-11-01"]
    assert main([*argv, "--ndjson", str(inputs["fixtures"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "results.ndjson" in printed and "NCT04339036" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["patients"] >= 40


def test_a_range_reader_reports_lines_by_their_number_in_the_file(tmp_path: Path) -> None:
    """Line numbers in reports of unreadable lines count from the file's start, also for a
    reader whose byte range starts in the middle of the file (in the middle of a line)."""
    lines = [f'{{"resourceType":"Patient","id":"p{i}"}}\n'.encode() for i in range(1, 11)]
    path = tmp_path / "Patient.ndjson"
    path.write_bytes(b"".join(lines))
    offset = len(b"".join(lines[:3])) + 5  # inside line 4: the range's first line is line 5
    handles: list[Any] = [io.BytesIO()]
    partition = ndjson_module.Partition(handles, io.BytesIO(), None)
    partition.start(str(path), offset)
    for block in read_range(ByteRange(str(path), offset, path.stat().st_size)):
        partition.block(block)
    assert partition.stats.patients == 6
    assert partition.where() == f"{path} line 10"


def test_workers_keep_the_directories_of_sparks_own_archives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a Python worker does once (PySpark invalidates import caches before every task):
    Spark's own archives are not read again; any other archive still is."""
    import zipfile
    import zipimport

    monkeypatch.setattr(
        zipimport.zipimporter, "invalidate_caches", zipimport.zipimporter.invalidate_caches
    )  # restored after the test
    importers = {}
    for name in ("pyspark.zip", "py4j-0.10.9.9-src.zip", "spark-core_2.13-4.1.1.jar", "own.zip"):
        with zipfile.ZipFile(tmp_path / name, "w") as archive:
            archive.writestr("first.py", "")
        importers[name] = zipimport.zipimporter(str(tmp_path / name))
    spark_module.keep_zip_directories()
    spark_module.keep_zip_directories()  # once per worker, however often it is called
    for name, importer in importers.items():
        with zipfile.ZipFile(tmp_path / name, "a") as archive:
            archive.writestr("second.py", "")
        importer.invalidate_caches()
        assert (importer.find_spec("second") is not None) == (name == "own.zip"), name
