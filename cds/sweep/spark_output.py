"""Where `cds sweep --engine spark` writes: a local directory, or any Hadoop filesystem URL.

- :class:`LocalOutput`, a plain path (on a cluster, a mount every executor sees): each
  evaluation task writes its part files itself (the bytes never pass through the JVM), and
  the driver assembles with the kernel's copy (:func:`cds.sweep.store.copy_range`).
- :class:`HadoopOutput`, a URL (``hdfs://``, ``s3a://`` with the user's own Spark
  configuration, ``file://``): Python workers cannot open those, so Spark writes the part
  files (``saveAsTextFile``, i.e. Hadoop's output committer: a retried or speculative task
  never leaves a second copy), and the driver assembles and writes the other outputs through
  the same Hadoop ``FileSystem`` Spark uses (``spark._jsc.hadoopConfiguration()``), the bytes
  copied inside the JVM (``org.apache.hadoop.io.IOUtils.copyBytes``), not through Python.

Both keep the same rule for an earlier sweep's outputs (refused, or with ``--overwrite``
exactly those removed) and for what is assembled (:func:`assembly_plan`).
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cds.errors import InputError, OutputError
from cds.sweep.core import CSV_HEADER
from cds.sweep.store import atomic_open, copy_range

PARTS = "parts"
#: kinds of part files: (directory under parts/, suffix of a local part, assembled output)
PART_KINDS = (
    ("results", ".ndjson", "results.ndjson"),
    ("csv", ".csv", "candidates.csv"),
    ("errors", ".ndjson", "errors.ndjson"),
)
PARQUET = "results.parquet"
#: everything a sweep writes into --out (what --overwrite replaces, and nothing else)
OUTPUTS = (*(name for _, _, name in PART_KINDS), "summary.json", "report.html", PARQUET, PARTS)
#: free space an assembly leaves on the output's filesystem at least
ASSEMBLY_MARGIN = 1 << 30
#: default --assemble-limit: results.ndjson (~20 KB a patient) is assembled up to ~500,000
#: patients; past that one file copied by the driver is slower to write and to read than the
#: part files (or the Parquet dataset) it repeats
DEFAULT_ASSEMBLE_LIMIT = 10 << 30

#: a URL (file:, hdfs:, s3a:, ...): read and written by Spark and Hadoop, not by Python workers
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:/")


def is_url(path: str) -> bool:
    return _URL.match(path) is not None


_SIZE = re.compile(r"(\d+)\s*([KMGT]?)I?B?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``10G``, ``500M``, ``0`` (bytes; K/M/G/T are powers of 1024)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 0, 500M or 10G")
    scale = "_KMGT".index(match.group(2).upper() or "_")
    return int(match.group(1)) << (10 * scale)


def assembly_plan(sizes: dict[str, int], free: int, limit: int) -> list[str]:
    """Which kinds' part files are assembled into one file, by one documented rule:
    candidates.csv and errors.ndjson always (a line per candidate or failed patient: small),
    results.ndjson (a line per patient, most of the output) only when its parts total at most
    ``limit`` bytes; and each only while the output's filesystem keeps ASSEMBLY_MARGIN free
    after it (else its part files are the output; summary.json says which were assembled)."""
    chosen = []
    for kind, _, _ in PART_KINDS:
        size = sizes[kind]
        if kind == "results" and size > limit:
            continue
        if free < size + ASSEMBLY_MARGIN:
            continue
        free -= size
        chosen.append(kind)
    return chosen


class SweepOutput(Protocol):
    @property
    def name(self) -> str:
        """As the user named it (messages)."""
        ...

    def spark_path(self, *names: str) -> str:
        """A file or directory in the output, as Spark's readers and writers name it."""
        ...

    def existing(self) -> list[str]: ...

    def prepare(self, existing: list[str]) -> None: ...

    def parts(self, kind: str) -> list[tuple[str, int]]:
        """A kind's part files (and sizes), in bucket order."""
        ...

    def free(self) -> int: ...

    def concat(self, name: str, head: bytes, parts: list[str]) -> None: ...

    def write_bytes(self, name: str, data: bytes) -> None: ...


def check_out(out: SweepOutput, overwrite: bool) -> list[str]:
    """The earlier sweep's outputs in ``out``; refused unless ``overwrite``."""
    existing = out.existing()
    if existing and not overwrite:
        raise InputError(
            f"holds the outputs of an earlier sweep ({', '.join(existing)}); choose another "
            "--out or pass --overwrite to replace them",
            source=out.name,
        )
    return existing


def csv_head() -> bytes:
    header = io.StringIO()
    csv.writer(header).writerow(CSV_HEADER)
    return header.getvalue().encode()


def assemble(out: SweepOutput, limit: int) -> list[str]:
    """The single-machine outputs from the part files, in bucket order, by
    :func:`assembly_plan`; the names of those written."""
    parts = {kind: out.parts(kind) for kind, _, _ in PART_KINDS}
    sizes = {kind: sum(size for _, size in files) for kind, files in parts.items()}
    chosen = assembly_plan(sizes, out.free(), limit)
    heads = {"results": b"", "csv": csv_head(), "errors": b""}
    done = []
    for kind, _, name in PART_KINDS:
        if kind in chosen:
            out.concat(name, heads[kind], [ref for ref, _ in parts[kind]])
            done.append(name)
    return done


@dataclass
class LocalOutput:
    #: absolute (the workers write into it)
    path: Path

    @property
    def name(self) -> str:
        return str(self.path)

    def spark_path(self, *names: str) -> str:
        # A URI, not a bare path: on a cluster whose default filesystem is HDFS a bare path
        # would name a directory there.
        return self.path.joinpath(*names).as_uri()

    def existing(self) -> list[str]:
        return [name for name in OUTPUTS if (self.path / name).exists()]

    def prepare(self, existing: list[str]) -> None:
        """Remove exactly the earlier outputs (never anything else in the directory) and make
        the part file directories."""
        for name in existing:
            target = self.path / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        for kind, _, _ in PART_KINDS:
            (self.path / PARTS / kind).mkdir(parents=True)

    def part_path(self, kind: str, index: int) -> Path:
        suffix = dict((k, s) for k, s, _ in PART_KINDS)[kind]
        return self.path / PARTS / kind / f"part-{index:05d}{suffix}"

    def parts(self, kind: str) -> list[tuple[str, int]]:
        files = sorted((self.path / PARTS / kind).glob("part-*"))
        return [(str(p), p.stat().st_size) for p in files]

    def free(self) -> int:
        return shutil.disk_usage(self.path).free

    def concat(self, name: str, head: bytes, parts: list[str]) -> None:
        with atomic_open(self.path / name, "wb", durable=False) as f:
            f.write(head)
            for part in parts:
                f.flush()
                copy_range(Path(part), 0, Path(part).stat().st_size, f)

    def write_bytes(self, name: str, data: bytes) -> None:
        with atomic_open(self.path / name, "wb") as f:
            f.write(data)


def java_message(exc: Exception) -> str:
    java = getattr(exc, "java_exception", None)
    return str(java.getMessage()) if java is not None else str(exc).splitlines()[0]


class HadoopOutput:
    """An output directory named by a URL, through the Hadoop FileSystem of Spark's JVM."""

    def __init__(self, sc: Any, url: str) -> None:
        self.name = url
        self._jvm = sc._jvm
        self._root = self._jvm.org.apache.hadoop.fs.Path(url)
        try:
            self._fs = self._root.getFileSystem(sc._jsc.hadoopConfiguration())
        except Exception as exc:  # py4j wraps the JVM's (unknown scheme, no credentials, IO)
            raise InputError(f"cannot write there ({java_message(exc)})", source=url) from exc

    def _path(self, *names: str) -> Any:
        path = self._root
        for name in names:
            path = self._jvm.org.apache.hadoop.fs.Path(path, name)
        return path

    def _call(self, what: str, method: Any, *args: Any) -> Any:
        try:
            return method(*args)
        except OutputError:
            raise
        except Exception as exc:  # a Py4JJavaError: the filesystem's IOException
            raise OutputError(f"cannot {what} ({java_message(exc)})", source=self.name) from exc

    def spark_path(self, *names: str) -> str:
        return str(self._path(*names).toString())

    def existing(self) -> list[str]:
        return [name for name in OUTPUTS if self._call("read", self._fs.exists, self._path(name))]

    def prepare(self, existing: list[str]) -> None:
        for name in existing:
            self._call(f"remove {name}", self._fs.delete, self._path(name), True)
        # Spark's text writer makes parts/<kind>/ itself (and refuses one that exists).
        self._call("create the directory", self._fs.mkdirs, self._root)

    def parts(self, kind: str) -> list[tuple[str, int]]:
        statuses = self._call("list the part files", self._fs.listStatus, self._path(PARTS, kind))
        # Hadoop's text output: part-00000, part-00001, ... (more digits past 99,999), beside
        # _SUCCESS and, on a checksummed filesystem such as file://, hidden .crc files.
        files = [
            (int(name[5:]), str(st.getPath().toString()), int(st.getLen()))
            for st in statuses
            if (name := str(st.getPath().getName())).startswith("part-") and name[5:].isdigit()
        ]
        return [(ref, size) for _, ref, size in sorted(files)]

    def free(self) -> int:
        # An object store reports no limit (Long.MAX_VALUE): nothing is held back there.
        return int(self._call("read its free space", self._fs.getStatus, self._root).getRemaining())

    def _atomic(self, name: str, write: Any) -> None:
        """Write to a hidden temporary name, then rename (atomic on HDFS and local disks; an
        object store copies): a reader never sees half a file under the real name."""
        tmp, final = self._path(f".{name}.tmp"), self._path(name)

        def run() -> None:
            stream = self._fs.create(tmp, True)
            try:
                write(stream)
            finally:
                stream.close()
            if not self._fs.rename(tmp, final):
                raise OutputError(f"cannot rename .{name}.tmp to {name}", source=self.name)

        self._call(f"write {name}", run)

    def concat(self, name: str, head: bytes, parts: list[str]) -> None:
        copy_bytes = self._jvm.org.apache.hadoop.io.IOUtils.copyBytes

        def write(stream: Any) -> None:
            if head:
                stream.write(bytearray(head))
            for part in parts:
                source = self._fs.open(self._jvm.org.apache.hadoop.fs.Path(part))
                try:
                    copy_bytes(source, stream, 1 << 20, False)
                finally:
                    source.close()

        self._atomic(name, write)

    def write_bytes(self, name: str, data: bytes) -> None:
        self._atomic(name, lambda stream: stream.write(bytearray(data)))
