"""Fetching one fixture patient: concurrent queries vs the slowest single query, and sequential.

Target: the concurrent fetch (all trial-derived queries in flight at once) takes no more than
1.25x the slowest single query it issues, measured in the same run; the sequential fetch is
printed beside it. Medians over --runs runs, after a warm-up. Not a timed test: it prints.

    .venv/bin/python bench/bench_fetch.py [--fhir-base URL] [--patient ID] [--runs 20]

Without --fhir-base (or FHIR_BASE_URL) it starts the local sekmet-fhir test server with
scripts/serve-fhir-server (BENCH_SERVER_WORKERS uvicorn workers, default 2), loads
fhir_fixtures/ and stops the server at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from cds.criteria import load_trials
from cds.fhir.client import FhirClient
from cds.fhir.loader import FIXTURES_DIR, load_fixtures
from cds.fhir.queries import FetchResult, fetch_patient_resources

REPO = Path(__file__).resolve().parents[1]
TARGET = 1.25


@contextlib.contextmanager
def local_server() -> Iterator[str]:
    subprocess.run(
        [str(REPO / "scripts" / "install-fhir-server")], check=True, stdout=subprocess.DEVNULL
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}/fhir"
    with tempfile.TemporaryDirectory(prefix="bench-fetch-") as state:
        log = Path(state) / "server.log"
        with open(log, "wb") as out:
            server = subprocess.Popen(
                [
                    str(REPO / "scripts" / "serve-fhir-server"),
                    str(port),
                    f"{state}/fhir",
                    os.environ.get("BENCH_SERVER_WORKERS", "2"),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(f"{base}/metadata", timeout=2):
                        break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        sys.exit(f"FHIR server did not start:\n{log.read_text()[-3000:]}")
                    time.sleep(0.1)
            yield base
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def slowest_ms(result: FetchResult) -> float:
    return max(q.seconds for q in result.queries) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fhir-base", default=os.environ.get("FHIR_BASE_URL"))
    parser.add_argument("--patient", default="both-candidate")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=6)
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        base = args.fhir_base or stack.enter_context(local_server())
        client = stack.enter_context(
            FhirClient(base_url=base, trusted_base_urls=[base], allow_insecure_loopback=True)
        )
        if not args.fhir_base:
            report = load_fixtures(client, FIXTURES_DIR)
            print(f"loaded fixtures: {report.summary()}")
        trials = load_trials()

        for _ in range(3):  # warm-up: connections, server caches
            fetch_patient_resources(client, args.patient, trials, concurrency=args.concurrency)
            fetch_patient_resources(client, args.patient, trials, concurrency=1)

        concurrent_wall, concurrent_slowest, sequential_wall, sequential_slowest = [], [], [], []
        ratios_same_run = []
        for _ in range(args.runs):
            conc = fetch_patient_resources(
                client, args.patient, trials, concurrency=args.concurrency
            )
            seq = fetch_patient_resources(client, args.patient, trials, concurrency=1)
            concurrent_wall.append(conc.seconds * 1000)
            concurrent_slowest.append(slowest_ms(conc))
            ratios_same_run.append(conc.seconds * 1000 / slowest_ms(conc))
            sequential_wall.append(seq.seconds * 1000)
            sequential_slowest.append(slowest_ms(seq))

    med = statistics.median
    queries = len(conc.queries)
    print(
        f"\npatient {args.patient}: {queries} queries, {len(conc.resources)} resources, "
        f"median of {args.runs} runs, server {base}"
    )
    print(f"  concurrent fetch (x{args.concurrency})        {med(concurrent_wall):8.1f} ms")
    print(f"  slowest query in that run          {med(concurrent_slowest):8.1f} ms")
    print(f"  sequential fetch                   {med(sequential_wall):8.1f} ms")
    print(f"  slowest query, sequential run      {med(sequential_slowest):8.1f} ms  (alone)")
    ratio = med(ratios_same_run)
    verdict = "met" if ratio <= TARGET else "MISSED"
    print(f"  concurrent / slowest (same run)    {ratio:8.2f} x  target <= {TARGET} ({verdict})")
    print(
        f"  concurrent / slowest alone         "
        f"{med(concurrent_wall) / med(sequential_slowest):8.2f} x"
    )
    print(
        f"  sequential / concurrent            {med(sequential_wall) / med(concurrent_wall):8.2f} x"
    )
    for timing in conc.queries:
        print(
            f"    {timing.key:28} {timing.seconds * 1000:7.1f} ms  {timing.resources:3d} res  "
            f"{timing.pages} page(s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
