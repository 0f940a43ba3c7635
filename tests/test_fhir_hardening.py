# ruff: noqa: F811  (pytest fixtures imported from test_fhir_faults are parameters here)
"""Issue 13 items 2, 4 and 5 against a real HTTP stand-in: path escapes, failed searches and
slow servers, for the REST client, Bulk paging, the hooks service and the sweep.

The stand-in is the fault-injecting server of test_fhir_faults (a real HTTP server on
127.0.0.1 playing faults no real FHIR server can be made to produce)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cds.errors import (
    FhirBadResponse,
    FhirSearchFailed,
    FhirTemporaryError,
    InputError,
    UntrustedFhirServer,
)
from cds.fhir.bulk import iter_search_pages
from cds.fhir.client import FhirClient, Timeouts
from cds.fhir.outcome import read_searchset
from cds.fhir.trust import check_within_base, normalise_url
from cds.sweep.remote import RestOptions, sweep_rest
from tests.helpers import sweep_options
from tests.hooks_data.support import dev_app, fixture_resources, hook_body, post
from tests.test_fhir_faults import (  # noqa: F401 - fixtures
    Fault,
    FaultInjector,
    Seen,
    injector,
    make_client,
    outcome,
    searchset,
    sleeps,
)

SERVICE = "/cds-services/trial-screening"
RECORD = fixture_resources("both-candidate.json")
PATIENT = next(r for r in RECORD if r["resourceType"] == "Patient")
PID = PATIENT["id"]


def _outside(injector: FaultInjector) -> list[str]:
    """Requests the stand-in received outside the trusted base path /fhir."""
    return [s.path for s in injector.seen if not s.path.startswith("/fhir/")]


# -- item 2: path escapes --------------------------------------------------------------------


@pytest.mark.parametrize(
    "escape",
    [
        "/fhir/../admin/secret",
        "/fhir/Patient/../../admin",
        "/fhir/%2e%2e/admin",
        "/fhir/%2E%2e/%2e%2E/admin",
        "/fhir/./../admin",
    ],
)
def test_a_redirect_that_walks_out_of_the_base_is_refused(injector, make_client, escape):
    injector.route = lambda seen: (
        Fault(302, headers={"Location": escape}) if seen.path.startswith("/fhir/") else Fault()
    )
    with pytest.raises(UntrustedFhirServer):
        make_client(access_token="tok").read("Patient", "p1")
    assert _outside(injector) == []


@pytest.mark.parametrize("link", ["{base}/../admin?x=1", "{base}/Observation/%2e%2e/%2e%2e/x"])
def test_a_next_link_that_walks_out_of_the_base_is_refused(injector, make_client, link):
    injector.route = lambda seen: Fault(body=searchset([], link.format(base=injector.base_url)))
    with pytest.raises(UntrustedFhirServer):
        make_client(access_token="tok").search("Observation", "patient=p1")
    assert _outside(injector) == [] and len(injector.seen) == 1


def test_the_url_sent_is_the_normalised_url_that_was_checked(injector, make_client):
    pages = iter([searchset([], f"{injector.base_url}/x/../Observation?page=2"), searchset([])])
    injector.route = lambda seen: Fault(body=next(pages))
    make_client().search("Observation", "patient=p1")
    assert injector.seen[1].path == "/fhir/Observation?page=2"


def test_normalisation_follows_rfc_3986() -> None:
    assert normalise_url("HTTP://H/fhir/a/./b/../c/%7Euser") == "http://h/fhir/a/c/~user"
    # Reserved characters stay encoded: %2F is data, not a path separator.
    assert normalise_url("http://h/fhir/a%2F..%2Fb") == "http://h/fhir/a%2F..%2Fb"
    assert check_within_base("http://h/fhir/x/../Patient/1", "http://h/fhir") == (
        "http://h/fhir/Patient/1"
    )
    with pytest.raises(UntrustedFhirServer):
        check_within_base("http://h/fhir/%2e%2e/fhirx", "http://h/fhir")


@pytest.mark.parametrize("pid", [".", ".."])
def test_a_dot_patient_id_is_refused_before_any_request(injector, make_client, pid):
    with pytest.raises(InputError):
        make_client().read("Patient", pid)
    assert injector.seen == []
    app = dev_app(fhir_trusted_servers=[injector.base_url])
    response = post(
        app.test_client(), SERVICE, hook_body(patient_id=pid, fhirServer=injector.base_url)
    )
    assert response.status_code == 400
    issue = response.get_json()["issue"][0]
    assert issue["expression"] == ["context.patientId"]
    assert injector.seen == []


def test_a_client_prefetch_next_link_out_of_the_base_is_never_requested(injector):
    """The EHR's own prefetch Bundle names a next page: followed only inside fhirServer's base."""
    prefetch = {
        "patient": PATIENT,
        "conditions": searchset(
            [r for r in RECORD if r["resourceType"] == "Condition"],
            f"{injector.base_url}/../internal/Condition?page=2",
        ),
    }
    app = dev_app(fhir_trusted_servers=[injector.base_url])
    body = hook_body(
        prefetch=prefetch,
        fhirServer=injector.base_url,
        fhirAuthorization={
            "access_token": "secret-token",
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/*.read",
            "subject": "cds",
        },
    )
    response = post(app.test_client(), SERVICE, body)
    assert response.status_code == 200
    assert _outside(injector) == []


# -- item 4: a failed search is not "nothing on record" --------------------------------------


def test_the_one_policy_errors_fail_warnings_stay_warnings() -> None:
    bundle = searchset(
        [{"resourceType": "Condition", "id": "c1"}],
        outcome_entries=[outcome("partial", severity="warning")],
    )
    page = read_searchset(bundle, "search Condition")
    assert not page.failed and page.warnings and len(page.resources) == 1
    for severity in ("error", "fatal"):
        bundle["entry"].append({"resource": outcome("backend down", severity=severity)})
        assert read_searchset(bundle, "search Condition").failed
    no_issue = {"resourceType": "OperationOutcome", "issue": []}
    assert read_searchset(searchset([], outcome_entries=[no_issue]), "s").failed


def test_an_error_outcome_fails_the_search_the_bulk_paging_and_lists(injector, make_client):
    injector.route = lambda seen: Fault(
        body=searchset([PATIENT], outcome_entries=[outcome("backend timeout")])
    )
    client = make_client()
    with pytest.raises(FhirSearchFailed, match="backend timeout"):
        client.search("Condition", "patient=p1")
    with pytest.raises(FhirSearchFailed):
        list(iter_search_pages(client, "Patient"))


def test_patient_list_paging_has_a_page_cap(injector, make_client):
    """Item 5: the sweep's Patient list is paged by the same capped loop."""
    count = iter(range(100))

    def route(seen: Seen) -> Fault:
        n = next(count)
        return Fault(
            body=searchset([], f"{injector.base_url}/Patient?page={n + 1}" if n < 40 else None)
        )

    injector.route = route
    with pytest.raises(FhirBadResponse, match="more than 10 pages"):
        list(iter_search_pages(make_client(max_pages=10), "Patient"))
    assert len(injector.seen) == 10


def _record_server(failing: set[str]) -> Callable[[Seen], Fault]:
    """The both-candidate record; searches of the ``failing`` types answer an empty searchset
    with an error OperationOutcome (a server whose backend for them timed out)."""

    def route(seen: Seen) -> Fault:
        path = seen.path.split("?", 1)[0].split("/fhir/", 1)[1]
        rtype = path.split("/")[0]
        if "/" in path:
            return Fault(body=PATIENT)
        if rtype in failing:
            return Fault(body=searchset([], outcome_entries=[outcome("backend timeout")]))
        return Fault(body=searchset([r for r in RECORD if r["resourceType"] == rtype]))

    return route


def _lines(answer: dict[str, object], marker: str) -> set[str]:
    cards: list[dict[str, str]] = answer["cards"]  # type: ignore[assignment]
    return {
        line.strip()
        for card in cards
        for line in card.get("detail", "").splitlines()
        if marker in line
    }


def test_hooks_a_failed_search_makes_its_criteria_unknown(injector, caplog):
    """Item 4 in the hooks service: Procedure and MedicationRequest searches fail; the
    criteria they feed are unknown ("Not assessed"), never "None on record"."""
    app = dev_app(fhir_trusted_servers=[injector.base_url])
    injector.route = _record_server(set())
    with caplog.at_level(logging.INFO, logger="cds.hooks.calls"):
        clean = post(app.test_client(), SERVICE, hook_body(fhirServer=injector.base_url))
    clean_line = json.loads(caplog.records[-1].getMessage())
    injector.route = _record_server({"Procedure", "MedicationRequest"})
    with caplog.at_level(logging.INFO, logger="cds.hooks.calls"):
        response = post(app.test_client(), SERVICE, hook_body(fhirServer=injector.base_url))
    assert clean.status_code == response.status_code == 200
    line = json.loads(caplog.records[-1].getMessage())
    assert {"procedures", "medication-requests"} <= set(line["prefetch_incomplete"])
    # The clean record is a candidate; with the searches failed, the criteria they feed
    # (prior embolization, washouts) cannot pass on "none on record": needs review, saying so.
    assert set(clean_line["trials"].values()) == {"candidate"}
    assert set(line["trials"].values()) == {"needs-review"}
    assert all("Not assessed" in card["detail"] for card in response.get_json()["cards"])
    assert not _lines(clean.get_json(), "Not assessed")


def test_sweep_a_failed_search_is_a_patient_error_and_the_exit_is_not_0(injector, tmp_path):
    """Item 4 in a sweep: errors.ndjson holds the patients, the summary says so, exit 3."""
    injector.route = _record_server({"Procedure"})
    from cds.cli import main

    status = main(
        [
            "sweep",
            "--fhir-base",
            injector.base_url,
            "--source",
            "rest",
            "--patient",
            PID,
            "--as-of",
            "2026-11-01",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert status == 3
    errors = (tmp_path / "out" / "errors.ndjson").read_text().splitlines()
    assert len(errors) == 1 and "FhirSearchFailed" in errors[0] and PID in errors[0]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "complete-with-errors" and summary["errors"] == 1
    assert summary["patients"] == 0


# -- item 5: slow servers --------------------------------------------------------------------


@pytest.mark.parametrize("breakage", ["trickle", "trickle-headers"])
def test_a_trickling_server_meets_the_total_deadline(injector, make_client, breakage):
    injector.route = lambda seen: Fault(breakage=breakage)
    client = make_client(timeouts=Timeouts(connect=1, read=0.5, total=1.0))
    started = time.monotonic()
    with pytest.raises(FhirTemporaryError, match="no complete answer within 1.0 s"):
        client.read("Patient", "p1")
    # 3 attempts of 1 s each; the read timeout (0.5 s) alone never fires on a trickle.
    assert time.monotonic() - started < 3 * 1.0 + 1.0
    time.sleep(0.3)
    assert injector.trickling == 0  # every trickled answer was hung up on


def test_hooks_abandoned_fetches_are_cut_at_the_time_budget(injector):
    """Item 5: ten calls against a trickling fhirServer: each answers at its budget and leaves
    no thread or connection behind (before: 12 -> 45 threads after 10 calls)."""
    injector.route = lambda seen: Fault(breakage="trickle")
    app = dev_app(fhir_trusted_servers=[injector.base_url], time_budget_s=0.3)
    client = app.test_client()
    prefetch = {"patient": PATIENT}  # the searches go to the trickling server
    post(client, SERVICE, hook_body(prefetch=prefetch, fhirServer=injector.base_url))
    time.sleep(0.5)
    threads_before = threading.active_count()
    for _ in range(10):
        started = time.monotonic()
        response = post(client, SERVICE, hook_body(prefetch=prefetch, fhirServer=injector.base_url))
        assert time.monotonic() - started < 0.3 + 0.6
        assert response.status_code == 200
    deadline = time.monotonic() + 3
    while (injector.trickling or threading.active_count() > threads_before) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert injector.trickling == 0
    assert threading.active_count() <= threads_before


def test_a_sweep_stops_within_seconds_of_ctrl_c_against_a_trickling_server(injector, tmp_path):
    """Item 5: SIGINT while every patient fetch is being trickled: the sweep saves what is done
    and exits within a few seconds (before: 24-77 s, or never)."""

    def route(seen: Seen) -> Fault:
        if seen.path.startswith("/fhir/metadata"):
            return Fault(body={"resourceType": "CapabilityStatement", "rest": []})
        return Fault(breakage="trickle")

    injector.route = route
    out = tmp_path / "out"
    command = [sys.executable, "-m", "cds.cli", "sweep", "--fhir-base", injector.base_url]
    command += ["--source", "rest", "--as-of", "2026-11-01", "--out", str(out)]
    for n in range(8):
        command += ["--patient", f"p{n}"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while injector.trickling < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert injector.trickling >= 4, "the sweep never reached the trickling fetches"
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=15)
        latency = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr.decode()
    assert latency < 5.0  # typically ~0.3 s; the margin is for a loaded machine
    assert b"Traceback" not in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is False


def test_a_sweep_patient_that_trickles_is_an_error_after_its_deadline(injector, tmp_path):
    injector.route = lambda seen: Fault(breakage="trickle")
    client = FhirClient(
        base_url=injector.base_url,
        trusted_base_urls=[injector.base_url],
        allow_insecure_loopback=True,
        timeouts=Timeouts(connect=1, read=5, total=30),
    )
    rest = RestOptions(patient_ids=["p1"], patient_deadline_s=0.5, concurrency=1)
    started = time.monotonic()
    try:
        summary = sweep_rest(client, sweep_options(tmp_path / "out"), rest)
    finally:
        client.close()
    assert time.monotonic() - started < 3
    assert summary["errors"] == 1 and summary["status"] == "complete-with-errors"


# The env of a sweep subprocess: this checkout first on the path.
os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
