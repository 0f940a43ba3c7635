"""The sweep's working directory: checkpoint, partition outputs, and the final files.

A partition's outputs (result lines, CSV rows, errors) are appended to segment files, one per
kind, that hold one or several consecutive partitions; its marker file, written last and
only once its bytes are on disk, records its tally and where its bytes lie. A partition
counts as done when its marker exists. Every other file is written to a temporary name and
renamed into place (POSIX rename is atomic), so a crash or Ctrl-C never leaves a half-written
file under a real name.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cds.errors import InputError
from cds.sweep.core import CSV_HEADER, PatientOutcome, Tally

JSONDict = dict[str, Any]

#: 2: partition outputs in segments, located by the partition markers
STATE_VERSION = 2
WORK = ".sweep"


@contextmanager
def atomic_open(path: Path, mode: str = "w", *, durable: bool = True) -> Iterator[IO[Any]]:
    """A file that appears under ``path`` only once it is completely written; with
    ``durable``, also only once it is on disk (fsync before the rename), so that a power
    loss cannot leave a checkpoint naming data that was never written."""
    tmp = path.with_name(f".{path.name}.tmp")
    encoding = None if "b" in mode else "utf-8"
    newline = "" if "b" not in mode else None
    with open(tmp, mode, encoding=encoding, newline=newline) as f:
        yield f
        if durable:
            f.flush()
            os.fsync(f.fileno())
    tmp.replace(path)


def copy_range(path: Path, offset: int, length: int, out: IO[bytes]) -> None:
    """Append ``length`` bytes of a file, from ``offset``, to ``out`` (flushed, positioned at
    its end): in the kernel where it can (copy_file_range), through a buffer where it cannot."""
    with open(path, "rb") as f:
        try:
            while length > 0:
                copied = os.copy_file_range(f.fileno(), out.fileno(), length, offset)
                if copied == 0:
                    break
                offset += copied
                length -= copied
        except OSError:
            pass  # another filesystem or kernel: copy what is left in user space
        f.seek(offset)
        while length > 0:
            chunk = f.read(min(length, 1 << 20))
            if not chunk:
                raise InputError(
                    "a partition's output is shorter than its marker says (was an output "
                    "file cut short in place?); sweep again without --resume",
                    source=str(path),
                )
            out.write(chunk)
            length -= len(chunk)
        out.flush()


def json_text(data: Any) -> str:
    """A JSON output file's text (summary.json): readable, UTF-8 as is."""
    return json.dumps(data, ensure_ascii=False, indent=1) + "\n"


def write_json(path: Path, data: Any) -> None:
    with atomic_open(path) as f:
        f.write(json_text(data))


#: the kinds of output a partition has, each with its segment file and its output file
KINDS = ("results", "csv", "errors")


@dataclass(frozen=True)
class EncodedPartition:
    """A partition's output files as bytes (one field per kind), ready to be written."""

    results: bytes
    csv: bytes
    errors: bytes

    def files(self) -> tuple[tuple[str, bytes], ...]:
        return tuple((kind, getattr(self, kind)) for kind in KINDS)


def encode_partition(outcomes: Iterable[PatientOutcome]) -> EncodedPartition:
    outcomes = list(outcomes)
    rows = io.StringIO()
    writer = csv.writer(rows)
    for outcome in outcomes:
        writer.writerows(outcome.rows)
    errors = "".join(
        json.dumps({"patient": o.patient, "error": o.error}) + "\n"
        for o in outcomes
        if o.error is not None
    )
    # Result lines are most of the bytes (~20 KB a patient), already encoded.
    results = b"".join(o.line for o in outcomes if o.line is not None)
    return EncodedPartition(results, rows.getvalue().encode(), errors.encode())


class WorkDir:
    """``OUT/.sweep``: the checkpoint (state.json), the prepared input and partition outputs."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.root = out / WORK
        self.parts = self.root / "parts"
        self.input = self.root / "input"

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    def state(self) -> JSONDict | None:
        try:
            with open(self.state_path, encoding="utf-8") as f:
                data: JSONDict = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise InputError(f"checkpoint unreadable ({exc})", source=str(self.state_path)) from exc
        return data

    def start(self, resume: bool, identity: JSONDict) -> JSONDict | None:
        """Open the work directory. With ``resume``, returns the saved state (after checking it
        is the same sweep); otherwise clears any earlier sweep's work."""
        self.out.mkdir(parents=True, exist_ok=True)
        saved = self.state() if resume else None
        if resume and saved is None:
            raise InputError(
                "nothing to resume: no checkpoint here (a sweep stopped before its first "
                "checkpoint has nothing to keep); run the same command without --resume",
                source=str(self.out),
            )
        if saved is not None:
            if saved.get("version") != STATE_VERSION:
                raise InputError(
                    f"the checkpoint was written by another version of cds sweep (format "
                    f"{saved.get('version')!r}, this one reads {STATE_VERSION}); sweep again "
                    "without --resume",
                    source=str(self.out),
                )
            for key, value in identity.items():
                if saved.get("identity", {}).get(key) != value:
                    raise InputError(
                        f"--resume with a different {key} than the interrupted sweep "
                        f"({saved.get('identity', {}).get(key)!r} then, {value!r} now)",
                        source=str(self.out),
                    )
            return saved
        if self.root.exists():
            shutil.rmtree(self.root)
        self.parts.mkdir(parents=True)
        self.input.mkdir(parents=True)
        return None

    def save_state(self, state: JSONDict) -> None:
        state["version"] = STATE_VERSION
        write_json(self.state_path, state)

    def marker_path(self, index: int) -> Path:
        return self.parts / f"p{index:05d}.json"

    def done(self) -> set[int]:
        return {int(p.name[1:6]) for p in self.parts.glob("p*.json") if p.name[1:6].isdigit()}

    def markers(self, indices: Iterable[int]) -> list[JSONDict]:
        """The markers of done partitions, in partition order."""
        return [self.marker(index) for index in sorted(indices)]

    def marker(self, index: int) -> JSONDict:
        """A done partition's marker: ``{"tally": ..., "files": {kind: [segment, offset,
        length]}}``."""
        path = self.marker_path(index)
        try:
            with open(path, encoding="utf-8") as f:
                data: JSONDict = json.load(f)
        except (OSError, ValueError) as exc:
            raise InputError(f"partition marker unreadable ({exc})", source=str(path)) from exc
        return data

    def segment(self, first: int) -> Segment:
        """A new segment for partitions committed one after another, from ``first`` on."""
        return Segment(self, first)

    def write_partition(self, index: int, outcomes: Iterable[PatientOutcome], tally: Tally) -> None:
        """Commit one partition in a segment of its own."""
        with self.segment(index) as segment:
            segment.commit(index, encode_partition(outcomes), tally)

    def assemble(
        self, markers: list[JSONDict], *, complete: bool, extra_errors: bytes = b""
    ) -> None:
        """Write the output files from the done partitions' markers (in partition order).
        The results of a ``complete`` sweep that are one whole segment are linked, not
        copied. ``extra_errors`` (lines of patients in partitions not committed, e.g. the
        failures that stopped a sweep) are appended to errors.ndjson; a resumed sweep redoes
        those patients."""
        header = io.StringIO()
        csv.writer(header).writerow(CSV_HEADER)
        outputs = {
            "results": ("results.ndjson", b""),
            "csv": ("candidates.csv", header.getvalue().encode()),
            "errors": ("errors.ndjson", b""),
        }
        for kind in KINDS:
            name, head = outputs[kind]
            spans = [_span(marker, kind) for marker in markers]
            tail = extra_errors if kind == "errors" else b""
            if complete and not head and not tail and self._link_whole(spans, self.out / name):
                continue
            # Not fsynced: every byte is in the segments, which are, and a resumed sweep
            # (--resume, even after a complete one) assembles the outputs again.
            with atomic_open(self.out / name, "wb", durable=False) as out:
                out.write(head)
                out.flush()
                for segment, offset, length in spans:
                    copy_range(self.parts / segment, offset, length, out)
                out.write(tail)

    def _link_whole(self, spans: list[tuple[str, int, int]], target: Path) -> bool:
        """When the spans are one whole segment, in order (a sweep run in one go by one
        worker), give it the output's name too (a hard link: no copy, and one copy on disk)
        and return True. Only for a complete sweep: the segment is never written again (a
        resumed sweep starts a new one), and the output file, already on disk, is final.
        An interrupted sweep's outputs are copies, so that whatever is done to them cannot
        touch what the resumed sweep reads."""
        if not spans or len({segment for segment, _, _ in spans}) != 1:
            return False
        position = 0
        for _, offset, length in spans:
            if offset != position:
                return False
            position += length
        source = self.parts / spans[0][0]
        tmp = target.with_name(f".{target.name}.tmp")
        try:
            if source.stat().st_size != position:
                return False  # bytes of an interrupted commit after the last partition
            tmp.unlink(missing_ok=True)
            os.link(source, tmp)
        except OSError:
            return False  # no hard links here: the caller copies
        tmp.replace(target)
        return True

    def error_samples(self, markers: Iterable[JSONDict], limit: int = 20) -> list[JSONDict]:
        found: list[JSONDict] = []
        for marker in markers:
            segment, offset, length = _span(marker, "errors")
            if not length:
                continue
            with open(self.parts / segment, "rb") as f:
                f.seek(offset)
                for line in f.read(length).splitlines():
                    found.append(json.loads(line))
                    if len(found) >= limit:
                        return found
        return found

    def clean_inputs(self) -> None:
        """Drop the prepared input (partition buckets, export files) once the sweep is complete."""
        shutil.rmtree(self.input, ignore_errors=True)


def _span(marker: JSONDict, kind: str) -> tuple[str, int, int]:
    """Where a partition's output of one kind lies: (segment file, offset, length)."""
    segment, offset, length = marker["files"][kind]
    return str(segment), int(offset), int(length)


class Segment:
    """Segment files (``sNNNNN.results``, ``.csv``, ``.errors``) that consecutive partitions
    are appended to, each partition then marked done.

    One partition's commit: its bytes appended to each file and put on disk (fsync), then its
    marker written (atomically, durably) with its tally and where its bytes lie. Bytes after
    the last marked partition (an interrupted commit) are never read: outputs are assembled
    from the markers' spans. Commits must come from one thread at a time.
    """

    def __init__(self, work: WorkDir, first: int) -> None:
        self.work = work
        self.name = f"s{first:05d}"
        self._files: dict[str, IO[bytes]] = {}
        try:
            for kind in KINDS:
                path = work.parts / f"{self.name}.{kind}"
                # A segment of the same name can only hold an interrupted commit (its first
                # partition is not done, so no marker points into it): a new file replaces it.
                path.unlink(missing_ok=True)
                self._files[kind] = open(path, "xb")  # noqa: SIM115 - closed in close()
        except BaseException:
            self.close()
            raise

    def commit(self, index: int, encoded: EncodedPartition, tally: Tally) -> None:
        spans: dict[str, list[Any]] = {}
        for kind, data in encoded.files():
            f = self._files[kind]
            offset = f.tell()
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            spans[kind] = [f"{self.name}.{kind}", offset, len(data)]
        write_json(self.work.marker_path(index), {"tally": tally.to_json(), "files": spans})

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
