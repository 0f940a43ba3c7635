"""Feedback (checklist F1-F8): validated, idempotent, stored, and suppressing repeat cards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from cds.hooks.cards import OVERRIDE_SYSTEM
from cds.hooks.state import EXTENSION
from tests.hooks_data.support import (
    DATA,
    PUBLIC,
    PV,
    A,
    Signer,
    dev_app,
    fixture_resources,
    full_prefetch,
    hook_body,
    post,
    secure_app,
)

PID = "both-candidate"
SERVICE = f"/cds-services/{PV}"
FEEDBACK = f"{SERVICE}/feedback"


def _examples() -> dict[str, Any]:
    examples: dict[str, Any] = json.loads((DATA / "feedback-examples.json").read_text())
    return examples


@pytest.fixture()
def app(tmp_path: Path) -> Flask:
    return dev_app(feedback_db=str(tmp_path / "feedback.sqlite3"), suppress_days=30)


@pytest.fixture()
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def _screen(client: FlaskClient, pid: str = PID) -> list[dict[str, Any]]:
    body = hook_body(patient_id=pid, prefetch=full_prefetch(fixture_resources(f"{pid}.json"), pid))
    response = post(client, SERVICE, body)
    assert response.status_code == 200
    cards: list[dict[str, Any]] = response.get_json()["cards"]
    return cards


def _card_for(cards: list[dict[str, Any]], trial: str) -> dict[str, Any]:
    return next(c for c in cards if trial in c["summary"])


def _with_card(example: dict[str, Any], card: dict[str, Any]) -> dict[str, Any]:
    item = json.loads(json.dumps(example))
    for entry in item["feedback"]:
        entry["card"] = card["uuid"]
        for accepted in entry.get("acceptedSuggestions", []):
            accepted["id"] = card["suggestions"][0]["uuid"]
    return item


def _stored(app: Flask, card: str) -> list[Any]:
    return app.extensions[EXTENSION].store.feedback_for_card(card)


def test_f1_accepted_suggestion(app: Flask, client: FlaskClient) -> None:
    card = _card_for(_screen(client), A)
    response = post(client, FEEDBACK, _with_card(_examples()["accepted"], card))
    assert response.status_code == 200
    assert response.get_json()["resourceType"] == "OperationOutcome"
    (record,) = _stored(app, card["uuid"])
    assert record.outcome == "accepted"
    assert record.accepted_suggestions == (card["suggestions"][0]["uuid"],)
    assert record.trial == A and record.patient == PID


def test_f2_overridden_without_reason(app: Flask, client: FlaskClient) -> None:
    card = _card_for(_screen(client), A)
    response = post(client, FEEDBACK, _with_card(_examples()["overridden-no-reason"], card))
    assert response.status_code == 200
    (record,) = _stored(app, card["uuid"])
    assert record.outcome == "overridden" and record.reason_code is None


def test_f3_overridden_with_reason_and_comment_is_persisted(
    app: Flask, client: FlaskClient
) -> None:
    card = _card_for(_screen(client), A)
    response = post(client, FEEDBACK, _with_card(_examples()["overridden-with-reason"], card))
    assert response.status_code == 200
    (record,) = _stored(app, card["uuid"])
    assert (record.reason_system, record.reason_code) == (OVERRIDE_SYSTEM, "not-eligible")
    assert record.user_comment == "Seen in tumour board last week"
    assert (record.trial, record.patient) == (A, PID)


def test_comment_only_override_is_accepted(client: FlaskClient) -> None:
    card = _card_for(_screen(client), A)
    body = {
        "feedback": [
            {
                "card": card["uuid"],
                "outcome": "overridden",
                "overrideReason": {"userComment": "later"},
                "outcomeTimestamp": "2026-11-01T10:00:00+01:00",
            }
        ]
    }
    assert post(client, FEEDBACK, body).status_code == 200


@pytest.mark.parametrize(
    ("item", "expression"),
    [
        ({"outcome": "rejected"}, "feedback[0].outcome"),
        ({"outcome": "accepted"}, "feedback[0].acceptedSuggestions"),
        ({"outcome": "overridden", "overrideReason": {}}, "feedback[0].overrideReason"),
        (
            {"outcome": "overridden", "overrideReason": {"reason": {"code": "x"}}},
            "feedback[0].overrideReason.reason.system",
        ),
        ({"outcomeTimestamp": "yesterday"}, "feedback[0].outcomeTimestamp"),
        ({"card": ""}, "feedback[0].card"),
        ({"outcome": "accepted", "acceptedSuggestions": []}, "feedback[0].acceptedSuggestions"),
    ],
)
def test_f4_bad_items_are_400_naming_the_field(
    client: FlaskClient, item: dict[str, Any], expression: str
) -> None:
    entry = {
        "card": "4f0a6c5e-8a9b-4c3d-9e2f-1a2b3c4d5e6f",
        "outcome": "overridden",
        "outcomeTimestamp": "2026-11-01T10:00:00Z",
        **item,
    }
    response = post(client, FEEDBACK, {"feedback": [entry]})
    assert response.status_code == 400
    assert response.get_json()["issue"][0]["expression"] == [expression]


@pytest.mark.parametrize("body", [{}, {"feedback": []}, {"feedback": {}}, []])
def test_f4_bad_bodies(client: FlaskClient, body: Any) -> None:
    assert post(client, FEEDBACK, body).status_code == 400


def test_f5_same_feedback_twice_is_one_record(app: Flask, client: FlaskClient) -> None:
    card = _card_for(_screen(client), A)
    body = _with_card(_examples()["overridden-with-reason"], card)
    first = post(client, FEEDBACK, body)
    second = post(client, FEEDBACK, body)
    assert first.status_code == second.status_code == 200
    assert "1 new" in first.get_json()["issue"][0]["diagnostics"]
    assert "0 new" in second.get_json()["issue"][0]["diagnostics"]
    assert len(_stored(app, card["uuid"])) == 1


def test_f6_unknown_card_is_accepted_and_logged(app: Flask, client: FlaskClient) -> None:
    unknown = "0b7c0a1e-2f4d-4a8b-9c6d-5e4f3a2b1c0d"
    body = {
        "feedback": [
            {"card": unknown, "outcome": "overridden", "outcomeTimestamp": "2026-11-01T10:00:00Z"}
        ]
    }
    assert post(client, FEEDBACK, body).status_code == 200
    (record,) = _stored(app, unknown)
    assert record.trial is None


def test_unknown_service_feedback_is_404(client: FlaskClient) -> None:
    assert post(client, "/cds-services/nope/feedback", {"feedback": []}).status_code == 404


@pytest.mark.parametrize("reason", ["already-screened", "patient-declined"])
def test_f8_suppressing_override_hides_the_trial_for_that_patient(
    client: FlaskClient, reason: str
) -> None:
    card = _card_for(_screen(client), A)
    body = {
        "feedback": [
            {
                "card": card["uuid"],
                "outcome": "overridden",
                "overrideReason": {"reason": {"system": OVERRIDE_SYSTEM, "code": reason}},
                "outcomeTimestamp": "2026-11-01T10:00:00Z",
            }
        ]
    }
    assert post(client, FEEDBACK, body).status_code == 200
    after = _screen(client)
    assert [c for c in after if A in c["summary"]] == []
    assert len(after) == 1  # the other trial is untouched
    other_patient = _screen(client, "ileal-net-a-only")
    assert [c for c in other_patient if A in c["summary"]]


def test_f8_non_suppressing_reason_keeps_the_card(client: FlaskClient) -> None:
    card = _card_for(_screen(client), A)
    body = {
        "feedback": [
            {
                "card": card["uuid"],
                "outcome": "overridden",
                "overrideReason": {"reason": {"system": OVERRIDE_SYSTEM, "code": "not-now"}},
                "outcomeTimestamp": "2026-11-01T10:00:00Z",
            }
        ]
    }
    post(client, FEEDBACK, body)
    assert len(_screen(client)) == 2
    # a suppressing code from another code system does not count
    body["feedback"][0]["overrideReason"]["reason"] = {
        "system": "urn:other",
        "code": "already-screened",
    }
    post(client, FEEDBACK, body)
    assert len(_screen(client)) == 2


def test_f8_suppression_expires(tmp_path: Path) -> None:
    client = dev_app(feedback_db=str(tmp_path / "f.sqlite3"), suppress_days=0).test_client()
    card = _card_for(_screen(client), A)
    body = {
        "feedback": [
            {
                "card": card["uuid"],
                "outcome": "overridden",
                "overrideReason": {
                    "reason": {"system": OVERRIDE_SYSTEM, "code": "already-screened"}
                },
                "outcomeTimestamp": "2026-11-01T10:00:00Z",
            }
        ]
    }
    post(client, FEEDBACK, body)
    assert len(_screen(client)) == 2


def test_feedback_survives_a_restart(tmp_path: Path) -> None:
    path = str(tmp_path / "persist.sqlite3")
    client = dev_app(feedback_db=path).test_client()
    card = _card_for(_screen(client), A)
    body = {
        "feedback": [
            {
                "card": card["uuid"],
                "outcome": "overridden",
                "overrideReason": {
                    "reason": {"system": OVERRIDE_SYSTEM, "code": "patient-declined"}
                },
                "outcomeTimestamp": "2026-11-01T10:00:00Z",
            }
        ]
    }
    post(client, FEEDBACK, body)
    restarted = dev_app(feedback_db=path).test_client()
    assert len(_screen(restarted)) == 1


def test_f7_feedback_audience_is_the_feedback_url() -> None:
    signer = Signer()
    client = secure_app(signer).test_client()
    body = {
        "feedback": [
            {
                "card": "0b7c0a1e-2f4d-4a8b-9c6d-5e4f3a2b1c0d",
                "outcome": "overridden",
                "outcomeTimestamp": "2026-11-01T10:00:00Z",
            }
        ]
    }
    ok = {"Authorization": f"Bearer {signer.token(PUBLIC + FEEDBACK)}"}
    assert post(client, FEEDBACK, body, ok).status_code == 200
    wrong = {"Authorization": f"Bearer {signer.token(PUBLIC + SERVICE)}"}
    assert post(client, FEEDBACK, body, wrong).status_code == 401
