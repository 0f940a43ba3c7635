"""Issue 13: defects an adversarial run found, each tested at its depth (real processes, a real
HTTP stand-in, real sockets)."""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cds.errors import FhirError
from cds.fhir.client import FhirClient, RetryPolicy
from cds.hooks.store import Store
from cds.sweep.remote import RestOptions, sweep_rest
from cds.synthetic import Population, write_population
from tests.helpers import sweep_options
from tests.hooks_data.support import (
    ORD,
    PUBLIC,
    Signer,
    check_any,
    dev_app,
    draft_bundle,
    fixture_resources,
    full_prefetch,
    hook_body,
    med_order,
    secure_app,
)
from tests.test_fhir_faults import Fault, FaultInjector, outcome

SERVICE = "/cds-services/trial-screening"
RECORD = fixture_resources("both-candidate.json")
PID = "both-candidate"
REPO = Path(__file__).resolve().parents[1]


def _remember_all(path: str, count: int, start: object, results: object) -> None:
    store = Store(path)
    start.wait()  # type: ignore[attr-defined]
    accepted = sum(
        1 for i in range(count) if store.remember_jti("iss", f"jti-{i}", time.time() + 600)
    )
    results.put(accepted)  # type: ignore[attr-defined]


def test_a_jti_is_remembered_atomically_across_processes(tmp_path: Path) -> None:
    """Item 1: four processes (as gunicorn workers) race to remember the same 4,000 token ids
    in one SQLite file; each id is accepted exactly once in all. A SELECT-then-INSERT let a
    few ids through twice per run."""
    path = str(tmp_path / "store.sqlite3")
    Store(path).close()
    context = multiprocessing.get_context("fork")
    start, results = context.Event(), context.Queue()
    count, processes = 4000, 4
    workers = [
        context.Process(target=_remember_all, args=(path, count, start, results))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    time.sleep(0.3)
    start.set()
    accepted = sum(results.get(timeout=60) for _ in workers)
    for worker in workers:
        worker.join(timeout=10)
    assert accepted == count


def test_two_processes_can_open_a_new_store_at_once(tmp_path: Path) -> None:
    """Two gunicorn workers open the same new file at the same moment: neither fails with
    "database is locked" (the switch to WAL does not wait on SQLite's busy timeout)."""
    context = multiprocessing.get_context("fork")
    for n in range(5):
        path = str(tmp_path / f"s{n}.sqlite3")
        workers = [context.Process(target=Store, args=(path,)) for _ in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=30)
        assert [w.exitcode for w in workers] == [0, 0, 0, 0]


# -- items 6 and 7: bad input is a 400 naming the field, never a 500 or "no cards" -----------


def _raw_post(client: Any, path: str, raw: bytes, headers: dict[str, str] | None = None) -> Any:
    response = client.post(path, data=raw, headers=headers or {}, content_type="application/json")
    check_any(response)
    return response


def _expression(response: Any) -> str:
    return str(response.get_json()["issue"][0].get("expression", [""])[0])


def test_json_nested_a_thousand_deep_is_a_400() -> None:
    client = dev_app().test_client()
    body = hook_body(prefetch={"patient": {"resourceType": "Patient", "id": PID}})
    text = json.dumps(body)
    deep = text[:-1] + ', "extra": ' + "[" * 990 + "]" * 990 + "}"
    response = _raw_post(client, SERVICE, deep.encode())
    assert response.status_code == 400
    assert "nested too deeply" in response.get_json()["issue"][0]["diagnostics"]
    # Deep but within what the JSON parser takes: named by its path.
    deep = text[:-1] + ', "extra": ' + "[" * 200 + "]" * 200 + "}"
    response = _raw_post(client, SERVICE, deep.encode())
    assert response.status_code == 400 and _expression(response).startswith("extra[0]")


def test_a_lone_surrogate_in_feedback_is_a_400_naming_the_field(tmp_path: Path) -> None:
    client = dev_app(feedback_db=str(tmp_path / "f.sqlite3")).test_client()
    item = {
        "card": "0b4b5b60-5b0f-4bd9-9ad0-2bb6b1e0b0b0",
        "outcome": "overridden",
        "overrideReason": {"userComment": "PLACEHOLDER"},
        "outcomeTimestamp": "2026-11-01T10:00:00+01:00",
    }
    raw = json.dumps({"feedback": [item]}).replace("PLACEHOLDER", "bad \\udc80 text").encode()
    response = _raw_post(client, f"{SERVICE}/feedback", raw)
    assert response.status_code == 400
    assert _expression(response) == "feedback[0].overrideReason.userComment"
    # A surrogate pair is a real character and stays fine.
    raw = json.dumps({"feedback": [item]}).replace("PLACEHOLDER", "ok \\ud83d\\ude00").encode()
    assert _raw_post(client, f"{SERVICE}/feedback", raw).status_code == 200


def test_a_lone_surrogate_in_draft_order_text_is_a_400_naming_the_field() -> None:
    client = dev_app().test_client()
    body = hook_body("order-sign", prefetch=full_prefetch(RECORD, PID))
    order = med_order("m1", "200328", "PLACEHOLDER")
    body["context"]["draftOrders"] = draft_bundle(order)
    raw = json.dumps(body).replace("PLACEHOLDER", "\\ud800capecitabine").encode()
    response = _raw_post(client, f"/cds-services/{ORD['order-sign']}", raw)
    assert response.status_code == 400
    assert _expression(response).startswith("context.draftOrders.entry[0].resource")


@pytest.mark.parametrize("exp", [10**400, -(10**400), "soon"], ids=["400-digits", "minus", "text"])
def test_a_jwt_with_an_unusable_exp_is_a_401(exp: Any) -> None:
    signer = Signer()
    client = secure_app(signer).test_client()
    token = signer.token(f"{PUBLIC}/cds-services", exp=exp)
    response = client.get("/cds-services", headers={"Authorization": f"Bearer {token}"})
    check_any(response)
    assert response.status_code == 401


@pytest.mark.parametrize(
    ("entries", "field"),
    [
        ([17], "prefetch.conditions.entry[0]"),
        (["text"], "prefetch.conditions.entry[0]"),
        ([{"resource": [1]}], "prefetch.conditions.entry[0].resource"),
        (
            [{"resource": {"resourceType": "Condition", "id": {"a": 1}}}],
            "prefetch.conditions.entry[0].resource.id",
        ),
        (
            [{"resource": {"resourceType": "Condition", "id": ["x"]}}],
            "prefetch.conditions.entry[0].resource.id",
        ),
        ([{"resource": {"resourceType": 5}}], "prefetch.conditions.entry[0].resource.resourceType"),
        (
            [{"resource": {"resourceType": "Condition"}, "search": "match"}],
            "prefetch.conditions.entry[0].search",
        ),
    ],
)
def test_malformed_prefetch_is_a_400_naming_key_and_entry(entries: list[Any], field: str) -> None:
    """Item 7: these crashed the handler and were answered 200 {"cards": []}."""
    client = dev_app().test_client()
    prefetch = full_prefetch(RECORD, PID)
    prefetch["conditions"] = {"resourceType": "Bundle", "type": "searchset", "entry": entries}
    response = _raw_post(client, SERVICE, json.dumps(hook_body(prefetch=prefetch)).encode())
    assert response.status_code == 400
    assert _expression(response) == field


def test_a_prefetch_value_that_is_not_a_resource_is_a_400() -> None:
    client = dev_app().test_client()
    prefetch = full_prefetch(RECORD, PID)
    prefetch["procedures"] = ["not", "a", "resource"]
    response = _raw_post(client, SERVICE, json.dumps(hook_body(prefetch=prefetch)).encode())
    assert response.status_code == 400 and _expression(response) == "prefetch.procedures"


# -- item 10: sweeps -------------------------------------------------------------------------


def _cds(*args: str, limit_bytes: int | None = None) -> subprocess.CompletedProcess[str]:
    def limit() -> None:
        if limit_bytes is not None:
            # A file size limit stands in for a full disk (no tmpfs without root): writes past
            # it fail with EFBIG, as they fail with ENOSPC on a full disk.
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(
        [sys.executable, "-m", "cds.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limit,  # noqa: PLW1509 - only sets a limit and a signal disposition
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )


@pytest.fixture(scope="module")
def population(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("population")
    write_population(Population(40, seed=3, net_every=5), src, "ndjson")
    return src


def test_a_full_disk_ends_with_a_message_and_resume_completes(
    population: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = ["sweep", "--ndjson", str(population), "--as-of", "2026-11-01", "--workers", "1"]
    full = _cds(*args, "--out", str(out), limit_bytes=300_000)
    assert full.returncode == 4, full.stderr[-2000:]
    assert "Traceback" not in full.stderr
    assert "cds: error:" in full.stderr and "--resume" in full.stderr
    resumed = _cds(*args, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _cds(*args, "--out", str(tmp_path / "clean")).returncode == 0
    assert (out / "results.ndjson").read_bytes() == (
        tmp_path / "clean" / "results.ndjson"
    ).read_bytes()


def test_resume_of_a_sweep_killed_before_its_first_checkpoint_says_to_start_again(
    population: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    (out / ".sweep" / "parts").mkdir(parents=True)  # what a kill during start-up leaves
    result = _cds("sweep", "--ndjson", str(population), "--out", str(out), "--resume")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "without --resume" in result.stderr


_POOL_SCRIPT = """
import multiprocessing, sys, time
from cds.sweep.runner import _worker_init
pool = multiprocessing.get_context("fork").Pool(2, initializer=_worker_init)
pool.map_async(time.sleep, [60, 60])
time.sleep(0.5)
print(" ".join(str(p.pid) for p in pool._pool), flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_sweep_workers_end_with_their_parent(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _POOL_SCRIPT],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert parent.stdout is not None
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    parent.kill()  # SIGKILL: no clean-up runs in the parent
    parent.wait()
    parent.stdout.close()
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [p for p in pids if _alive(p)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert survivors == []


def test_a_sweep_stopped_by_repeated_failures_lists_them_in_errors_ndjson(tmp_path: Path) -> None:
    server = FaultInjector()
    server.route = lambda seen: Fault(500, body=outcome("database unavailable"))
    client = FhirClient(
        base_url=server.base_url,
        trusted_base_urls=[server.base_url],
        allow_insecure_loopback=True,
        retry=RetryPolicy(attempts=1),
    )
    rest = RestOptions(patient_ids=[f"p{n}" for n in range(10)], failure_streak=3, concurrency=1)
    try:
        with pytest.raises(FhirError, match="3 patients in a row"):
            sweep_rest(client, sweep_options(tmp_path / "out"), rest)
    finally:
        client.close()
        server.close()
    lines = (tmp_path / "out" / "errors.ndjson").read_text().splitlines()
    assert len(lines) >= 3
    assert all("database unavailable" in json.loads(line)["error"] for line in lines)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["complete"] is False and summary["error_samples"]


@pytest.mark.parametrize(("engine", "advice"), [("local", "--resume"), ("spark", "--overwrite")])
def test_a_full_disk_says_how_to_go_on_for_each_engine(
    monkeypatch: pytest.MonkeyPatch, engine: str, advice: str
) -> None:
    """A Spark sweep keeps no checkpoint: it is told to run again with --overwrite, not to
    resume (a fake of the disk, which a real one cannot be made to fill here)."""
    import argparse
    import errno

    from cds.errors import OutputError
    from cds.sweep import command

    def full(args: argparse.Namespace) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", "/out/part-00001")

    monkeypatch.setattr(command, "_run", full)
    with pytest.raises(OutputError) as raised:
        command.run(argparse.Namespace(engine=engine, out="/out"))
    assert advice in str(raised.value) and "No space left" in str(raised.value)
