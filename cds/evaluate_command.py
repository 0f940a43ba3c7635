"""`cds evaluate`: screen the patients in FHIR Bundle files against the trials, as JSON or text."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from datetime import date
from pathlib import Path
from typing import Any, TextIO

from cds.criteria import TrialSet, load_trials
from cds.criteria.engine import evaluate
from cds.criteria.model import PatientEvaluation, Result
from cds.criteria.record import PatientRecord
from cds.errors import InputError
from cds.fhir.bundle import records_from_bundle


def parse_as_of(value: str) -> date:
    """An ``--as-of`` date: YYYY-MM-DD, nothing else."""
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise InputError(f"{value!r} is not a date (YYYY-MM-DD)", source="--as-of") from exc


def bundle_files(paths: Iterable[str]) -> list[Path]:
    """The files named, with a directory standing for every ``*.json`` in it."""
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(path.glob("*.json"))
            if not found:
                raise InputError("directory holds no *.json file", source=name)
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise InputError("no such file or directory", source=name)
    return files


def read_bundle_file(
    path: Path, relevant: Callable[[tuple[str, str]], bool] | None = None
) -> list[PatientRecord]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})", source=str(path)
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot be read ({exc})", source=str(path)) from exc
    return records_from_bundle(data, source=str(path), relevant=relevant)


def evaluate_files(paths: Iterable[str], trials: TrialSet, as_of: date) -> list[PatientEvaluation]:
    # Every file is read and checked before anything is printed, so bad input never leaves
    # half an answer behind.
    records = [
        record
        for path in bundle_files(paths)
        for record in read_bundle_file(path, trials.is_relevant)
    ]
    return [evaluate(record, trials, as_of) for record in records]


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
            f"[registry: {trial.registry_status}]: {trial_eval.status.value.upper()}\n"
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
    evaluations = evaluate_files(args.paths, trials, as_of)
    fmt = args.format or ("text" if sys.stdout.isatty() else "json")
    for evaluation in evaluations:
        for warning in evaluation.warnings:
            sys.stderr.write(f"cds: warning: {warning}\n")
        if fmt == "json":
            sys.stdout.write(json.dumps(evaluation.to_json(), ensure_ascii=False) + "\n")
        else:
            write_text(evaluation, trials, sys.stdout)
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
