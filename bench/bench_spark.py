"""The Spark sweep against the single-machine NDJSON sweep, on the same generated populations
(not a test; figures for the README).

For each --patients N, in one run: `cds sweep --ndjson` with --workers 1 and 2, and
`cds sweep --engine spark` on local[1] and local[2] (and, with --before REV, both sweeps of an
earlier commit: the single-machine one for its 1 -> 2 worker scaling before the parallel
partition pass, the Spark one for its CPU before later changes).
Spark's start-up (JVM, SparkContext) is timed apart; its time and CPU seconds (user + system of
the whole process tree: driver, JVM, Python workers, read from /proc) are counted after it.
Printed: per-patient wall and CPU time; the scaling factor from 1 to 2 cores (goal >= 1.6x);
Spark's per-patient CPU relative to the single-machine engine's at the same core count (goal
<= 1.3x); peak resident memory of the single-machine tree, and of Spark's driver (Python),
JVM (driver and executors: one JVM in local mode) and Python workers. --largest N adds one
population swept only by the 2-core engines, for how time grows with N; choose N for the disk
(~6 GB of NDJSON per 100,000 patients, and about as much again for outputs and shuffle).
Generated data and outputs are deleted as the run goes (--keep keeps the inputs).

Usage:
  .venv/bin/python bench/bench_spark.py --patients 10000 100000 [--largest 200000] \
      [--before 1bbade8]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from cds.synthetic import ANCHOR, Population, write_population

REPO = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")
#: marks a generated population as complete (reused by a later run with the same --data)
GENERATED = ".generated"
TICK = os.sysconf("SC_CLK_TCK")


def _proc_table() -> dict[int, tuple[int, str, float, int]]:
    """pid -> (parent pid, command name, CPU seconds, RSS bytes) of every process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            rss = int((entry / "statm").read_text().split()[1]) * PAGE
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / TICK
        table[int(entry.name)] = (int(fields[1]), name, cpu, rss)
    return table


class TreeSampler:
    """Samples a process tree every 0.1 s: CPU seconds per process (the last value seen; a
    process that ends between samples loses at most 0.1 s) and the peak RSS per role."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.cpu: dict[int, float] = {}
        self.roles: dict[int, str] = {}
        self.peak: dict[str, int] = {}
        self.own_cpu = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def role(self, pid: int, name: str) -> str:
        if pid == self.root:
            return "driver"
        return "jvm" if name == "java" else "workers"

    def sample(self) -> None:
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        rss: dict[str, int] = {}
        todo = [self.root]
        while todo:
            pid = todo.pop()
            if pid not in table:
                continue
            _, name, cpu, size = table[pid]
            self.cpu[pid] = cpu
            role = self.roles[pid] = self.role(pid, name)
            rss[role] = rss.get(role, 0) + size
            todo.extend(children.get(pid, []))
        for role, size in rss.items():
            self.peak[role] = max(self.peak.get(role, 0), size)

    def cpu_total(self) -> float:
        return sum(self.cpu.values())

    def cpu_by_role(self) -> dict[str, float]:
        roles: dict[str, float] = {}
        for pid, cpu in self.cpu.items():
            roles[self.roles[pid]] = roles.get(self.roles[pid], 0.0) + cpu
        return roles

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            # The sampler's own CPU: in the Spark child it runs in the driver's process, and
            # is taken out of the driver's figure there (the single-machine sweep's sampler
            # runs in this script's process, which is not counted)
            self.own_cpu = time.thread_time()
            time.sleep(0.1)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def spark_child(data: str, out: str, master: str) -> None:
    """In a process of its own: start Spark, sweep, measure the tree before Spark stops."""
    from cds.criteria import load_trials
    from cds.sweep import spark

    with TreeSampler(os.getpid()) as sampler:
        started = time.perf_counter()
        sc = spark.start_spark(master, [])
        startup = time.perf_counter() - started
        sampler.sample()
        startup_cpu = sampler.cpu_total()
        startup_roles = sampler.cpu_by_role()
        startup_sampler = sampler.own_cpu
        opts = spark.SparkOptions(Path(out), load_trials(), ANCHOR, master=master)
        began = time.perf_counter()
        summary = spark.sweep_spark(data, opts, context=sc)
        seconds = time.perf_counter() - began
        sampler.sample()
        sampling = sampler.own_cpu - startup_sampler
        cpu = sampler.cpu_total() - startup_cpu - sampling
        roles = {
            role: round(cpu - startup_roles.get(role, 0.0), 2)
            for role, cpu in sampler.cpu_by_role().items()
        }
        roles["driver"] = round(roles.get("driver", 0.0) - sampling, 2)
        sc.stop()
    print(
        json.dumps(
            {
                "startup": startup,
                "startup_cpu": startup_cpu,
                "seconds": seconds,
                "cpu": cpu,
                "cpu_roles": roles,
                "processes": {
                    role: sum(1 for r in sampler.roles.values() if r == role)
                    for role in set(sampler.roles.values())
                },
                "peak": sampler.peak,
                "patients": summary["patients"],
                "trials": summary["trials"],
                "task_cpu": summary["engine"]["task_cpu_seconds"],
            }
        )
    )


def run_local(data: Path, out: Path, *, workers: int, tree: Path = REPO) -> dict[str, Any]:
    """`cds sweep --ndjson` of the code in ``tree`` in a subprocess: wall, CPU, peak RSS."""
    cmd = [sys.executable, "-m", "cds.cli", "sweep", "--ndjson", str(data), "--out", str(out)]
    cmd += ["--as-of", ANCHOR.isoformat(), "--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    started = time.perf_counter()
    process = subprocess.Popen(
        cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    with TreeSampler(process.pid) as sampler:
        _, err = process.communicate()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err.decode()[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {
        "seconds": seconds,
        "cpu": sampler.cpu_total(),
        "peak": {"tree": sum(sampler.peak.values())},
        "patients": summary["patients"],
        "trials": summary["trials"],
    }


def run_spark(data: Path, out: Path, *, master: str, tree: Path = REPO) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--spark-child", str(data), str(out), master]
    # The cds of ``tree``, in the workers too (PYTHONPATH, and the working directory, which a
    # `python -m pyspark.daemon` worker puts first on its path)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(cmd, capture_output=True, check=False, cwd=tree, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr.decode()[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return result


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB"


def bench(args: argparse.Namespace) -> None:
    root = Path(args.data or tempfile.mkdtemp(prefix="bench-spark-", dir="/tmp"))
    before = None
    if args.before and Path(args.before).is_dir():
        before = Path(args.before)  # a tree unpacked already
    elif args.before:
        # The earlier commit's package, unpacked (no worktree, nothing in .git changes).
        before = root / "before-tree"
        shutil.rmtree(before, ignore_errors=True)
        before.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", args.before, "cds"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
    print(f"data in {root}; {os.cpu_count()} CPUs; load average {os.getloadavg()}")
    tiny = root / "tiny"
    write_population(Population(20, seed=1), tiny, "ndjson")
    start_local = run_local(tiny, root / "tiny-out", workers=1)["seconds"]
    shutil.rmtree(root / "tiny-out")
    print(f"single-machine start-up (20-patient sweep, whole command): {start_local:.2f} s")
    sizes = [(n, True) for n in args.patients] + [(n, False) for n in args.largest]
    per_patient: dict[str, list[tuple[int, float]]] = {}
    try:
        for n, full in sizes:
            data = root / f"g{n}"
            started = time.perf_counter()
            if not (data / GENERATED).exists():  # kept by an earlier run with --keep
                shutil.rmtree(data, ignore_errors=True)
                write_population(Population(n, seed=1), data, "ndjson")
                (data / GENERATED).write_text(f"Population({n}, seed=1)\n")
            size = sum(p.stat().st_size for p in data.glob("*.ndjson"))
            print(
                f"\n== {n:,} patients: {size / 1e9:.2f} GB of NDJSON, generated in "
                f"{time.perf_counter() - started:.0f} s; disk free "
                f"{shutil.disk_usage(root).free / 1e9:.0f} GB; load {os.getloadavg()[0]:.1f}"
            )
            runs: list[tuple[str, Any]] = []
            if full:
                runs += [("local w1", functools.partial(run_local, data, workers=1))]
            runs += [("local w2", functools.partial(run_local, data, workers=2))]
            if full and before is not None and not args.before_spark_only:
                runs += [
                    ("before w1", functools.partial(run_local, data, workers=1, tree=before)),
                    ("before w2", functools.partial(run_local, data, workers=2, tree=before)),
                ]
            if full and before is not None:
                runs += [
                    (
                        f"before spark {cores}",
                        functools.partial(run_spark, data, master=f"local[{cores}]", tree=before),
                    )
                    for cores in (1, 2)
                ]
            if full:
                runs += [("spark local[1]", functools.partial(run_spark, data, master="local[1]"))]
            runs += [("spark local[2]", functools.partial(run_spark, data, master="local[2]"))]
            results: dict[str, Any] = {}
            for label, run in runs:
                out = root / "out"
                shutil.rmtree(out, ignore_errors=True)
                results[label] = r = run(out=out)
                shutil.rmtree(out, ignore_errors=True)
                per = r["seconds"] / n * 1e3
                per_patient.setdefault(label, []).append((n, per))
                peak = ", ".join(f"{k} {_mb(v)}" for k, v in sorted(r["peak"].items()))
                if "cpu_roles" in r:
                    peak += "; CPU s after start-up: " + ", ".join(
                        f"{k} {v:.1f}" for k, v in sorted(r["cpu_roles"].items())
                    )
                    peak += (
                        " (of the workers', in cds steps: "
                        + ", ".join(f"{k} {v:.1f}" for k, v in r["task_cpu"].items())
                        + ")"
                    )
                startup = (
                    f"start-up {r['startup']:.1f} s ({r['startup_cpu']:.1f} CPU s); "
                    if ("startup" in r)
                    else ""
                )
                print(
                    f"{label:15s} {startup}{r['seconds']:7.1f} s, {per:.3f} ms/patient, "
                    f"CPU {r['cpu'] / n * 1e3:.3f} ms/patient; peak RSS {peak}",
                    flush=True,
                )
                # An earlier commit (--before) may judge differently: only this tree's engines
                # must agree.
                if r["patients"] != n or (
                    not label.startswith("before") and r["trials"] != results[runs[0][0]]["trials"]
                ):
                    raise SystemExit(f"{label}: a different summary than {runs[0][0]}")

            def ratio(a: str, b: str, key: str, results: dict[str, Any] = results) -> str:
                if a not in results or b not in results:
                    return "-"
                return f"{results[a][key] / results[b][key]:.2f}x"

            print(
                f"scaling 1 -> 2 cores: local {ratio('local w1', 'local w2', 'seconds')}, "
                f"before {ratio('before w1', 'before w2', 'seconds')}, "
                f"spark {ratio('spark local[1]', 'spark local[2]', 'seconds')} (goal >= 1.6x)"
            )
            print(
                "Spark CPU / single-machine CPU per patient: "
                f"1 core {ratio('spark local[1]', 'local w1', 'cpu')}, "
                f"2 cores {ratio('spark local[2]', 'local w2', 'cpu')} (goal <= 1.3x); "
                f"wall, 2 cores: {ratio('spark local[2]', 'local w2', 'seconds')}"
            )
            if before is not None:
                print(
                    "  the same for Spark at --before: "
                    f"1 core {ratio('before spark 1', 'local w1', 'cpu')}, "
                    f"2 cores {ratio('before spark 2', 'local w2', 'cpu')}"
                )
            if not args.keep:
                shutil.rmtree(data)
        print("\nhow time grows (ms/patient at each N):")
        for label, points in per_patient.items():
            print(f"  {label:15s} " + ", ".join(f"{n:,}: {ms:.3f}" for n, ms in points))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--spark-child":
        spark_child(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--largest", type=int, nargs="*", default=[], metavar="N")
    parser.add_argument(
        "--before",
        metavar="REV",
        help="also the single-machine sweep at REV (a commit, or a directory with its cds/)",
    )
    parser.add_argument(
        "--before-spark-only",
        action="store_true",
        help="with --before, only its Spark sweep (not its single-machine one)",
    )
    parser.add_argument("--data", help="work directory (default a new one under /tmp)")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep generated data (a later run with the same --data reuses it)",
    )
    bench(parser.parse_args())


if __name__ == "__main__":
    main()
