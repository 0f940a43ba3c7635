"""Benchmark of the CDS Hooks service: in-process with full prefetch, FHIR fallback, and load.

    .venv/bin/python bench/bench_hooks.py                 # all three parts
    .venv/bin/python bench/bench_hooks.py --skip-fhir --skip-load

1. In process (Flask test client), full prefetch for a patient with 2,000 Observations,
   200 Conditions and 100 Procedures: p95 of the request vs p95 of a plain ``json.loads`` of
   the same body, measured in the same run (target: ratio <= 3).
2. Without prefetch against a local FHIR server (sekmet-fhir, started here on 127.0.0.1):
   p95 of the hook call vs p95 of the slowest single FHIR query the service issues, each query
   timed on its own in the same run (target: ratio <= 1.25).
3. Under load through the container command (scripts/gunicorn-cmd, client auth on): N
   concurrent keep-alive clients for D seconds posting a hook call with full prefetch, each
   with a fresh JWT (target: zero errors); throughput and p50/p95/p99.

Exit status 1 when a target is missed. Prints one JSON summary line at the end.
"""

from __future__ import annotations

import argparse
import copy
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cds.criteria import load_trials  # noqa: E402
from cds.fhir.client import FhirClient, RetryPolicy, Timeouts  # noqa: E402
from cds.fhir.queries import build_patient_queries, fetch_patient_resources  # noqa: E402
from cds.hooks.app import create_app  # noqa: E402

PID = "bench-patient"
FIXTURE = REPO / "fhir_fixtures" / "both-candidate.json"
ISS = "https://bench-ehr.example.org"
PUBLIC = "https://cds.bench.example.org"
SERVICE = "/cds-services/trial-screening"


# -- data ------------------------------------------------------------------------------------


def big_patient(n_obs: int = 2000, n_cond: int = 200, n_proc: int = 100) -> list[dict[str, Any]]:
    """The both-candidate fixture grown to the benchmark's size: older copies of its labs, and
    conditions and procedures the criteria do not care about (parsed all the same)."""
    bundle = json.loads(FIXTURE.read_text())
    base = [e["resource"] for e in bundle["entry"]]
    old_id = next(r["id"] for r in base if r["resourceType"] == "Patient")
    text = json.dumps(base).replace(old_id, PID)
    base = json.loads(text)
    resources = [r for r in base]
    observations = [r for r in base if r["resourceType"] == "Observation"]
    conditions = [r for r in base if r["resourceType"] == "Condition"]
    i = 0
    while sum(r["resourceType"] == "Observation" for r in resources) < n_obs:
        template = observations[i % len(observations)]
        clone = copy.deepcopy(template)
        clone["id"] = f"{PID}-obs-x{i}"
        day = 1 + i % 28
        month = 1 + (i // 28) % 12
        clone["effectiveDateTime"] = f"{2023 + (i // 336) % 3}-{month:02d}-{day:02d}"
        clone.pop("issued", None)
        resources.append(clone)
        i += 1
    for j in range(n_cond - len(conditions)):
        resources.append(
            {
                "resourceType": "Condition",
                "id": f"{PID}-cond-x{j}",
                "clinicalStatus": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                            "code": "resolved",
                        }
                    ]
                },
                "code": {
                    "coding": [
                        {
                            "system": "http://example.org/bench-condition",
                            "code": f"c{j}",
                            "display": f"Bench condition {j}",
                        }
                    ]
                },
                "subject": {"reference": f"Patient/{PID}"},
                "onsetDateTime": f"{2010 + j % 12}-01-15",
            }
        )
    for k in range(n_proc):
        resources.append(
            {
                "resourceType": "Procedure",
                "id": f"{PID}-proc-x{k}",
                "status": "completed",
                "code": {
                    "coding": [
                        {
                            "system": "http://example.org/bench-procedure",
                            "code": f"p{k}",
                            "display": f"Bench procedure {k}",
                        }
                    ]
                },
                "subject": {"reference": f"Patient/{PID}"},
                "performedDateTime": f"{2012 + k % 12}-06-01",
            }
        )
    return resources


def full_prefetch(resources: list[dict[str, Any]]) -> dict[str, Any]:
    prefetch: dict[str, Any] = {}
    for query in build_patient_queries(load_trials()):
        if query.is_read:
            prefetch[query.key] = next(r for r in resources if r["resourceType"] == "Patient")
            continue
        found = [r for r in resources if r["resourceType"] == query.resource_type]
        if query.resource_type == "Observation":
            # code= matches Observation.code, combo-code= also its components
            params = parse_qs(urlsplit(query.template).query)
            key = "code" if "code" in params else "combo-code"
            wanted = set(params[key][0].split(","))

            def codes(r: dict[str, Any], combo: bool = key == "combo-code") -> list[Any]:
                parts = [r.get("code") or {}]
                if combo:
                    parts += [c.get("code") or {} for c in r.get("component") or []]
                return [c for part in parts for c in part.get("coding") or []]

            found = [
                r for r in found if any(f"{c['system']}|{c['code']}" in wanted for c in codes(r))
            ]
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(found),
        }
        if found:
            bundle["entry"] = [{"resource": r, "search": {"mode": "match"}} for r in found]
        prefetch[query.key] = bundle
    return prefetch


def hook_body(prefetch: dict[str, Any] | None = None, fhir_server: str | None = None) -> bytes:
    body: dict[str, Any] = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/bench", "patientId": PID},
    }
    if prefetch is not None:
        body["prefetch"] = prefetch
    if fhir_server is not None:
        body["fhirServer"] = fhir_server
    return json.dumps(body).encode()


class Signer:
    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP384R1())
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        self.jwks = {"keys": [{**jwk, "kid": "bench", "alg": "ES384"}]}

    def token(self, path: str) -> str:
        now = int(time.time())
        return jwt.encode(
            {
                "iss": ISS,
                "aud": PUBLIC + path,
                "iat": now,
                "exp": now + 300,
                "jti": str(uuid.uuid4()),
            },
            self.key,
            algorithm="ES384",
            headers={"kid": "bench", "typ": "JWT"},
        )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def timed(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


# -- 1. in process ---------------------------------------------------------------------------


def bench_in_process(iterations: int, db: str) -> dict[str, Any]:
    signer = Signer()
    app = create_app(
        {
            "public_base_url": PUBLIC,
            "trusted_issuers": {ISS: {"jwks": signer.jwks}},
            "feedback_db": db,
            "as_of": "2026-11-01",
        }
    )
    client = app.test_client()
    resources = big_patient()
    body = hook_body(full_prefetch(resources))
    counts = {
        t: sum(r["resourceType"] == t for r in resources)
        for t in ("Observation", "Condition", "Procedure")
    }

    def request() -> None:
        headers = {"Authorization": f"Bearer {signer.token(SERVICE)}"}
        started = time.perf_counter()
        response = client.post(SERVICE, data=body, headers=headers, content_type="application/json")
        elapsed = time.perf_counter() - started
        if response.status_code != 200 or len(response.get_json()["cards"]) != 2:
            raise SystemExit(f"unexpected answer: {response.status_code} {response.data[:300]!r}")
        request_times.append(elapsed)

    request_times: list[float] = []
    for _ in range(5):  # warm-up: imports, caches, SQLite pages
        request()
        json.loads(body)
    request_times.clear()
    loads_times: list[float] = []
    for _ in range(iterations):  # interleaved, so both see the same machine state
        request()
        started = time.perf_counter()
        json.loads(body)
        loads_times.append(time.perf_counter() - started)
    p95_req, p95_loads = percentile(request_times, 95), percentile(loads_times, 95)
    return {
        "patient": counts,
        "body_bytes": len(body),
        "iterations": iterations,
        "request_p50_ms": round(statistics.median(request_times) * 1000, 1),
        "request_p95_ms": round(p95_req * 1000, 1),
        "json_loads_p50_ms": round(statistics.median(loads_times) * 1000, 1),
        "json_loads_p95_ms": round(p95_loads * 1000, 1),
        "ratio": round(p95_req / p95_loads, 2),
        "target": 3.0,
        "ok": p95_req / p95_loads <= 3.0,
    }


# -- 2. FHIR fallback ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(url: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not answer within {timeout} s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


@contextmanager
def fhir_server(workdir: Path, workers: int) -> Iterator[str]:
    venv = REPO / ".fhir-server-venv"
    subprocess.run(
        [str(REPO / "scripts" / "install-fhir-server"), str(venv)], check=True, capture_output=True
    )
    port = _free_port()
    base = f"http://127.0.0.1:{port}/fhir"
    (workdir / "data").mkdir()
    config = {
        "base_url": base,
        "host": "127.0.0.1",
        "port": port,
        "data_dir": str(workdir / "data"),
        "own_private_key_path": str(workdir / "keys" / "k.pem"),
        "simulator": {"enabled": False},
        "validation": {"inbound": "warn"},
        "log_inbound": False,
    }
    (workdir / "sekmet.yaml").write_text(json.dumps(config))
    log = open(workdir / "fhir.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [
            str(venv / "bin" / "uvicorn"),
            "sekmet.main:app_factory",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
        ],
        cwd=workdir,
        env={**os.environ, "SEKMET_CONFIG": str(workdir / "sekmet.yaml")},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait(f"{base}/metadata", process)
        yield base
    finally:
        _stop(process)
        log.close()


def bench_fhir(iterations: int, workdir: Path, workers: int, db: str) -> dict[str, Any]:
    resources = big_patient()
    trials = load_trials()
    queries = build_patient_queries(trials)
    with fhir_server(workdir, workers) as base:
        client = FhirClient(
            base_url=base,
            trusted_base_urls=[base],
            allow_insecure_loopback=True,
            timeouts=Timeouts(connect=5, read=120),
            retry=RetryPolicy(attempts=2),
        )
        with client:
            for start in range(0, len(resources), 500):
                chunk = resources[start : start + 500]
                client.transaction(
                    {
                        "resourceType": "Bundle",
                        "type": "transaction",
                        "entry": [
                            {
                                "resource": r,
                                "request": {
                                    "method": "PUT",
                                    "url": f"{r['resourceType']}/{r['id']}",
                                },
                            }
                            for r in chunk
                        ],
                    }
                )
        app = create_app(
            {
                "dev": True,
                "auth_required": False,
                "feedback_db": db,
                "as_of": "2026-11-01",
                "fhir_trusted_servers": [base],
                "time_budget_s": 30,
                "fhir_concurrency": len(queries),
            }
        )
        test_client = app.test_client()
        body = hook_body(fhir_server=base)

        def hook() -> None:
            response = test_client.post(SERVICE, data=body, content_type="application/json")
            if response.status_code != 200 or len(response.get_json()["cards"]) != 2:
                raise SystemExit(f"unexpected answer: {response.status_code} {response.data!r}")

        def slowest_query() -> float:
            times = []
            with FhirClient(
                base_url=base,
                trusted_base_urls=[base],
                allow_insecure_loopback=True,
                retry=RetryPolicy(attempts=1),
            ) as fhir:
                for query in queries:  # one at a time: each query's own time, uncontended
                    started = time.perf_counter()
                    fetch_patient_resources(
                        fhir, PID, trials, concurrency=1, page_size=500, queries=[query]
                    )
                    times.append(time.perf_counter() - started)
            return max(times)

        for _ in range(3):
            hook()
            slowest_query()
        hook_times: list[float] = []
        query_times: list[float] = []
        for _ in range(iterations):
            hook_times += timed(hook, 1)
            query_times.append(slowest_query())
    p95_hook, p95_query = percentile(hook_times, 95), percentile(query_times, 95)
    return {
        "queries": len(queries),
        "server_workers": workers,
        "iterations": iterations,
        "hook_p50_ms": round(statistics.median(hook_times) * 1000, 1),
        "hook_p95_ms": round(p95_hook * 1000, 1),
        "slowest_query_p95_ms": round(p95_query * 1000, 1),
        "ratio": round(p95_hook / p95_query, 2),
        "target": 1.25,
        "ok": p95_hook / p95_query <= 1.25,
    }


# -- 3. load through gunicorn ----------------------------------------------------------------


@contextmanager
def container(
    workdir: Path, env: dict[str, str], workers: int = 2, repo: Path = REPO
) -> Iterator[str]:
    """The service as the container runs it: scripts/gunicorn-cmd (its settings, its logging),
    bound to a free loopback port; yields the base URL. Its log goes to workdir/gunicorn.log."""
    port = _free_port()
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CDS_")},
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "CDS_BIND": f"127.0.0.1:{port}",
        "CDS_WORKERS": str(workers),
        "PYTHONPATH": str(repo),
        **env,
    }
    log = open(workdir / "gunicorn.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [str(repo / "scripts" / "gunicorn-cmd")],
        cwd=repo,
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait(f"http://127.0.0.1:{port}/healthz", process)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(process)
        log.close()


def secure_env(signer: Signer, workdir: Path) -> dict[str, str]:
    """Client authentication on, the bench signer's issuer trusted."""
    return {
        "CDS_PUBLIC_BASE_URL": PUBLIC,
        "CDS_TRUSTED_ISSUERS": json.dumps({ISS: {"jwks": signer.jwks}}),
        "CDS_FEEDBACK_DB": str(workdir / "load.sqlite3"),
        "CDS_AS_OF": "2026-11-01",
    }


def bench_load(
    duration: float, clients: int, workdir: Path, workers: int, big: bool
) -> dict[str, Any]:
    """N clients for D seconds against the container command (scripts/gunicorn-cmd)."""
    signer = Signer()
    served = container(workdir, secure_env(signer, workdir), workers)
    resources = (
        big_patient()
        if big
        else [
            e["resource"]
            for e in json.loads(
                json.dumps(json.loads(FIXTURE.read_text())).replace("both-candidate", PID)
            )["entry"]
        ]
    )
    prefetch = full_prefetch(resources)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    with served as base:
        port = int(base.rsplit(":", 1)[1])
        stop_at = time.monotonic() + duration

        def worker() -> None:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            while time.monotonic() < stop_at:
                body = hook_body(prefetch)
                headers = {
                    "Content-Type": "application/json",
                    "Authorization": f"Bearer {signer.token(SERVICE)}",
                }
                started = time.perf_counter()
                try:
                    connection.request("POST", SERVICE, body=body, headers=headers)
                    response = connection.getresponse()
                    data = response.read()
                    elapsed = time.perf_counter() - started
                    ok = response.status == 200 and len(json.loads(data)["cards"]) == 2
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    ok, elapsed, data = False, time.perf_counter() - started, str(exc).encode()
                    connection.close()
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                with lock:
                    if ok:
                        latencies.append(elapsed)
                    else:
                        errors.append(data[:200].decode(errors="replace"))
            connection.close()

        threads = [threading.Thread(target=worker) for _ in range(clients)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.monotonic() - started
    return {
        "command": "scripts/gunicorn-cmd",
        "clients": clients,
        "duration_s": round(wall, 1),
        "gunicorn_workers": workers,
        "patient": "2000/200/100" if big else "fixture (both-candidate)",
        "body_bytes": len(hook_body(prefetch)),
        "requests": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:3],
        "throughput_rps": round(len(latencies) / wall, 1),
        "p50_ms": round(percentile(latencies, 50) * 1000, 1) if latencies else None,
        "p95_ms": round(percentile(latencies, 95) * 1000, 1) if latencies else None,
        "p99_ms": round(percentile(latencies, 99) * 1000, 1) if latencies else None,
        "ok": not errors and bool(latencies),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--fhir-iterations", type=int, default=30)
    parser.add_argument("--fhir-workers", type=int, default=4)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--gunicorn-workers", type=int, default=2)
    parser.add_argument(
        "--load-big-patient",
        action="store_true",
        help="post the 2,000-Observation patient under load (default: fixture)",
    )
    parser.add_argument("--skip-in-process", action="store_true")
    parser.add_argument("--skip-fhir", action="store_true")
    parser.add_argument("--skip-load", action="store_true")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-hooks-") as tmp:
        work = Path(tmp)
        if not args.skip_in_process:
            results["in_process"] = bench_in_process(args.iterations, str(work / "a.sqlite3"))
            print("in process:", results["in_process"], flush=True)
        if not args.skip_fhir:
            (work / "fhir").mkdir()
            results["fhir_fallback"] = bench_fhir(
                args.fhir_iterations, work / "fhir", args.fhir_workers, str(work / "b.sqlite3")
            )
            print("FHIR fallback:", results["fhir_fallback"], flush=True)
        if not args.skip_load:
            results["load"] = bench_load(
                args.duration, args.clients, work, args.gunicorn_workers, args.load_big_patient
            )
            print("load:", results["load"], flush=True)
    print(json.dumps(results))
    return 0 if all(part["ok"] for part in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
