"""NDJSON input: stream the files once into per-patient hash buckets, then evaluate a bucket.

Grouping a population by patient without holding it in memory is an external hash partition:
each line goes, unparsed, to bucket ``crc32(patient id) mod P``; a bucket (a few tens of MB)
holds every resource of its patients, so it is evaluated on its own, in any process or on any
machine. Finding the patient of a line is a regular expression on the raw text in the common
case (compact JSON, one ``subject``/``patient``/``individual`` reference, nothing contained);
anything else is parsed properly.
"""

from __future__ import annotations

import io
import json
import logging
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import IO, Any

from cds.criteria import TrialSet, load_trials
from cds.criteria.ndc import NDC, ndc_spellings
from cds.criteria.reads import (
    CLINICAL_TYPES,
    PATIENT_REFERENCE_ELEMENTS,
    RECORD_TYPES,
    UNCODED_TYPES,
)
from cds.criteria.record import patient_reference
from cds.errors import InputError
from cds.sweep.core import PatientOutcome, Tally, error_outcome, evaluate_resources, outcome_of
from cds.sweep.store import WorkDir

log = logging.getLogger(__name__)

JSONDict = dict[str, Any]

#: target bucket size: small enough for one worker's memory, large enough to keep P modest
BUCKET_BYTES = 24 << 20
MAX_BUCKETS = 2048
#: the resource types read into a record, in the order a record's resources are presented
#: (the order the FHIR queries and the generator use, so results match `cds evaluate`)
TYPE_RANK = {t: i for i, t in enumerate(RECORD_TYPES)}
_KEPT = frozenset(RECORD_TYPES)
_CLINICAL_BYTES = frozenset(t.encode() for t in CLINICAL_TYPES)
#: clinical types read whole, never set aside by the code prefilter
_UNCODED_BYTES = frozenset(t.encode() for t in UNCODED_TYPES)
_CODED_BYTES = _CLINICAL_BYTES - _UNCODED_BYTES

_TYPE_RE = re.compile(rb'^\s*\{\s*"resourceType"\s*:\s*"([A-Za-z]+)"')
# a reference in one of the elements that name the patient (as patient_reference reads them)
_REF_RE = re.compile(
    rb'"(?:'
    + "|".join(PATIENT_REFERENCE_ELEMENTS).encode()
    + rb')"\s*:\s*\{\s*"reference"\s*:\s*"([^"\\]+)"'
)


def ndjson_files(directory: Path) -> list[Path]:
    """The ``*.ndjson`` files of a directory, Patient first and then by resource type (a Bulk
    export names each file after its type, possibly with a numeric suffix)."""
    if not directory.is_dir():
        raise InputError("not a directory", source=str(directory))
    files = sorted(p for p in directory.iterdir() if p.suffix == ".ndjson" and p.is_file())
    if not files:
        raise InputError("directory holds no *.ndjson file", source=str(directory))
    return sorted(files, key=lambda path: file_order(path.name))


def file_order(name: str) -> tuple[int, str]:
    """Where a file of a directory is read: Patient first, then by resource type."""
    stem = name.rsplit(".", 1)[0].split(".")[0].split("_")[0].split("-")[0]
    return TYPE_RANK.get(stem, len(TYPE_RANK)), name


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
    #: JSON objects that are not FHIR resources (a Bulk export's log lines): not data, not bad
    non_resource: int = 0
    orphans: int = 0
    bytes: int = 0
    #: clinical resources no criterion reads, left out before they were parsed or bucketed
    irrelevant: int = 0

    def merge(self, other: PartitionStats) -> None:
        """Add another reader's counts (each counted its own lines)."""
        for name in (
            "lines",
            "patients",
            "resources",
            "shared",
            "unreadable",
            "non_resource",
            "orphans",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.bytes += other.bytes
        self.irrelevant += other.irrelevant
        for rtype, n in other.skipped_types.items():
            self.skipped_types[rtype] = self.skipped_types.get(rtype, 0) + n

    def to_json(self) -> JSONDict:
        return {
            "lines": self.lines,
            "patients": self.patients,
            "resources": self.resources,
            "shared_medications": self.shared,
            "skipped_types": self.skipped_types,
            "unreadable_lines": self.unreadable,
            "non_resource_lines": self.non_resource,
            "resources_naming_no_patient": self.orphans,
            "irrelevant_resources": self.irrelevant,
        }


def choose_buckets(files: list[Path], workers: int) -> int:
    size = sum(p.stat().st_size for p in files)
    return max(1, min(MAX_BUCKETS, max(workers, -(-size // BUCKET_BYTES))))


#: read size of the partitioning pass; a block is extended to the end of its last line
BLOCK_BYTES = 4 << 20


def bucket_of(pid: bytes, buckets: int) -> int:
    """The routing rule: the partition of a patient's lines (one function for every engine, so
    a patient's resources meet in one partition whichever engine sweeps them)."""
    return zlib.crc32(pid) % buckets


@dataclass(frozen=True)
class ByteRange:
    """A piece of one input file: the lines that START in ``[start, end)`` of it. Ranges that
    tile a file give each of its lines to exactly one reader, whoever reads them."""

    path: str
    start: int
    end: int


def byte_ranges(files: list[Path], pieces: int, *, min_bytes: int = 1 << 20) -> list[ByteRange]:
    """Each file cut into at most ``pieces`` ranges of at least ``min_bytes`` (a small file is
    one range), in file order and, within a file, in byte order."""
    ranges: list[ByteRange] = []
    for path in files:
        size = path.stat().st_size
        n = max(1, min(pieces, size // max(1, min_bytes)))
        cuts = [size * k // n for k in range(n + 1)]
        ranges += [ByteRange(str(path), a, b) for a, b in zip(cuts, cuts[1:], strict=False)]
    return ranges


def read_range(piece: ByteRange, block_bytes: int = BLOCK_BYTES) -> Iterator[bytes]:
    """The lines that start in a byte range, in blocks of whole lines (a block ends at the end
    of its last line, which may lie past the range's end: the line is the range's)."""
    with open(piece.path, "rb") as f:
        if piece.start > 0:
            # A line that starts before the range is the previous range's: skip its rest.
            f.seek(piece.start - 1)
            if f.read(1) != b"\n":
                f.readline()
        position = f.tell()
        while position < piece.end:
            block = f.read(min(block_bytes, piece.end - position))
            if not block:
                return
            if not block.endswith(b"\n"):
                block += f.readline()
            position += len(block)
            yield block


def partition_ndjson(
    files: list[Path],
    work: WorkDir,
    buckets: int,
    progress: Callable[[int], None] | None = None,
    keep: CodePrefilter | None = None,
    workers: int = 1,
    worker_init: Callable[[], None] | None = None,
) -> PartitionStats:
    """Stream every line of ``files`` into ``buckets`` bucket files under the work directory.

    Lines are copied as bytes, never re-serialised. Clinical lines ``keep`` rejects (resources
    no criterion reads, see :class:`CodePrefilter`) are left out here, before they cost a
    route, a write and a parse. Medication resources name no patient: they go to a shared
    file every bucket reads, as `records_from_bundle` gives every patient of a Bundle its
    Medications.

    The files are read in blocks. A block of compact lines that all hold one clinical type
    (what a Bulk export writes) is searched as a whole for lines that may name a code some
    criterion reads; only those are looked at one by one, the rest are counted as irrelevant
    without a Python step per line. Any other block goes line by line.

    With ``workers`` > 1 each worker owns the lines that start in its byte range of every file
    and writes bucket files of its own; where each file's lines begin in them is recorded
    (``spans.json``), so a bucket is read back in input order, as one worker would have
    written it (a record's resources keep the order `cds evaluate` sees).
    """
    if workers > 1:
        return _partition_parallel(files, work, buckets, progress, keep, workers, worker_init)
    with ExitStack() as stack:
        handles: list[IO[bytes]] = [
            stack.enter_context(open(work.input / f"b{i:05d}.ndjson", "wb", buffering=1 << 16))
            for i in range(buckets)
        ]
        shared = stack.enter_context(open(work.input / "shared.ndjson", "wb"))
        partition = Partition(handles, shared, keep)
        stats = partition.stats
        for path in files:
            partition.start(str(path))
            for block in read_range(ByteRange(str(path), 0, path.stat().st_size)):
                stats.bytes += len(block)
                partition.block(block)
                if progress is not None:
                    progress(stats.bytes)
    return stats


#: per bucket, (file, offset, length) of its lines in input order (parallel partitioning)
Spans = list[tuple[str, int, int]]


def _partition_parallel(
    files: list[Path],
    work: WorkDir,
    buckets: int,
    progress: Callable[[int], None] | None,
    keep: CodePrefilter | None,
    workers: int,
    worker_init: Callable[[], None] | None,
) -> PartitionStats:
    import multiprocessing

    context = multiprocessing.get_context("fork")  # workers inherit the prefilter
    done = context.Value("q", 0)
    jobs = [
        _RangeJob(k, workers, [str(p) for p in files], str(work.input), buckets, keep)
        for k in range(workers)
    ]
    global _BYTES_DONE  # noqa: PLW0603 - the fork inherits it: the workers' progress counter
    _BYTES_DONE = done
    with context.Pool(workers, initializer=worker_init) as pool:
        pending = pool.map_async(_partition_worker, jobs)
        while not pending.ready():
            pending.wait(0.5)
            if progress is not None:
                progress(done.value)
        results = pending.get()
    stats = PartitionStats()
    spans: list[Spans] = [[] for _ in range(buckets)]
    with open(work.input / "shared.ndjson", "wb") as shared:
        for f in range(len(files)):
            for k, (_, worker_spans, worker_shared) in enumerate(results):
                shared.write(worker_shared[f])
                name = f"b{{:05d}}.w{k}.ndjson"
                for b in range(buckets):
                    offset, length = worker_spans[f][b]
                    if length:
                        spans[b].append((name.format(b), offset, length))
    for worker_stats, _, _ in results:
        stats.merge(worker_stats)
    write_spans(work, spans)
    return stats


_BYTES_DONE: Any = None


@dataclass(frozen=True)
class _RangeJob:
    index: int
    workers: int
    files: list[str]
    directory: str
    buckets: int
    keep: CodePrefilter | None


def _partition_worker(
    job: _RangeJob,
) -> tuple[PartitionStats, list[list[tuple[int, int]]], list[bytes]]:
    """One worker's share of the partitioning pass: its byte range of every file, into bucket
    files of its own; returns its stats, per file and bucket where that file's lines lie in
    its bucket files, and per file its Medication lines."""
    directory = Path(job.directory)
    spans: list[list[tuple[int, int]]] = []
    shared_by_file: list[bytes] = []
    with ExitStack() as stack:
        handles: list[IO[bytes]] = [
            stack.enter_context(
                open(directory / f"b{i:05d}.w{job.index}.ndjson", "wb", buffering=1 << 16)
            )
            for i in range(job.buckets)
        ]
        shared = io.BytesIO()
        partition = Partition(handles, shared, job.keep)
        for name in job.files:
            size = Path(name).stat().st_size
            piece = ByteRange(
                name, size * job.index // job.workers, size * (job.index + 1) // job.workers
            )
            before = [h.tell() for h in handles]
            partition.start(name, piece.start)
            for block in read_range(piece):
                partition.stats.bytes += len(block)
                partition.block(block)
                if _BYTES_DONE is not None:
                    with _BYTES_DONE.get_lock():
                        _BYTES_DONE.value += len(block)
            spans.append([(a, h.tell() - a) for a, h in zip(before, handles, strict=True)])
            shared_by_file.append(shared.getvalue())
            shared.seek(0)
            shared.truncate()
    return partition.stats, spans, shared_by_file


def write_spans(work: WorkDir, spans: list[Spans]) -> None:
    with open(work.input / "spans.json", "w", encoding="utf-8") as f:
        json.dump(spans, f)


def read_spans(work: WorkDir) -> list[Spans] | None:
    """Where each bucket's lines lie, when the partitioning pass was parallel; else None."""
    try:
        with open(work.input / "spans.json", encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    return [[(str(n), int(o), int(ln)) for n, o, ln in spans] for spans in data]


class Partition:
    """The partitioning pass's state: where lines go and what was counted."""

    def __init__(
        self, handles: list[IO[bytes]], shared: IO[bytes], keep: CodePrefilter | None
    ) -> None:
        self.handles = handles
        self.shared = shared
        self.keep = keep
        self.stats = PartitionStats()
        #: the file being read and the number of its last line read, for reports
        self.source = ""
        self.line_no = 0
        #: where in the file counting started (a byte range's start), so line numbers are
        #: ``line_no`` after the lines before it (counted only if a report needs them)
        self.offset = 0

    def start(self, source: str, offset: int = 0) -> None:
        """Lines from here on are those of ``source`` from the first line that starts at or
        after byte ``offset``."""
        self.source, self.line_no, self.offset = source, 0, offset

    def where(self) -> str:
        """The file and line number of the last line read."""
        before = 0
        if self.offset:
            try:
                with open(self.source, "rb") as f:
                    head = f.read(self.offset)
                    if not head.endswith(b"\n"):
                        head += f.readline()  # the previous range's last line
                    before = head.count(b"\n")
            except OSError:
                return f"{self.source} line {self.line_no} after byte {self.offset}"
        return f"{self.source} line {before + self.line_no}"

    def block(self, block: bytes) -> None:
        uniform = _uniform_type(block) if self.keep is not None else None
        candidates = None
        if self.keep is not None and uniform is not None and uniform[0] in _CODED_BYTES:
            candidates = self.keep.candidate_lines(block, uniform[0])
        if candidates is None:  # mixed, spaced or escaped lines, drug references: one by one
            for raw in io.BytesIO(block):
                self.line(raw)
            return
        keep = self.keep
        assert keep is not None and uniform is not None  # noqa: S101 - checked above
        # Lines of a uniform block are compact, typed and closed: route them here, and write
        # each bucket's share of the block at once (pieces joined once, at the write).
        pending: dict[int, list[bytes]] = {}
        buckets = len(self.handles)
        kept = irrelevant = 0
        for line, certain in candidates:
            if not certain and not keep(line):
                irrelevant += 1
                continue
            pid = _fast_patient_id(line)
            if pid is None:
                self._flush(pending)  # keep the input order within each bucket
                self.line(line, numbered=False)  # counts itself
                continue
            kept += 1
            share = pending.get(bucket := bucket_of(pid, buckets))
            if share is None:
                share = pending[bucket] = []
            share += (pid, b"\t", line)
        self._flush(pending)
        self.line_no += uniform[1]
        skipped = uniform[1] - len(candidates) + irrelevant
        stats = self.stats
        stats.lines += skipped + kept
        stats.irrelevant += skipped
        stats.resources += kept

    def _unreadable(self, line: bytes) -> None:
        """A line that is not a readable resource: reported with its file and line number,
        and, when the patient it names can still be read from it, marked in that patient's
        data so the patient is never evaluated as if the line held nothing."""
        where = self.where()
        log.warning("%s: not a readable FHIR resource; skipped", where)
        refs = {r for r in _REF_RE.findall(line) if _reference_id(r.decode(errors="replace"))}
        if len(refs) != 1:
            return
        pid = _reference_id(refs.pop().decode(errors="replace"))
        if pid is None:
            return
        mark = {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "structure", "diagnostics": where}],
        }
        encoded = pid.encode()
        self.handles[bucket_of(encoded, len(self.handles))].write(
            encoded + b"\t" + json.dumps(mark).encode() + b"\n"
        )

    def _flush(self, pending: dict[int, list[bytes]]) -> None:
        for bucket, lines in pending.items():
            self.handles[bucket].write(b"".join(lines))
        pending.clear()

    def line(self, raw: bytes, *, numbered: bool = True) -> None:
        stats = self.stats
        stats.lines += 1
        if numbered:
            self.line_no += 1
        if raw[:1] == b"{" and raw[-2:] == b"}\n":
            line = raw
            m = _TYPE_RE.match(line)
        else:
            line = raw.strip()
            if not line:
                return
            # A line that does not close its object (cut short, say) is parsed, so that it
            # is counted as unreadable, never skipped as irrelevant.
            m = _TYPE_RE.match(line) if line.endswith(b"}") else None
            line += b"\n"  # the last line of a file may lack its newline
        rtype = m.group(1) if m else None
        if rtype in _CLINICAL_BYTES:
            if self.keep is not None and rtype in _CODED_BYTES and not self.keep(line):
                stats.irrelevant += 1
                return
            pid = _fast_patient_id(line)
            kind: str | None = "clinical"
        elif rtype == b"Medication":
            kind, pid = "Medication", None
        elif rtype is not None and rtype != b"Patient":
            # resourceType leads the object, so it is the resource's own type
            name = rtype.decode()
            stats.skipped_types[name] = stats.skipped_types.get(name, 0) + 1
            return
        else:
            kind, pid = "parse", None
        if pid is None and kind != "Medication":
            kind, pid = _parse_route(line, stats, self.keep)
        if kind == "unreadable":
            self._unreadable(line)
            return
        if kind is None:
            return
        if kind == "irrelevant":
            stats.irrelevant += 1
        elif kind == "Medication":
            self.shared.write(line)
            stats.shared += 1
        elif pid is None:
            stats.orphans += 1
        else:
            # The patient id leads the line, so reading a bucket back never has to look for
            # it again (ids cannot contain a tab).
            self.handles[bucket_of(pid, len(self.handles))].write(pid + b"\t" + line)
            if kind == "Patient":
                stats.patients += 1
            else:
                stats.resources += 1


_COMPACT_TYPE_RE = re.compile(rb'\{"resourceType":"([A-Za-z]+)"')


def _uniform_type(block: bytes) -> tuple[bytes, int] | None:
    """(resource type, number of lines) of a block whose every line is one compact object
    that starts with the same ``{"resourceType":"T"`` and ends in ``}``; else ``None``."""
    m = _COMPACT_TYPE_RE.match(block)
    if m is None or not block.endswith(b"}\n"):
        return None
    lines = block.count(b"\n")
    # JSON text holds no raw newline, so a line boundary is "\n"; every one of them must join
    # a line that closes its object to one that opens with the same type.
    if block.count(b"}\n" + m.group(0)) != lines - 1:
        return None
    return m.group(1), lines


def _fast_patient_id(line: bytes) -> bytes | None:
    """The patient id of a clinical resource's line when it names exactly one
    ``subject``/``patient``/``individual`` patient reference and contains nothing; ``None``
    when the line must be parsed to be sure."""
    if b'"contained"' in line:
        return None
    # The common case by substring searches (faster than a regex over the line): one
    # "subject" key and no "patient" key, so at most one reference to read, where it is.
    subject = line.find(b'"subject"')
    if subject >= 0 and line.find(b'"patient"') < 0 and line.find(b'"subject"', subject + 9) < 0:
        m = _REF_RE.match(line, subject)
        if m is None:
            return None  # a "subject" that is not a reference: nothing names the patient
        refs = [m.group(1)]
    else:
        refs = _REF_RE.findall(line)
    if not refs or (len(refs) > 1 and refs.count(refs[0]) != len(refs)):
        return None
    ref = refs[0]
    if ref.startswith(b"Patient/") and len(ref) > 8 and ref.find(b"/", 8) == -1:
        return ref[8:]
    pid = _reference_id(ref.decode())  # [base]/Patient/abc, Patient/abc/_history/2
    return pid.encode() if pid else None


def _parse_route(
    line: bytes, stats: PartitionStats, keep: CodePrefilter | None
) -> tuple[str | None, bytes | None]:
    """(kind, patient id) of a line the fast path could not route, by parsing it: kind is the
    resource type, ``"irrelevant"``, or ``None`` for a line that is not kept."""
    try:
        resource = json.loads(line)
    except ValueError:
        stats.unreadable += 1
        return "unreadable", None
    if isinstance(resource, dict) and "resourceType" not in resource:
        stats.non_resource += 1  # a log line of a Bulk export, say
        return None, None
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        stats.unreadable += 1
        return "unreadable", None
    rtype = resource["resourceType"]
    if rtype not in _KEPT:
        stats.skipped_types[rtype] = stats.skipped_types.get(rtype, 0) + 1
        return None, None
    if rtype == "Patient":
        rid = resource.get("id")
        return (rtype, rid.encode()) if isinstance(rid, str) and rid else (None, None)
    if rtype == "Medication":
        return rtype, None
    if keep is not None and rtype not in UNCODED_TYPES and not keep(line):
        return "irrelevant", None
    ref = patient_reference(resource, {})
    pid = _reference_id(ref) if ref else None
    return rtype, (pid.encode() if pid else None)


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
    #: where the bucket's lines lie, in input order, when they are not one whole file
    #: (parallel partitioning): (file name in the bucket's directory, offset, length)
    spans: tuple[tuple[str, int, int], ...] | None = None


_CODE_VALUE_RE = re.compile(rb'"code"\s*:\s*"([^"\\]*)"')


class CodePrefilter:
    """A test on the raw NDJSON line of a clinical resource (Condition, Procedure,
    Observation, medication): False only when none of its ``"code"`` values is a code some
    criterion reads, so the line need not even be parsed.

    Most of a population's lines are vital signs, routine diagnoses and drugs no criterion
    reads, and parsing JSON is the sweep's largest cost, so they are set aside before parsing.
    Every ``"code": "..."`` value in the line is checked (the resource's code, but also units,
    categories and statuses, which only keeps a few lines too many: the record's own relevance
    test then drops them), normalised as the record normalises codes (trimmed; ICD-10-CM
    without its dot, upper case, families by prefix; an NDC in each spelling that normalises
    to a mapped one). A line is dropped only if none can
    match; a line with JSON escapes, or whose drug is a reference to a Medication, is kept.
    """

    def __init__(self, trials: TrialSet) -> None:
        exact: set[str] = set()
        prefixes: set[str] = set()
        for vs in trials.used_valuesets():
            for system, code in vs.codes:
                # An NDC is stored as its 11-digit form; lines carry any accepted spelling.
                exact.update(ndc_spellings(code) if system == NDC else (code,))
            prefixes.update(prefix for _, prefix in vs.prefixes)
        self._exact = frozenset(c.encode() for c in exact)
        self._prefixes = tuple(p.encode() for p in sorted(prefixes))
        # A population repeats a few hundred distinct codes; each is judged once.
        self._memo: dict[bytes, bool] = {}
        # Without its opening quote: the search then skips ahead to a "c", not to any quote
        # (one byte in seven of JSON), which makes it about a fifth faster; the quote is
        # checked on each match.
        self._candidate_re = re.compile(
            rb'code"\s*:\s*"\s*('
            + _trie_pattern([_code_atoms(c) for c in exact | prefixes])
            + rb")"
        )
        # Records that name a disease or procedure in words only (text signals, which a rule
        # reads where no code says it): a line whose "text" or "display" strings hold the
        # words is kept. The strings are found by two searches with a literal prefix and each
        # distinct string is judged once (a signal's pattern run over whole blocks cost more
        # than the rest of the prefilter together).
        self._text_types = frozenset(
            rtype.encode() for rtype in CLINICAL_TYPES if trials.text_signals_for(rtype)
        )
        patterns = {s.line_pattern for t in CLINICAL_TYPES for s in trials.text_signals_for(t)}
        self._names = (
            re.compile(b"|".join(b"(?:" + p + b")" for p in sorted(patterns))).search
            if patterns
            else None
        )
        self._named_memo: dict[bytes, bool] = {}

    def _judge(self, code: bytes) -> bool:
        code = code.strip()
        if code in self._exact:
            return True
        if code[:1].isalpha():
            dotless = code.replace(b".", b"").upper()
            return dotless in self._exact or dotless.startswith(self._prefixes)
        return False

    def __call__(self, line: bytes) -> bool:
        if b"\\" in line or b'"medicationReference"' in line:
            return True
        if self._names is not None and self._holds_words(line):
            return True
        memo = self._memo
        for code in _CODE_VALUE_RE.findall(line):
            known = memo.get(code)
            if known is None:
                known = self._judge(code)
                if len(memo) < 1 << 16:
                    memo[code] = known
            if known:
                return True
        return False

    def candidate_lines(
        self, block: bytes, resource_type: bytes
    ) -> list[tuple[bytes, bool]] | None:
        """The lines of a block of ``resource_type`` resources (each line ending in a newline)
        that may pass the test, found by one search of the whole block, each with whether it
        certainly passes (it names one of the codes exactly); ``None`` when the block holds
        escapes or (in a block of medication resources) drug references, which only the
        line-by-line test judges."""
        if b"\\" in block:
            return None
        # Only medication resources name their drug by reference (a search of every block
        # for it cost ~1 % of a sweep).
        if resource_type.startswith(b"Medication") and b'"medicationReference"' in block:
            return None
        found: dict[int, tuple[bytes, bool]] = {}  # by where the line starts
        after = 0  # end of the last line taken, so each line is taken once
        for m in self._candidate_re.finditer(block):
            key = m.start() - 1
            if key < after or block[key] != 0x22:  # taken already, or not the key "code"
                continue
            start = block.rfind(b"\n", 0, key) + 1
            after = block.index(b"\n", m.end()) + 1
            # Codes that start with a digit are matched exactly (up to the closing quote).
            found[start] = (block[start:after], m.group(1)[:1].isdigit())
        if resource_type in self._text_types:
            # Lines that name a text signal (the line-by-line test keeps them too), merged
            # into the code matches in input order, each line once.
            for m in self._worded(block):
                start = block.rfind(b"\n", 0, m.start()) + 1
                if start not in found:
                    found[start] = (block[start : block.index(b"\n", m.end()) + 1], False)
            return [found[start] for start in sorted(found)]
        return list(found.values())

    def _worded(self, text: bytes) -> Iterator[re.Match[bytes]]:
        """The "text" and "display" strings of ``text`` that hold a text signal's words."""
        memo = self._named_memo
        names = self._names
        assert names is not None  # noqa: S101 - only called when some signal is read
        for string_re in _WORD_STRING_RES:
            for m in string_re.finditer(text):
                value = m.group(1)
                known = memo.get(value)
                if known is None:
                    known = names(value) is not None
                    if len(memo) < 1 << 16:
                        memo[value] = known
                if known:
                    yield m

    def _holds_words(self, line: bytes) -> bool:
        return next(self._worded(line), None) is not None


#: the strings a text signal is looked for in: every "display" (codings) and "text"
#: (CodeableConcept.text) string value; a line with JSON escapes is kept whole before this
_WORD_STRING_RES = (
    re.compile(rb'display"\s*:\s*"([^"\\]*)"'),
    re.compile(rb'text"\s*:\s*"([^"\\]*)"'),
)


def _code_atoms(code: str) -> tuple[str, ...]:
    """A code as a sequence of regex atoms, loose enough to match every way the record
    normalises into it: codes that start with a letter (ICD-10-CM and the like) match in any
    case and with dots anywhere, as prefixes; others match exactly, up to the closing quote
    (surrounding blanks allowed)."""
    if code[:1].isalpha():
        return tuple(
            (f"[{ch.lower()}{ch.upper()}]" if ch.isalpha() else re.escape(ch)) + r"\.*"
            for ch in code
        )
    return (*(re.escape(ch) for ch in code), r'\s*"')


def _trie_pattern(codes: list[tuple[str, ...]]) -> bytes:
    """One regex alternation shaped as a trie, so that a match attempt costs the length of a
    code, not the number of codes. A sequence that ends where another continues matches as
    the shorter (every sequence here is a prefix test or ends at the quote)."""

    def build(seqs: list[tuple[str, ...]]) -> str:
        if any(not s for s in seqs):
            return ""
        children: dict[str, list[tuple[str, ...]]] = {}
        for seq in seqs:
            children.setdefault(seq[0], []).append(seq[1:])
        alternatives = [atom + build(rest) for atom, rest in sorted(children.items())]
        return alternatives[0] if len(alternatives) == 1 else "(?:" + "|".join(alternatives) + ")"

    return build(codes).encode()


@dataclass
class BucketPatient:
    """One patient's lines from a bucket, parsed."""

    id: str
    patient: JSONDict | None
    resources: list[JSONDict]
    #: why the patient's data cannot be trusted whole (a line that is not JSON), if it cannot
    unreadable: str | None = None
    #: input lines naming this patient that could not be read ("FILE line N")
    lost: list[str] = field(default_factory=list)


def read_bucket(
    path: Path, spans: tuple[tuple[str, int, int], ...] | None = None
) -> Iterator[BucketPatient]:
    """Each patient of a bucket in order of first appearance, parsed; only one bucket's raw
    lines are in memory at a time. ``spans``: the bucket's pieces (in the bucket's directory)
    instead of its one file."""
    if spans is None:
        with open(path, "rb", buffering=1 << 20) as f:  # a quarter fewer cycles than 8 KB reads
            yield from group_lines(f)
        return
    pieces = []
    for name, offset, length in spans:
        with open(path.parent / name, "rb") as f:
            f.seek(offset)
            pieces.append(f.read(length))
    yield from group_lines(io.BytesIO(b"".join(pieces)))


def group_lines(lines: Iterable[bytes]) -> Iterator[BucketPatient]:
    """Routed lines (``patient id TAB resource``) grouped per patient in order of first
    appearance, each patient's resources in input order, parsed.

    A patient's lines are parsed in one call (one JSON array), which costs less than a call per
    line; if that fails, line by line to name the line that is not JSON.
    """
    groups: dict[bytes, list[bytes]] = {}
    for line in lines:
        pid, _, resource = line.partition(b"\t")
        groups.setdefault(pid, []).append(resource)
    for key, raw in groups.items():
        unreadable = None
        try:
            parsed = json.loads(b"[" + b",".join(raw) + b"]")
        except ValueError:
            parsed = []
            for number, line in enumerate(raw, 1):
                try:
                    parsed.append(json.loads(line))
                except ValueError as exc:
                    unreadable = unreadable or f"resource {number} of its input is not JSON ({exc})"
        patient: JSONDict | None = None
        resources: list[JSONDict] = []
        lost: list[str] = []
        for resource in parsed:
            if not isinstance(resource, dict):
                continue
            rtype = resource.get("resourceType")
            if rtype == "Patient":
                patient = resource
            elif rtype == "OperationOutcome":  # the partition's mark of a line it could not read
                lost += [str(i.get("diagnostics")) for i in resource.get("issue", ())]
            else:
                resources.append(resource)
        yield BucketPatient(key.decode(), patient, resources, unreadable, lost)


def read_shared(path: Path) -> list[JSONDict]:
    with open(path, "rb") as f:
        return [json.loads(line) for line in f if line.strip()]


def evaluate_bucket(task: BucketTask) -> tuple[int, int, int]:
    """Evaluate one bucket and commit it to the work directory; returns (index, patients,
    errors). Deterministic in its inputs: re-running it writes the same files."""
    outcomes, tally = evaluate_partition(task)
    WorkDir(task.out).write_partition(task.index, outcomes, tally)
    return task.index, tally.patients, tally.errors


def evaluate_partition(task: BucketTask) -> tuple[list[PatientOutcome], Tally]:
    """Evaluate one bucket: each patient's outcome and the partition's tally, nothing written."""
    trials = load_trials(task.trial_ids)  # cached per process: loaded once per worker
    shared = read_shared(task.shared)
    return evaluate_patients(read_bucket(task.bucket, task.spans), shared, trials, task.as_of)


def evaluate_patients(
    items: Iterable[BucketPatient], shared: list[JSONDict], trials: TrialSet, as_of: date
) -> tuple[list[PatientOutcome], Tally]:
    """The map step of every engine: grouped patients in, outcomes and their tally out."""
    tally = Tally.for_trials(trials)
    outcomes: list[PatientOutcome] = []
    for item in items:
        if item.patient is None:
            # Resources for a patient the export does not contain: nothing to evaluate.
            continue
        if item.unreadable is not None:
            # A lost line could be the one resource that excludes the patient: no result
            # rather than one that may pass on incomplete data.
            outcome = error_outcome(f"Patient/{item.id}", f"record unreadable: {item.unreadable}")
            tally.errors += 1
            outcomes.append(outcome)
            continue
        incomplete = None
        if item.lost:
            reason = (
                f"Part of this patient's data could not be read ({'; '.join(item.lost[:2])}), "
                "so what is on record may be incomplete; the readable data would decide it."
            )
            incomplete = dict.fromkeys(CLINICAL_TYPES, reason)
        try:
            evaluation = evaluate_resources(
                [*item.resources, *shared] if shared else item.resources,
                trials,
                as_of,
                patient=item.patient,
                incomplete=incomplete,
            )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            outcome = error_outcome(f"Patient/{item.id}", f"record unreadable: {exc!r}")
            tally.errors += 1
        else:
            outcome = outcome_of(evaluation)
            tally.add(evaluation)
        outcomes.append(outcome)
    return outcomes, tally
