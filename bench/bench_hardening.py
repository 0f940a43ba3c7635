"""Issue 13's figures: replay race, path escapes, fuzz, fault tables, Ctrl-C latency.

    .venv/bin/python bench/bench_hardening.py                  # everything
    .venv/bin/python bench/bench_hardening.py --only race,fuzz  # some parts
    .venv/bin/python bench/bench_hardening.py --only race --repo /path/to/old/checkout

1. race: the container command (scripts/gunicorn-cmd, 2 workers, client auth on); each of
   N tokens sent K times at once; counts tokens accepted more than once (target 0).
2. escapes: a canary stand-in FHIR server; redirects and next links that try to leave the
   trusted base (dot segments, percent-encoded, mixed case) through the REST client, the hooks
   service (fhirServer searches and the client's own prefetch next links) and a sweep;
   counts requests that reached a path outside the base (target 0).
3. fuzz: >= 10,000 mutated requests against the container command; counts 5xx answers
   (target 0) and silent empty answers ``200 {"cards": []}`` to malformed input (target 0).
4. faults: each fault of a fault-injecting stand-in against the hooks service (in process,
   1.5 s budget) and against ``cds sweep`` (REST): status, time to answer, message.
5. ctrl-c: SIGINT to ``cds sweep`` while a trickling server feeds it: seconds to exit.

The stand-ins are tests/test_fhir_faults.FaultInjector (a real HTTP server on 127.0.0.1). Load
(50 clients, 30 s, under the container command) is bench/bench_hooks.py's third part.
Exit status 1 when a target is missed. Prints one JSON summary line at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_hooks import PID, PUBLIC, SERVICE, Signer, container, secure_env  # noqa: E402

from cds.fhir.client import FhirClient, RetryPolicy  # noqa: E402
from tests.hooks_data.support import dev_app, fixture_resources, full_prefetch  # noqa: E402
from tests.test_fhir_faults import Fault, FaultInjector, Seen, outcome, searchset  # noqa: E402

RECORD = [
    json.loads(json.dumps(r).replace("both-candidate", PID))
    for r in fixture_resources("both-candidate.json")
]
PATIENT = next(r for r in RECORD if r["resourceType"] == "Patient")


# -- 1. replay race --------------------------------------------------------------------------


def bench_race(work: Path, tokens: int, copies: int, repo: Path) -> dict[str, Any]:
    signer = Signer()
    accepted: dict[int, int] = {}
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    with container(work, secure_env(signer, work), repo=repo) as base:
        sessions = [requests.Session() for _ in range(copies)]

        def send(n: int, token: str, barrier: threading.Barrier, session: requests.Session) -> None:
            barrier.wait()
            response = session.get(
                base + "/cds-services", headers={"Authorization": f"Bearer {token}"}
            )
            with lock:
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                if response.status_code == 200:
                    accepted[n] = accepted.get(n, 0) + 1

        for n in range(tokens):
            token = signer.token("/cds-services")
            barrier = threading.Barrier(copies)
            threads = [
                threading.Thread(target=send, args=(n, token, barrier, sessions[i]))
                for i in range(copies)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    twice = sum(1 for count in accepted.values() if count > 1)
    return {
        "tokens": tokens,
        "parallel_sends_each": copies,
        "requests": tokens * copies,
        "statuses": statuses,
        "tokens_accepted_twice_or_more": twice,
        "tokens_accepted_once": sum(1 for count in accepted.values() if count == 1),
        "ok": twice == 0,
    }


# -- 2. path escapes -------------------------------------------------------------------------

ESCAPES = [
    "{base}/../admin",
    "{base}/../../etc/passwd",
    "{base}/Patient/../../admin",
    "{base}/%2e%2e/admin",
    "{base}/%2E%2E/admin",
    "{base}/%2e./admin",
    "{base}/.%2e/admin",
    "{base}/./../admin",
    "{base}/Observation/%2e%2e/%2e%2e/admin",
    "{base}/x/..%2f..%2fadmin",
    "/fhir/../admin",
    "/fhir/%2e%2e/admin",
]


def _escapes_via_client(server: FaultInjector) -> int:
    attempts = 0
    for escape in ESCAPES:
        target = escape.format(base=server.base_url)
        for how in ("redirect", "next"):
            attempts += 1
            first = [True]

            def route(
                seen: Seen, target: str = target, how: str = how, first: list[bool] = first
            ) -> Fault:
                if how == "redirect":
                    return Fault(302, headers={"Location": target})
                if first[0]:
                    first[0] = False
                    return Fault(body=searchset([], target))
                return Fault(body=searchset([]))

            server.route = route
            client = FhirClient(
                base_url=server.base_url,
                trusted_base_urls=[server.base_url],
                allow_insecure_loopback=True,
                access_token="canary-token",
                retry=RetryPolicy(attempts=1),
            )
            with contextlib.suppress(Exception):
                client.search("Condition", "patient=x")
            client.close()
    return attempts


def _escapes_via_hooks(server: FaultInjector) -> int:
    app = dev_app(fhir_trusted_servers=[server.base_url])
    client = app.test_client()
    attempts = 0
    auth = {
        "access_token": "canary-token",
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": "patient/*.read",
        "subject": "cds",
    }
    for escape in ESCAPES:
        target = escape.format(base=server.base_url)
        # (a) the server's own searches redirect or page out of the base
        for how in ("redirect", "next"):
            attempts += 1

            def route(seen: Seen, target: str = target, how: str = how) -> Fault:
                if "/Patient/" in seen.path:
                    return Fault(body=PATIENT)
                if how == "redirect":
                    return Fault(302, headers={"Location": target})
                if "page=" in seen.path:
                    return Fault(body=searchset([]))
                return Fault(body=searchset([], target))

            server.route = route
            body = _hook(None, server.base_url, auth)
            client.post(SERVICE, data=body, content_type="application/json")
        # (b) the EHR's prefetch Bundle names the next page
        attempts += 1
        server.route = lambda seen: Fault(body=searchset([]))
        prefetch = full_prefetch(RECORD, PID)
        prefetch["conditions"]["link"] = [{"relation": "next", "url": target}]
        client.post(
            SERVICE, data=_hook(prefetch, server.base_url, auth), content_type="application/json"
        )
    return attempts


def _escapes_via_sweep(server: FaultInjector, work: Path) -> int:
    from cds.cli import main

    attempts = 0
    for n, escape in enumerate(ESCAPES):
        target = escape.format(base=server.base_url)
        attempts += 1

        def route(seen: Seen, target: str = target) -> Fault:
            if "/Patient/" in seen.path:
                return Fault(302, headers={"Location": target})
            return Fault(body=searchset([], target))

        server.route = route
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            main(_sweep_args(server.base_url, work / f"escape{n}", ["p1"]))
    return attempts


def bench_escapes(work: Path) -> dict[str, Any]:
    server = FaultInjector()
    try:
        attempts = {
            "rest_client": _escapes_via_client(server),
            "hooks_service": _escapes_via_hooks(server),
            "sweep": _escapes_via_sweep(server, work),
        }
        outside = [s.path for s in server.seen if not s.path.startswith("/fhir/")]
    finally:
        server.close()
    return {
        "escape_attempts": attempts,
        "requests_seen_by_the_canary": len(server.seen),
        "requests_outside_the_base": len(outside),
        "examples_outside": outside[:5],
        "ok": not outside,
    }


# -- 3. fuzz ---------------------------------------------------------------------------------

JUNK: list[Any] = [
    17,
    -1,
    10**400,
    1.5e308,
    "",
    "x" * 5000,
    "\udc80",
    None,
    True,
    [],
    {},
    [1, "a", None],
    {"resourceType": 5},
]


def _nodes(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            out += _nodes(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            out += _nodes(item, (*path, index))
    return out


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    target = doc
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return doc


def _mutate(rng: random.Random, base: dict[str, Any]) -> tuple[str, bool, bytes]:
    """(mutation kind, malformed for certain, body bytes)."""
    doc = json.loads(json.dumps(base))
    kind = rng.choice(
        [
            "entry-not-object",
            "id-not-string",
            "resourceType-not-string",
            "lone-surrogate",
            "deep",
            "required-missing",
            "required-wrong-type",
            "truncated",
            "random-bytes",
            "dot-patient-id",
            "any-node",
            "any-node",
            "any-node",
        ]
    )
    bundles = [k for k, v in doc["prefetch"].items() if v and v.get("resourceType") == "Bundle"]
    key = rng.choice(bundles)
    entries = doc["prefetch"][key].setdefault("entry", [])
    if not entries:
        entries.append({"resource": {"resourceType": "Condition", "id": "c"}})
    index = rng.randrange(len(entries))
    if kind == "entry-not-object":
        entries[index] = rng.choice([17, "entry", None, [1, 2], True])
    elif kind == "id-not-string":
        entries[index].setdefault("resource", {"resourceType": "Condition"})
        entries[index]["resource"]["id"] = rng.choice([{"a": 1}, [1], 5, None, True])
    elif kind == "resourceType-not-string":
        entries[index]["resource"]["resourceType"] = rng.choice([5, None, [], {"x": 1}])
    elif kind == "lone-surrogate":
        strings = [p for p in _nodes(doc) if p and isinstance(_get(doc, p), str)]
        text = json.dumps(_set(doc, rng.choice(strings), "SURROGATE"))
        return kind, True, text.replace('"SURROGATE"', '"a\\udc80b"', 1).encode()
    elif kind == "deep":
        depth = rng.randint(70, 3000)
        text = json.dumps(_set(doc, rng.choice(_nodes(doc)[1:]), "DEEP"))
        return kind, True, text.replace('"DEEP"', "[" * depth + "]" * depth, 1).encode()
    elif kind == "required-missing":
        where = rng.choice([("hook",), ("hookInstance",), ("context",), ("context", "patientId")])
        target = doc
        for part in where[:-1]:
            target = target[part]
        del target[where[-1]]
    elif kind == "required-wrong-type":
        where = rng.choice([("hook",), ("hookInstance",), ("context",), ("context", "patientId")])
        _set(doc, where, rng.choice([17, None, [], {"a": 1}, True]))
    elif kind == "truncated":
        text = json.dumps(doc).encode()
        return kind, True, text[: rng.randrange(1, len(text) - 1)]
    elif kind == "random-bytes":
        return kind, True, bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))
    elif kind == "dot-patient-id":
        doc["context"]["patientId"] = rng.choice([".", ".."])
    else:
        return (
            kind,
            False,
            json.dumps(_set(doc, rng.choice(_nodes(doc)), rng.choice(JUNK))).encode(),
        )
    return kind, True, json.dumps(doc).encode()


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        doc = doc[part]
    return doc


def bench_fuzz(work: Path, count: int, seed: int, threads: int) -> dict[str, Any]:
    signer = Signer()
    base_body = {
        "hook": "patient-view",
        "hookInstance": "8f1c4b58-5a1c-4c61-9c25-5d4b6c7f8a90",
        "context": {"userId": "Practitioner/fuzz", "patientId": PID},
        "prefetch": full_prefetch(RECORD, PID),
    }
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        kind, malformed, body = _mutate(rng, base_body)
        cases.append((kind, malformed, body))
    # JWT variants too: each must be a 401, never a 500.
    jwt_cases = _jwt_variants(signer)
    tally: dict[str, dict[str, int]] = {}
    fives: list[str] = []
    silent: list[str] = []
    lock = threading.Lock()
    env = secure_env(signer, work)
    with container(work, env) as base:
        queue = list(enumerate(cases))

        def worker() -> None:
            session = requests.Session()
            while True:
                with lock:
                    if not queue:
                        return
                    _, (kind, malformed, body) = queue.pop()
                headers = {
                    "Content-Type": "application/json",
                    "Authorization": f"Bearer {signer.token(SERVICE)}",
                }
                try:
                    response = session.post(base + SERVICE, data=body, headers=headers, timeout=60)
                    status, text = response.status_code, response.text
                except requests.RequestException as exc:
                    status, text = 0, repr(exc)
                    session = requests.Session()
                with lock:
                    counts = tally.setdefault(kind, {})
                    counts[str(status)] = counts.get(str(status), 0) + 1
                    if status >= 500 or status == 0:
                        fives.append(f"{kind}: {status} {text[:150]}")
                    if malformed and status == 200 and '"cards":[]' in text.replace(" ", ""):
                        silent.append(kind)

        workers = [threading.Thread(target=worker) for _ in range(threads)]
        started = time.monotonic()
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
        jwt_statuses: dict[str, int] = {}
        for name, token in jwt_cases:
            response = requests.get(
                base + "/cds-services", headers={"Authorization": f"Bearer {token}"}, timeout=30
            )
            jwt_statuses[name] = response.status_code
        wall = time.monotonic() - started
    jwt_bad = {k: v for k, v in jwt_statuses.items() if v != 401}
    return {
        "requests": count + len(jwt_cases),
        "seconds": round(wall, 1),
        "by_mutation": tally,
        "5xx_or_no_answer": len(fives),
        "first_5xx": fives[:5],
        "silent_empty_answers_to_malformed_input": len(silent),
        "jwt_variants": len(jwt_cases),
        "jwt_variants_not_401": jwt_bad,
        "ok": not fives and not silent and not jwt_bad,
    }


def _jwt_variants(signer: Signer) -> list[tuple[str, str]]:
    import jwt as pyjwt

    now = int(time.time())
    good = {"iss": "https://bench-ehr.example.org", "aud": PUBLIC + "/cds-services"}
    variants: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        ("exp-400-digits", {**good, "iat": now, "exp": 10**400, "jti": "a1"}, {}),
        ("exp-negative-huge", {**good, "iat": now, "exp": -(10**400), "jti": "a2"}, {}),
        ("exp-text", {**good, "iat": now, "exp": "soon", "jti": "a3"}, {}),
        ("iat-huge", {**good, "iat": 10**400, "exp": now + 60, "jti": "a4"}, {}),
        ("nbf-huge", {**good, "iat": now, "exp": now + 60, "nbf": 10**400, "jti": "a5"}, {}),
        ("jti-object", {**good, "iat": now, "exp": now + 60, "jti": {"a": 1}}, {}),
        (
            "aud-list-of-junk",
            {**good, "aud": [1, None], "iat": now, "exp": now + 60, "jti": "a6"},
            {},
        ),
        (
            "jku-elsewhere",
            {**good, "iat": now, "exp": now + 60, "jti": "a8"},
            {"jku": "http://127.0.0.1:9/x"},
        ),
    ]
    out = []
    for name, claims, headers in variants:
        token = pyjwt.encode(
            claims, signer.key, algorithm="ES384", headers={"kid": "bench", "typ": "JWT", **headers}
        )
        out.append((name, token))
    out += [("garbage", "not.a.jwt"), ("empty-parts", ".."), ("alg-none", _alg_none(good, now))]
    return out


def _alg_none(claims: dict[str, Any], now: int) -> str:
    import base64

    def b64(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    header = b64({"alg": "none", "typ": "JWT", "kid": "bench"})
    payload = b64({**claims, "iat": now, "exp": now + 60, "jti": "n"})
    return f"{header}.{payload}."


# -- 4. fault tables -------------------------------------------------------------------------


def _hook(prefetch: dict[str, Any] | None, server: str, auth: dict[str, Any] | None) -> bytes:
    body: dict[str, Any] = {
        "hook": "patient-view",
        "hookInstance": "2f0b1f3e-8c43-4c65-9a0e-2b7e1d9f4c11",
        "context": {"userId": "Practitioner/bench", "patientId": PID},
        "fhirServer": server,
    }
    if prefetch is not None:
        body["prefetch"] = prefetch
    if auth is not None:
        body["fhirAuthorization"] = auth
    return json.dumps(body).encode()


def _faults(server: FaultInjector) -> dict[str, Callable[[Seen], Fault]]:
    def data(seen: Seen) -> Fault:
        path = seen.path.split("?", 1)[0].split("/fhir/", 1)[-1]
        rtype = path.split("/")[0]
        if rtype == "metadata":
            return Fault(body={"resourceType": "CapabilityStatement", "rest": []})
        if "/" in path:
            return Fault(body=PATIENT)
        return Fault(body=searchset([r for r in RECORD if r["resourceType"] == rtype]))

    def on_searches(fault: Fault) -> Callable[[Seen], Fault]:
        def route(seen: Seen) -> Fault:
            path = seen.path.split("?", 1)[0]
            if "/Patient" in path or "metadata" in path:
                return data(seen)
            return fault

        return route

    endless = iter(range(10**9))
    return {
        "healthy": data,
        "trickled body (1 byte / 50 ms)": on_searches(Fault(breakage="trickle")),
        "trickled headers": on_searches(Fault(breakage="trickle-headers")),
        "no answer (hangs 30 s)": on_searches(Fault(delay=30, body=searchset([]))),
        "connection reset": on_searches(Fault(breakage="reset")),
        "503 Retry-After 120": on_searches(
            Fault(503, headers={"Retry-After": "120"}, body=outcome("busy"))
        ),
        "500 HTML page": on_searches(
            Fault(500, body=b"<html>oops</html>", headers={"Content-Type": "text/html"})
        ),
        "200 not JSON": on_searches(Fault(body=b"<html>login</html>")),
        "error OperationOutcome in searchset": on_searches(
            Fault(body=searchset([], outcome_entries=[outcome("backend timeout")]))
        ),
        "warning OperationOutcome in searchset": lambda seen: (
            data(seen)
            if "/Patient" in seen.path or "metadata" in seen.path
            else Fault(
                body={
                    **searchset(
                        [
                            r
                            for r in RECORD
                            if seen.path.split("?")[0].endswith("/" + r["resourceType"])
                        ],
                        outcome_entries=[outcome("some codes unknown", severity="warning")],
                    )
                }
            )
        ),
        "302 to /fhir/%2e%2e/admin": on_searches(
            Fault(302, headers={"Location": "/fhir/%2e%2e/admin"})
        ),
        "next link out of the base": on_searches(
            Fault(body=searchset([], f"{server.base_url}/../admin"))
        ),
        "endless next links": on_searches_dynamic(
            lambda: Fault(body=searchset([], f"{server.base_url}/Condition?page={next(endless)}"))
        ),
        "401 from the FHIR server": on_searches(Fault(401, body=outcome("token expired"))),
    }


def on_searches_dynamic(make: Callable[[], Fault]) -> Callable[[Seen], Fault]:
    def route(seen: Seen) -> Fault:
        path = seen.path.split("?", 1)[0]
        if "/Patient/" in path:
            return Fault(body=PATIENT)
        if "metadata" in path:
            return Fault(body={"resourceType": "CapabilityStatement", "rest": []})
        return make()

    return route


def bench_faults_hooks() -> list[dict[str, Any]]:
    server = FaultInjector()
    rows = []
    logger = logging.getLogger("cds.hooks.calls")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # kept for the table, not printed
    try:
        app = dev_app(fhir_trusted_servers=[server.base_url])
        client = app.test_client()
        for name, route in _faults(server).items():
            server.route = route
            server.seen.clear()
            started = time.monotonic()
            response = client.post(
                SERVICE,
                data=_hook({"patient": PATIENT}, server.base_url, None),
                content_type="application/json",
            )
            seconds = time.monotonic() - started
            body = response.get_json()
            line = json.loads(records[-1].getMessage()) if records else {}
            if response.status_code == 200:
                message = "; ".join(c["summary"] for c in body["cards"]) or "no card"
            else:
                message = body["issue"][0].get("diagnostics", "")
            rows.append(
                {
                    "fault": name,
                    "status": response.status_code,
                    "seconds": round(seconds, 2),
                    "message": message,
                    "incomplete": line.get("prefetch_incomplete", []),
                    "timed_out": line.get("timed_out", False),
                    "outside_base": sum(1 for s in server.seen if not s.path.startswith("/fhir/")),
                }
            )
    finally:
        logger.removeHandler(handler)
        server.close()
    return rows


def _sweep_args(base: str, out: Path, patients: list[str]) -> list[str]:
    args = ["sweep", "--fhir-base", base, "--source", "rest", "--as-of", "2026-11-01"]
    args += ["--out", str(out), "--timeout", "2", "--patient-timeout", "10"]
    for pid in patients:
        args += ["--patient", pid]
    return args


def bench_faults_sweep(work: Path) -> list[dict[str, Any]]:
    from cds.cli import main

    server = FaultInjector()
    rows = []
    try:
        for n, (name, route) in enumerate(_faults(server).items()):
            server.route = route
            server.seen.clear()
            out = work / f"fault{n}"
            err = io.StringIO()
            started = time.monotonic()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                status = main(_sweep_args(server.base_url, out, [PID]))
            seconds = time.monotonic() - started
            message = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else ""
            errors_file = out / "errors.ndjson"
            first_error = (
                json.loads(errors_file.read_text().splitlines()[0])["error"][:160]
                if errors_file.exists() and errors_file.read_text().strip()
                else ""
            )
            summary = (
                json.loads((out / "summary.json").read_text())
                if (out / "summary.json").exists()
                else {}
            )
            rows.append(
                {
                    "fault": name,
                    "exit": status,
                    "seconds": round(seconds, 2),
                    "summary_status": summary.get("status"),
                    "message": message[:200],
                    "errors_ndjson": first_error,
                    "outside_base": sum(1 for s in server.seen if not s.path.startswith("/fhir/")),
                }
            )
    finally:
        server.close()
    return rows


# -- 5. Ctrl-C latency -----------------------------------------------------------------------


def bench_ctrl_c(work: Path, runs: int) -> dict[str, Any]:
    server = FaultInjector()
    server.route = on_searches_dynamic(lambda: Fault(breakage="trickle"))
    server.route = lambda seen: (
        Fault(body={"resourceType": "CapabilityStatement", "rest": []})
        if "metadata" in seen.path
        else Fault(breakage="trickle")
    )
    latencies = []
    codes = []
    try:
        for n in range(runs):
            command = [
                sys.executable,
                "-m",
                "cds.cli",
                *_sweep_args(server.base_url, work / f"c{n}", [f"p{i}" for i in range(8)]),
            ]
            # only Ctrl-C can end it
            command[command.index("--timeout") + 1] = "600"
            command[command.index("--patient-timeout") + 1] = "600"
            process = subprocess.Popen(
                command,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
            deadline = time.monotonic() + 30
            while server.trickling < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)  # well into the trickle
            started = time.monotonic()
            process.send_signal(signal.SIGINT)
            try:
                process.communicate(timeout=120)
                latencies.append(round(time.monotonic() - started, 2))
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
                latencies.append(None)
            codes.append(process.returncode)
            time.sleep(0.3)
    finally:
        server.close()
    finished = [s for s in latencies if s is not None]
    return {
        "runs": runs,
        "seconds_from_sigint_to_exit": latencies,
        "exit_codes": codes,
        "max_s": max(finished) if finished else None,
        "ok": len(finished) == runs and max(finished) < 5,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="race,escapes,fuzz,faults,ctrl-c")
    parser.add_argument("--tokens", type=int, default=240)
    parser.add_argument("--copies", type=int, default=16)
    parser.add_argument("--fuzz", type=int, default=10_000)
    parser.add_argument("--fuzz-threads", type=int, default=16)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument(
        "--repo",
        type=Path,
        default=REPO,
        help="checkout whose scripts/gunicorn-cmd serves the race (e.g. an older commit)",
    )
    parser.add_argument("--ctrl-c-runs", type=int, default=5)
    args = parser.parse_args()
    parts = set(args.only.split(","))
    results: dict[str, Any] = {}
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="bench-hardening-") as tmp:
        work = Path(tmp)
        if "race" in parts:
            results["race"] = bench_race(work, args.tokens, args.copies, args.repo)
            print("race:", json.dumps(results["race"]), flush=True)
        if "escapes" in parts:
            results["escapes"] = bench_escapes(work)
            print("escapes:", json.dumps(results["escapes"]), flush=True)
        if "fuzz" in parts:
            results["fuzz"] = bench_fuzz(work, args.fuzz, args.seed, args.fuzz_threads)
            print("fuzz:", json.dumps(results["fuzz"]), flush=True)
        if "faults" in parts:
            hooks = bench_faults_hooks()
            sweep = bench_faults_sweep(work)
            results["faults"] = {"hooks": hooks, "sweep": sweep, "ok": True}
            for row in hooks:
                print("hooks fault:", json.dumps(row), flush=True)
            for row in sweep:
                print("sweep fault:", json.dumps(row), flush=True)
        if "ctrl-c" in parts:
            results["ctrl_c"] = bench_ctrl_c(work, args.ctrl_c_runs)
            print("ctrl-c:", json.dumps(results["ctrl_c"]), flush=True)
    print(json.dumps({k: v.get("ok") for k, v in results.items()}))
    return 0 if all(part["ok"] for part in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
