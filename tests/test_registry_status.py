"""A trial's registry status (issue 12 section 6): reports for a trial not open to enrolment say
so, and a site can turn a trial's cards off while `cds evaluate` and sweeps still screen it."""

from __future__ import annotations

from typing import Any

import pytest

from cds.cli import main
from cds.config import load_config
from cds.criteria import load_trials
from cds.criteria.model import is_enrolling, registry_phrase
from cds.errors import InputError
from cds.sweep.report import report_html, summary_text
from tests.hooks_data.support import (
    REPO,
    dev_app,
    draft_bundle,
    fixture_resources,
    full_prefetch,
    hook_body,
    med_order,
    post,
)

A, B = "NCT04339036", "NCT05610826"
CAPECITABINE = ("200328", "capecitabine 500 MG Oral Tablet")


def _card_trials(cards: list[dict[str, Any]]) -> set[str]:
    # each card's source names its trial ("NCT04339036 trial screening")
    return {c["source"]["label"].split(" ", 1)[0] for c in cards}


@pytest.mark.parametrize(
    ("status", "enrolling"),
    [
        ("RECRUITING", True),
        ("Recruiting", True),
        ("ENROLLING_BY_INVITATION", True),
        ("Enrolling by invitation", True),
        ("WITHDRAWN", False),
        ("NOT_YET_RECRUITING", False),
        ("ACTIVE_NOT_RECRUITING", False),
        ("COMPLETED", False),
    ],
)
def test_enrolling_statuses(status: str, enrolling: bool) -> None:
    assert is_enrolling(status) is enrolling
    assert ("not open to enrolment" in registry_phrase(status)) is not enrolling


def test_the_shipped_trials_registry_statuses() -> None:
    trials = load_trials()
    assert is_enrolling(trials[A].registry_status)
    assert not is_enrolling(trials[B].registry_status)  # WITHDRAWN


def test_cli_text_says_a_withdrawn_trial_is_not_enrolling(
    capsys: pytest.CaptureFixture[str],
) -> None:
    fixture = REPO / "fhir_fixtures" / "both-candidate.json"
    code = main(["evaluate", str(fixture), "--as-of", "2026-11-01", "--format", "text"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"{B} " in out and "[registry: WITHDRAWN, not open to enrolment]: CANDIDATE" in out
    assert "[registry: RECRUITING]: CANDIDATE" in out


def test_sweep_reports_say_a_trial_is_not_enrolling() -> None:
    summary: dict[str, Any] = {
        "as_of": "2026-11-01",
        "patients": 1,
        "errors": 0,
        "complete": True,
        "trials": {
            tid: {
                "title": t.title,
                "version": t.version,
                "registry_status": t.registry_status,
                "enrolling": is_enrolling(t.registry_status),
                "status": {"candidate": 1},
                "funnel": [],
            }
            for tid, t in ((t.id, t) for t in load_trials())
        },
    }
    text = summary_text(summary)
    assert f"{B} v{load_trials()[B].version} [WITHDRAWN, not open to enrolment]" in text
    assert f"{A} v{load_trials()[A].version} [RECRUITING]" in text
    assert "WITHDRAWN, not open to enrolment" in report_html(summary)


def test_cards_off_is_a_list_of_trials_and_must_name_known_ones() -> None:
    settings = load_config({"dev": True, "auth_required": False}, env={"CDS_CARDS_OFF": B})
    assert settings.cards_off == (B,)
    assert load_config({"dev": True, "auth_required": False}, env={}).cards_off == ()
    with pytest.raises(InputError, match="cards_off"):
        load_config({"dev": True, "auth_required": False, "cards_off": 5}, env={})
    with pytest.raises(InputError, match="cards_off") as caught:
        dev_app(cards_off=["NCT00000000"])
    assert "NCT00000000" in str(caught.value)


def _patient_view(app_cards_off: list[str], fixture: str) -> list[dict[str, Any]]:
    client = dev_app(cards_off=app_cards_off).test_client()
    pid = fixture.removesuffix(".json")
    body = hook_body(patient_id=pid, prefetch=full_prefetch(fixture_resources(fixture), pid))
    response = post(client, "/cds-services/trial-screening", body)
    assert response.status_code == 200, response.get_json()
    cards: list[dict[str, Any]] = response.get_json()["cards"]
    return cards


def test_a_trial_with_cards_off_gets_no_patient_view_card() -> None:
    assert _card_trials(_patient_view([], "both-candidate.json")) == {A, B}
    assert _card_trials(_patient_view([B], "both-candidate.json")) == {A}
    assert _patient_view([A, B], "both-candidate.json") == []


def test_a_trial_with_cards_off_gets_no_order_warning() -> None:
    client = dev_app(cards_off=[B]).test_client()
    pid = "both-candidate"
    body = hook_body(
        "order-sign",
        patient_id=pid,
        prefetch=full_prefetch(fixture_resources(f"{pid}.json"), pid),
    )
    body["context"]["draftOrders"] = draft_bundle(med_order("m1", *CAPECITABINE, pid=pid))
    response = post(client, "/cds-services/trial-order-sign", body)
    assert response.status_code == 200, response.get_json()
    assert _card_trials(response.get_json()["cards"]) == {A}


def test_cards_off_leaves_the_command_line_screening_alone(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The switch is a hooks setting: `cds evaluate` (and sweeps) screen every trial regardless.
    monkeypatch.setenv("CDS_CARDS_OFF", B)
    fixture = REPO / "fhir_fixtures" / "both-candidate.json"
    assert main(["evaluate", str(fixture), "--as-of", "2026-11-01", "--format", "text"]) == 0
    assert f"  {B} " in capsys.readouterr().out
