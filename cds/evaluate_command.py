"""`cds evaluate`: screen the patients in FHIR Bundle files against the trials, as JSON or text."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from datetime import date
from pathlib import Path
from typing import Any, TextIO

from cds.criteria import TrialSet, load_trials
from cds.criteria.engine import evaluate
from cds.criteria.model import PatientEvaluation, Result, registry_phrase
from cds.criteria.record import PatientRecord
from cds.errors import InputError
from cds.fhir.bundle import PatientSorter, bundle_resources, records_from_bundle


def parse_as_of(value: str) -> date:
    """An ``--as-of`` date: YYYY-MM-DD, nothing else."""
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise InputError(f"{value!r} is not a date (YYYY-MM-DD)", source="--as-of") from exc


_NDJSON_HINT = "NDJSON (one resource per line) is read by `cds sweep --ndjson DIR`"


def bundle_files(paths: Iterable[str]) -> list[Path]:
    """The files named, with a directory standing for every ``*.json`` in it."""
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(path.glob("*.json"))
            if not found:
                hint = f"; {_NDJSON_HINT}" if any(path.glob("*.ndjson")) else ""
                raise InputError(f"directory holds no *.json file{hint}", source=name)
            files.extend(found)
        elif path.is_file():
            if path.suffix == ".ndjson":
                raise InputError(f"an NDJSON file, not a Bundle: {_NDJSON_HINT}", source=name)
            files.append(path)
        else:
            raise InputError("no such file or directory", source=name)
    return files


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        hint = f"; {_NDJSON_HINT}" if exc.msg == "Extra data" and exc.colno == 1 else ""
        raise InputError(
            f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}){hint}",
            source=str(path),
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot be read ({exc})", source=str(path)) from exc
    except RecursionError as exc:
        raise InputError("nested too deeply to be read", source=str(path)) from exc


def read_bundle_file(path: Path, trials: TrialSet | None = None) -> list[PatientRecord]:
    """The records of one Bundle file, indexed for ``trials`` (default: every shipped trial)."""
    return records_from_bundle(
        _load_json(path), trials if trials is not None else load_trials(), source=str(path)
    )


def sort_files(paths: Iterable[str], trials: TrialSet) -> PatientSorter:
    """Every file read, checked and sorted into per-patient records before anything is
    evaluated (bad input never leaves half an answer behind): a patient whose resources are
    spread over several files (Synthea, SDC test sets) is one record. A file that holds no
    Patient (Synthea's practitioner and hospital files) is noted and skipped."""
    paths = list(paths)
    sorter = PatientSorter(trials)
    for path in bundle_files(paths):
        # Each file's parsed JSON is let go once sorted: only what the rules read is kept.
        content = bundle_resources(_load_json(path), source=str(path))
        if not sorter.add(content, source=str(path)):
            sorter.notes.append(
                f"{path}: holds no Patient; its other resources are kept for any patient they name"
            )
    if not sorter.patients:
        raise InputError("no Patient resource in any file", source=", ".join(paths))
    return sorter


def evaluate_files(paths: Iterable[str], trials: TrialSet, as_of: date) -> list[PatientEvaluation]:
    """One evaluation per patient across all the files, in the order patients first appear."""
    return [evaluate(record, trials, as_of) for record in sort_files(paths, trials).records()]


_MARK = {
    Result.PASS: "pass   ",
    Result.FAIL: "FAIL   ",
    Result.UNKNOWN: "unknown",
    Result.MANUAL: "manual ",
}


def write_text(evaluation: PatientEvaluation, trials: TrialSet, out: TextIO) -> None:
    out.write(f"{evaluation.patient}  (as of {evaluation.as_of})\n")
    for trial_eval in evaluation.trials:
        trial = trials[trial_eval.trial]
        out.write(
            f"  {trial.id} {trial.short_title} v{trial.version} "
            f"[registry: {registry_phrase(trial.registry_status)}]: "
            f"{trial_eval.status.value.upper()}\n"
        )
        for c in trial_eval.criteria:
            out.write(f"    {_MARK[c.result]}  {c.kind[:3]}  {c.label}\n")
            out.write(f"             {c.explanation}\n")
    for warning in evaluation.warnings:
        out.write(f"  warning: {warning}\n")
    out.write("\n")


def run(args: argparse.Namespace) -> int:
    as_of = parse_as_of(args.as_of) if args.as_of else date.today()
    trials = load_trials(args.trial) if args.trial else load_trials()
    sorter = sort_files(args.paths, trials)
    fmt = args.format or ("text" if sys.stdout.isatty() else "json")
    warned: set[str] = set()
    for record in sorter.records():
        evaluation = evaluate(record, trials, as_of)
        for warning in evaluation.warnings:
            if warning not in warned:  # a file's notes reach each patient read from it
                warned.add(warning)
                sys.stderr.write(f"cds: warning: {warning}\n")
        if fmt == "json":
            sys.stdout.write(json.dumps(evaluation.to_json(), ensure_ascii=False) + "\n")
        else:
            write_text(evaluation, trials, sys.stdout)
    for note in sorter.notes:  # about the input as a whole: said once
        sys.stderr.write(f"cds: warning: {note}\n")
    return 0


def register(subparsers: Any, fixtures_subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="screen the patients in FHIR Bundle files",
        description="Evaluate every patient in the given FHIR R4 Bundles (files, or directories "
        "of *.json) against the trials, criterion by criterion.",
    )
    parser.add_argument("paths", nargs="+", metavar="FILE_OR_DIR")
    parser.add_argument(
        "--trial", action="append", metavar="NCT", help="only this trial (repeatable)"
    )
    parser.add_argument("--as-of", metavar="YYYY-MM-DD", help="evaluation date (default today)")
    parser.add_argument(
        "--format", choices=("json", "text"), help="default: text on a terminal, else json"
    )
    parser.set_defaults(func=run)
