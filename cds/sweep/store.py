"""The sweep's working directory: checkpoint, per-partition outputs, and the final files.

Every file is written to a temporary name and renamed into place (POSIX rename is atomic),
so a crash or Ctrl-C never leaves a half-written file under a real name. A partition counts as
done when its tally file exists; that file is written last, after the partition's results.
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

STATE_VERSION = 1
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


def _append(path: Path, out: IO[bytes]) -> None:
    """Append a file to ``out`` (flushed, positioned at its end): in the kernel where it can
    (copy_file_range), through a buffer where it cannot."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            while size > 0:
                copied = os.copy_file_range(f.fileno(), out.fileno(), size)
                if copied == 0:
                    break
                size -= copied
        except OSError:
            pass  # another filesystem or kernel: copy what is left in user space
        if size > 0:
            shutil.copyfileobj(f, out, 1 << 20)
            out.flush()


def write_json(path: Path, data: Any) -> None:
    with atomic_open(path) as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
        f.write("\n")


@dataclass(frozen=True)
class EncodedPartition:
    """A partition's output files as bytes, ready to be written."""

    results: bytes
    csv: bytes
    errors: bytes

    def files(self) -> tuple[tuple[str, bytes], ...]:
        return (("results", self.results), ("csv", self.csv), ("errors", self.errors))


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
    # Result lines are most of the bytes (~20 KB a patient): joined and encoded once.
    results = "".join(o.line for o in outcomes if o.line is not None)
    return EncodedPartition(results.encode(), rows.getvalue().encode(), errors.encode())


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
            raise InputError("nothing to resume: no checkpoint here", source=str(self.out))
        if saved is not None:
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

    def part_path(self, index: int, kind: str) -> Path:
        return self.parts / f"p{index:05d}.{kind}"

    def done(self) -> set[int]:
        return {int(p.name[1:6]) for p in self.parts.glob("p*.tally.json") if p.name[1:6].isdigit()}

    def write_partition(self, index: int, outcomes: Iterable[PatientOutcome], tally: Tally) -> None:
        """Commit one partition: results, CSV rows, errors, and last the tally (the marker)."""
        self.commit_partition(index, encode_partition(outcomes), tally)

    def commit_partition(self, index: int, encoded: EncodedPartition, tally: Tally) -> None:
        """Write an encoded partition's files, each on disk before the next, the tally (which
        marks the partition done) last. Mostly waiting on the disk, so it can run in a
        background thread while the next partition is evaluated."""
        for kind, data in encoded.files():
            with atomic_open(self.part_path(index, kind), "wb") as f:
                f.write(data)
        write_json(self.part_path(index, "tally.json"), tally.to_json())

    def merged_tally(self, empty: Tally, indices: Iterable[int]) -> Tally:
        total = empty
        for index in sorted(indices):
            with open(self.part_path(index, "tally.json"), encoding="utf-8") as f:
                total.merge(Tally.from_json(json.load(f)))
        return total

    def assemble(self, indices: Iterable[int]) -> None:
        """Concatenate the done partitions, in partition order, into the output files."""
        order = sorted(indices)
        header = io.StringIO()
        csv.writer(header).writerow(CSV_HEADER)
        for name, kind, head in (
            ("results.ndjson", "results", b""),
            ("candidates.csv", "csv", header.getvalue().encode()),
            ("errors.ndjson", "errors", b""),
        ):
            # Not fsynced: every byte is in the partition files, which are, and a resumed
            # sweep (--resume, even after a complete one) assembles the outputs again.
            with atomic_open(self.out / name, "wb", durable=False) as out:
                out.write(head)
                out.flush()
                for index in order:
                    _append(self.part_path(index, kind), out)

    def error_samples(self, indices: Iterable[int], limit: int = 20) -> list[JSONDict]:
        found: list[JSONDict] = []
        for index in sorted(indices):
            with open(self.part_path(index, "errors"), encoding="utf-8") as f:
                for line in f:
                    found.append(json.loads(line))
                    if len(found) >= limit:
                        return found
        return found

    def clean_inputs(self) -> None:
        """Drop the prepared input (partition buckets, export files) once the sweep is complete."""
        shutil.rmtree(self.input, ignore_errors=True)
