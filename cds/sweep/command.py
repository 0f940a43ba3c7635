"""`cds sweep`: screen a whole registry (FHIR REST, Bulk $export or NDJSON) into a report."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cds.criteria import load_trials
from cds.errors import InputError, OutputError
from cds.evaluate_command import parse_as_of
from cds.sweep.runner import SweepOptions, print_summary, sweep_ndjson
from cds.sweep.spark_output import is_url

if TYPE_CHECKING:
    from cds.fhir.auth import TokenSource
    from cds.fhir.client import FhirClient

# The FHIR client stack (requests, SMART auth, Bulk export, write-back) is imported where a
# server is used: an NDJSON sweep starts ~0.1 s sooner without it.

log = logging.getLogger(__name__)

#: the local FHIR server `make run` starts (scripts/serve-fhir-server on port 8080)
DEFAULT_FHIR_BASE = "http://127.0.0.1:8080/fhir"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from exc
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from exc
    if value <= 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _tag(value: str) -> tuple[str, str]:
    from cds.fhir.loader import parse_tag

    return parse_tag(value)


def _auth(args: argparse.Namespace) -> TokenSource | None:
    from cds.fhir.auth import SmartBackendAuth

    given = [args.smart_client_id, args.smart_key, args.smart_token_url]
    if not any(given):
        return None
    if not all(given):
        raise InputError(
            "SMART Backend Services needs --smart-client-id, --smart-key and "
            "--smart-token-url together",
            source="--smart-client-id",
        )
    try:
        key = Path(args.smart_key).read_bytes()
    except OSError as exc:
        raise InputError(
            f"cannot read the private key ({exc.strerror})", source=str(args.smart_key)
        ) from exc
    return SmartBackendAuth(
        token_url=args.smart_token_url,
        client_id=args.smart_client_id,
        private_key=key,
        key_id=args.smart_kid or args.smart_client_id,
        algorithm=args.smart_alg,
        allow_insecure_loopback=True,
    )


#: errno values that mean the output cannot be written for lack of space (or a size limit)
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_NO_WRITE = frozenset({errno.EACCES, errno.EROFS, errno.EPERM})

#: exit status of a sweep that ran to the end but could not evaluate some patients
EXIT_PATIENT_ERRORS = 3


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except OSError as exc:
        # requests' errors are OSErrors too, but the client translates those; what is left
        # here is the output disk. Resume is exact (partitions commit atomically).
        if exc.errno in _NO_SPACE:
            # A Spark sweep has no checkpoint to resume from (its tasks are retried by Spark
            # itself); it is run again over the outputs it left.
            again = (
                "run the same command with --overwrite"
                if args.engine == "spark"
                else "run the same command with --resume: every partition written so far is kept"
            )
            raise OutputError(
                f"cannot write the sweep's output: {exc.strerror}. Free some space (or raise "
                f"the limit) and {again}",
                source=str(exc.filename or args.out),
            ) from exc
        if exc.errno in _NO_WRITE:
            raise OutputError(
                f"cannot write the sweep's output: {exc.strerror}",
                source=str(exc.filename or args.out),
            ) from exc
        raise


def _run(args: argparse.Namespace) -> int:
    if args.engine == "spark":
        from cds.sweep.spark import run_spark

        return run_spark(args)
    for flag, given in (
        ("--overwrite", args.overwrite),
        ("--parquet", args.parquet),
        ("--assemble-limit", args.assemble_limit is not None),
    ):
        if given:
            raise InputError(f"{flag} applies to --engine spark", source=flag)
    if is_url(args.out):
        raise InputError(
            "a URL is written by --engine spark; --engine local writes a directory",
            source="--out",
        )
    args.out = Path(args.out)
    as_of = parse_as_of(args.as_of) if args.as_of else None
    trials = load_trials(args.trial) if args.trial else load_trials()
    workers = args.workers or max(1, os.cpu_count() or 1)
    opts = SweepOptions(
        out=args.out,
        trials=trials,
        as_of=as_of,
        resume=args.resume,
        workers=workers,
        stream=sys.stderr,
    )
    if args.ndjson is not None:
        if args.write_back and args.fhir_base is None:
            raise InputError(
                "--write-back needs --fhir-base (where to write)", source="--write-back"
            )
        if args.source not in (None, "ndjson"):
            raise InputError(
                "--ndjson reads files; --source applies to --fhir-base", source="--source"
            )
        summary = sweep_ndjson(Path(args.ndjson), opts)
        client = _client(args) if args.write_back else None
    else:
        from cds.fhir.bulk import BulkExporter, export_supported
        from cds.sweep.remote import RestOptions, sweep_export, sweep_rest

        base = args.fhir_base or DEFAULT_FHIR_BASE
        auth = _auth(args)
        client = _client(args, base, auth)
        source = args.source or "auto"
        if source in ("auto", "export"):
            offered = export_supported(client.capabilities(), group=bool(args.group))
            if not offered and source == "export":
                raise InputError(
                    f"{base} does not offer $export (its CapabilityStatement "
                    "lists no export operation)",
                    source="--source",
                )
            source = "export" if offered and not args.patient and not args.tag else "rest"
            if source == "rest" and args.source == "auto":
                sys.stderr.write("cds sweep: using FHIR REST paging\n")
        if source == "export":
            summary = sweep_export(BulkExporter(client), base, opts, group=args.group)
        else:
            rest = RestOptions(
                concurrency=args.concurrency,
                page_size=args.page_size,
                tag=args.tag,
                group=args.group,
                patient_ids=args.patient or (),
                patient_deadline_s=args.patient_timeout,
            )
            summary = sweep_rest(client, opts, rest)
    print_summary(summary, sys.stdout)
    if args.write_back and client is not None:
        from cds.sweep.writeback import write_back

        report = write_back(client, trials, args.out / "candidates.csv", client.capabilities())
        sys.stdout.write(
            f"write-back: ResearchStudy {report.studies_created} created, "
            f"{report.studies_existing} already there; ResearchSubject "
            f"{report.subjects_created} created, {report.subjects_existing} already there\n"
        )
    if client is not None:
        client.close()
    sys.stdout.write(
        f"wrote {args.out}/results.ndjson, candidates.csv, summary.json, report.html\n"
    )
    if summary.get("errors"):
        # Not "complete, exit 0": these patients were not screened (a failed search, an
        # unreadable record), and candidates.csv cannot say anything about them.
        sys.stderr.write(
            f"cds sweep: {summary['errors']:,} patient(s) could not be evaluated; see "
            f"{args.out}/errors.ndjson (exit status {EXIT_PATIENT_ERRORS})\n"
        )
        return EXIT_PATIENT_ERRORS
    return 0


def _client(
    args: argparse.Namespace, base: str | None = None, auth: TokenSource | None = None
) -> FhirClient:
    from cds.fhir.bulk import rate_limited_sessions
    from cds.fhir.client import FhirClient, Timeouts

    base = base or args.fhir_base
    # The operator named this server on the command line: that is the allowlist. Plain http
    # is still refused unless it goes to loopback (a local server).
    return FhirClient(
        base_url=base,
        trusted_base_urls=[base],
        allow_insecure_loopback=True,
        auth=auth,
        # --timeout bounds each whole request and answer, not just each socket read.
        timeouts=Timeouts(read=args.timeout, total=args.timeout),
        max_pages=10_000,
        session_factory=rate_limited_sessions(args.max_rps),
    )


def register(subparsers: Any, fixtures_subparsers: Any) -> None:
    """Add ``cds sweep``."""
    parser = subparsers.add_parser(
        "sweep",
        help="screen every patient of a FHIR server or an NDJSON export",
        description="Evaluate every patient of a FHIR server (REST paging or Bulk $export) or "
        "of a directory of NDJSON files against the trials, and write results.ndjson, "
        "candidates.csv, summary.json and report.html into --out.",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--fhir-base", metavar="URL", help=f"FHIR server to sweep (default {DEFAULT_FHIR_BASE})"
    )
    where.add_argument(
        "--ndjson",
        metavar="DIR",
        help="a directory of NDJSON files (with --engine spark, also a URL Spark reads)",
    )
    parser.add_argument(
        "--trial", action="append", metavar="NCT", help="only this trial (repeatable)"
    )
    parser.add_argument(
        "--as-of",
        metavar="YYYY-MM-DD",
        help="evaluation date for the whole run (default today; a resumed sweep keeps its own)",
    )
    # Kept as given (not a Path, which would fold the // of hdfs://host/...): --engine spark
    # also writes to a URL
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted sweep in --out from its checkpoint",
    )
    parser.add_argument(
        "--write-back",
        action="store_true",
        help="create a ResearchStudy per "
        "trial and a ResearchSubject per candidate on the server (idempotent)",
    )
    parser.add_argument(
        "--source",
        choices=("auto", "rest", "export"),
        help="how to read the server (default: $export if its "
        "CapabilityStatement offers it, else REST paging)",
    )
    parser.add_argument(
        "--concurrency",
        type=_positive_int,
        default=4,
        metavar="N",
        help="patients fetched at once over REST (default 4)",
    )
    parser.add_argument(
        "--max-rps", type=_positive_float, metavar="R", help="at most R HTTP requests per second"
    )
    parser.add_argument(
        "--workers",
        type=_positive_int,
        metavar="N",
        help="evaluation processes for NDJSON/export (default: CPU count)",
    )
    parser.add_argument(
        "--page-size",
        type=_positive_int,
        default=100,
        metavar="N",
        help="_count for searches (default 100)",
    )
    parser.add_argument(
        "--tag",
        type=_tag,
        metavar="SYSTEM|CODE",
        help="only patients (and data) with this meta.tag (REST)",
    )
    parser.add_argument("--group", metavar="ID", help="only the members of Group/ID")
    parser.add_argument(
        "--patient", action="append", metavar="ID", help="only this patient (repeatable; REST)"
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=60.0,
        metavar="SECONDS",
        help="time allowed for each request and its whole answer (default 60)",
    )
    parser.add_argument(
        "--patient-timeout",
        type=_positive_float,
        default=300.0,
        metavar="SECONDS",
        help="time allowed for all of one patient's requests over REST, retries included; "
        "past it the patient is an error in errors.ndjson (default 300)",
    )
    smart = parser.add_argument_group("SMART Backend Services (optional)")
    smart.add_argument("--smart-client-id", metavar="ID")
    smart.add_argument("--smart-key", metavar="PEM_FILE")
    smart.add_argument("--smart-kid", metavar="KID", help="key id (default: the client id)")
    smart.add_argument("--smart-token-url", metavar="URL")
    smart.add_argument("--smart-alg", choices=("RS384", "ES384"), default="RS384")
    from cds.sweep.spark import add_spark_arguments

    add_spark_arguments(parser)
    parser.set_defaults(func=run)
