"""`cds evaluate` of a directory grows linearly in patients: marginal time per patient as a
ratio to json.loads of that patient's bundle file.

N similar generated NET patients of ~2,400 resources each (cds.synthetic.big_patient, seeds
0..N-1), one Bundle file each. Measured in one process (best of --repeat): json.loads of
every file (the baseline), and `evaluate_files` plus the JSON lines it prints (what the
command does). Also at the command line (a fresh `cds evaluate` process per N, best of
--repeat), whose marginal cost per patient is (T(N) - T(1)) / (N - 1). Target: marginal time
per patient <= 3x json.loads of its bundle, at any N. Times are CPU seconds (user + system;
of the child process for the command line): on a shared 2-core VM wall-clock time mostly
measures the neighbours.

Usage: .venv/bin/python bench/bench_evaluate_files.py [--sizes 1 2 4 8 16] [--repeat 3]
Runs against whichever `cds` package is importable (PYTHONPATH selects a tree), so an
earlier commit can be measured with the same script.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

from cds.criteria import load_trials
from cds.evaluate_command import evaluate_files
from cds.synthetic import as_bundle, big_patient

AS_OF = date(2026, 11, 1)


def best(fn: object, repeat: int) -> float:
    """Best CPU seconds of ``fn`` (this process and the children it waited for)."""
    times = []
    for _ in range(repeat):
        started = _cpu()
        fn()  # type: ignore[operator]
        times.append(_cpu() - started)
    return min(times)


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    trials = load_trials()
    root = Path(tempfile.mkdtemp(prefix="bench-evaluate-files-"))
    largest = max(args.sizes)
    for seed in range(largest):
        resources = big_patient(seed=seed)
        text = json.dumps(as_bundle(resources, f"big-{seed}"))
        (root / f"p{seed:04d}.json").write_text(text)
    resources_per_patient = len(big_patient(seed=0))
    print(f"{resources_per_patient} resources a patient; files in {root}")

    command = [sys.executable, "-c", "import sys; from cds.cli import main; sys.exit(main())"]
    rows = []
    for n in args.sizes:
        directory = root / f"n{n}"
        directory.mkdir()
        for seed in range(n):
            (directory / f"p{seed:04d}.json").symlink_to(root / f"p{seed:04d}.json")
        files = sorted(directory.glob("*.json"))

        def parse(files: list[Path] = files) -> None:
            for path in files:
                json.loads(path.read_text())

        def run(directory: Path = directory) -> None:
            for evaluation in evaluate_files([str(directory)], trials, AS_OF):
                json.dumps(evaluation.to_json(), ensure_ascii=False)

        def cli(directory: Path = directory, command: list[str] = command) -> None:
            subprocess.run(  # noqa: S603 - our own interpreter and arguments
                [*command, "evaluate", str(directory), "--as-of", "2026-11-01", "--format", "json"],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

        run()  # warm-up: trial loading, lazy imports, caches
        t_parse = best(parse, args.repeat)
        t_run = best(run, args.repeat)
        t_cli = best(cli, args.repeat)
        rows.append((n, t_parse, t_run, t_cli))

    print(f"{'N':>4} {'json.loads':>11} {'in process':>11} {'ratio':>6} {'cds evaluate':>13}")
    for n, t_parse, t_run, t_cli in rows:
        print(f"{n:>4} {t_parse:>10.3f}s {t_run:>10.3f}s {t_run / t_parse:>5.2f}x {t_cli:>12.3f}s")
    first = rows[0]
    print("\nmarginal per patient (from the smallest N), as a ratio to json.loads of one file:")
    per_file = rows[-1][1] / rows[-1][0]
    for n, _t_parse, t_run, t_cli in rows[1:]:
        extra = n - first[0]
        in_process = (t_run - first[2]) / extra
        command_line = (t_cli - first[3]) / extra
        print(
            f"  N={n:>3}: in process {in_process * 1000:7.1f} ms ({in_process / per_file:4.2f}x), "
            f"cds evaluate {command_line * 1000:7.1f} ms ({command_line / per_file:4.2f}x); "
            f"json.loads {per_file * 1000:.1f} ms"
        )
    last = rows[-1]
    print(
        f"\nN={last[0]} against N={first[0]} in process: {last[2] / first[2]:.1f}x the time "
        f"for {last[0] / first[0]:.0f}x the patients"
    )


if __name__ == "__main__":
    main()
