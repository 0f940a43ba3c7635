"""Cards built from hand-made evaluations (R3-R9, R11) and from real fixtures (R10)."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest
from flask.testing import FlaskClient

from cds.criteria.model import CriterionResult, Result, TrialEvaluation
from cds.hooks.cards import (
    OVERRIDE_SYSTEM,
    BrokenCriterion,
    CardContext,
    TrialInfo,
    md,
    order_warning_card,
    screening_card,
)
from tests.hooks_data.support import (
    PV,
    A,
    B,
    check_cards,
    dev_app,
    fixture_resources,
    full_prefetch,
    hook_body,
    post,
    without_uuids,
)

INFO = TrialInfo(
    id=A,
    title="CapTem and Y90 radioembolization for grade 2 NET liver metastases",
    short_title="CapTem + Y90",
    url="https://clinicaltrials.gov/study/NCT04339036",
)
CTX = CardContext(
    patient_id="p1", user_id="Practitioner/doc", encounter_id="enc-1", as_of=date(2026, 11, 1)
)


def crit(
    cid: str,
    result: Result,
    label: str = "Label",
    kind: str = "inclusion",
    explanation: str = "Explained.",
    evidence: tuple[str, ...] = (),
) -> CriterionResult:
    return CriterionResult(
        id=cid,
        kind=kind,
        text=f"Protocol text of {cid}.",
        label=label,
        result=result,
        evidence=evidence,
        explanation=explanation,
    )


def evaluation(*criteria: CriterionResult, trial: str = A) -> TrialEvaluation:
    return TrialEvaluation(
        trial=trial,
        version="1.0.0",
        title=INFO.title,
        url=INFO.url,
        registry_status="RECRUITING",
        criteria=criteria,
    )


def _as_response(*cards: dict[str, Any] | None) -> dict[str, Any]:
    return {"cards": [c for c in cards if c is not None]}


def test_candidate_card_says_what_to_confirm() -> None:
    te = evaluation(
        crit(
            "age",
            Result.PASS,
            "Age > 18 years",
            explanation="Age 58 on 2026-11-01.",
            evidence=("Patient/p1",),
        ),
        crit(
            "bili",
            Result.PASS,
            "Total bilirubin ≤ 2.0 mg/dL",
            explanation="0.8 mg/dL on 2026-10-20.",
            evidence=("Observation/o1",),
        ),
        crit("consent", Result.MANUAL, "Informed consent"),
        crit("life", Result.MANUAL, "Life expectancy > 6 months"),
        crit("resect", Result.MANUAL, "Liver metastases unresectable"),
    )
    card = screening_card(te, INFO, CTX)
    assert card is not None
    check_cards(_as_response(card))
    assert card["summary"] == "Possible candidate: NCT04339036 CapTem + Y90 (3 items to confirm)"
    assert card["indicator"] == "info"
    assert card["source"]["label"] and card["source"]["url"] == INFO.url
    assert card["source"]["topic"]["code"] == "clinical-trial-screening"
    detail = card["detail"]
    assert "**Criteria met (2)**" in detail and "0.8 mg/dL on 2026-10-20." in detail
    assert "(Observation/o1)" in detail
    assert "**To confirm by the trial team (3)**" in detail and "Informed consent" in detail
    assert "Unknown" not in detail


def test_needs_review_card_lists_the_unknowns_and_their_remedy() -> None:
    te = evaluation(
        crit("age", Result.PASS),
        crit(
            "bili",
            Result.UNKNOWN,
            "Total bilirubin",
            explanation="No total bilirubin within 30 days; a result on or after 2026-10-02 "
            "would resolve this.",
        ),
        crit("consent", Result.MANUAL, "Informed consent"),
    )
    card = screening_card(te, INFO, CTX)
    assert card is not None
    assert card["summary"] == (
        "Possible candidate: NCT04339036 CapTem + Y90 (1 unknown, 1 to confirm)"
    )
    assert "**Unknown: data that would resolve them (1)**" in card["detail"]
    assert "would resolve this" in card["detail"]


def test_excluded_trial_gets_no_card() -> None:
    te = evaluation(crit("age", Result.PASS), crit("tace", Result.FAIL, kind="exclusion"))
    assert screening_card(te, INFO, CTX) is None


def test_suggestion_creates_a_referral_service_request() -> None:
    card = screening_card(evaluation(crit("age", Result.PASS)), INFO, CTX)
    assert card is not None
    assert card["selectionBehavior"] == "at-most-one"
    (suggestion,) = card["suggestions"]
    assert suggestion["label"] == "Refer to the trial team"
    (action,) = suggestion["actions"]
    assert action["type"] == "create" and action["description"]
    resource = action["resource"]
    assert resource["resourceType"] == "ServiceRequest"
    assert resource["subject"] == {"reference": "Patient/p1"}
    assert resource["encounter"] == {"reference": "Encounter/enc-1"}
    assert resource["requester"] == {"reference": "Practitioner/doc"}
    assert resource["status"] == "draft"


def test_override_reasons_and_link() -> None:
    card = screening_card(evaluation(crit("age", Result.PASS)), INFO, CTX)
    assert card is not None
    reasons = {r["code"]: r for r in card["overrideReasons"]}
    assert set(reasons) == {"already-screened", "patient-declined", "not-eligible", "not-now"}
    assert all(r["display"] and r["system"] == OVERRIDE_SYSTEM for r in reasons.values())
    (link,) = card["links"]
    assert link == {
        "label": "NCT04339036 on ClinicalTrials.gov",
        "type": "absolute",
        "url": "https://clinicaltrials.gov/study/NCT04339036",
    }


def test_non_https_registry_url_falls_back_to_clinicaltrials_gov() -> None:
    info = TrialInfo(id=A, title="t", short_title="s", url="http://example.org/x")
    card = screening_card(evaluation(crit("age", Result.PASS)), info, CTX)
    assert card is not None
    assert card["links"][0]["url"] == "https://clinicaltrials.gov/study/NCT04339036"


def test_r4_long_titles_keep_the_summary_under_140() -> None:
    info = TrialInfo(
        id=A, title="x" * 300, short_title="A very long short title " * 10, url=INFO.url
    )
    te = evaluation(
        *(crit(f"u{i}", Result.UNKNOWN) for i in range(12)),
        *(crit(f"m{i}", Result.MANUAL) for i in range(15)),
    )
    card = screening_card(te, info, CTX)
    assert card is not None
    assert len(card["summary"]) < 140
    assert card["summary"].startswith("Possible candidate: NCT04339036 A very long")
    assert card["summary"].endswith("(12 unknown, 15 to confirm)")


def test_r9_markdown_from_data_cannot_inject_html_or_links() -> None:
    te = evaluation(
        crit(
            "x",
            Result.PASS,
            label="<script>alert(1)</script>",
            explanation="[click](javascript:alert(1)) *bold* | pipe",
        )
    )
    card = screening_card(te, INFO, CTX)
    assert card is not None
    assert "<script" not in card["detail"]
    assert "[click]" not in card["detail"] and r"\[click\]" in card["detail"]
    assert md("a_b*c") == r"a\_b\*c"


def test_r3_uuids_are_fresh_r11_content_is_stable() -> None:
    te = evaluation(crit("age", Result.PASS), crit("c", Result.MANUAL))
    one, two = screening_card(te, INFO, CTX), screening_card(te, INFO, CTX)
    assert one is not None and two is not None
    assert one["uuid"] != two["uuid"]
    assert one["suggestions"][0]["uuid"] != two["suggestions"][0]["uuid"]
    assert without_uuids({"cards": [one]}) == without_uuids({"cards": [two]})


def test_order_warning_card_names_trial_criterion_and_status() -> None:
    tace = crit("exc-tace", Result.PASS, "Prior TACE/TAE or Y90", kind="exclusion")
    te = evaluation(crit("age", Result.PASS), tace, crit("bili", Result.UNKNOWN))
    card = order_warning_card(
        te, INFO, [BrokenCriterion(tace, "Yttrium-90 radioembolization", "ServiceRequest/s1")], CTX
    )
    assert card is not None
    check_cards(_as_response(card))
    assert card["indicator"] == "warning"
    assert "NCT04339036" in card["summary"] and "Prior TACE/TAE or Y90" in card["summary"]
    assert "**needs-review**" in card["detail"]
    assert "Yttrium-90 radioembolization" in card["detail"]
    assert order_warning_card(te, INFO, [], CTX) is None


# -- from the shipped trials and fixtures (R10, R11) -------------------------------------------


@pytest.fixture(scope="module")
def client() -> FlaskClient:
    return dev_app().test_client()


def _cards(client: FlaskClient, fixture: str, patient: str | None = None) -> list[dict[str, Any]]:
    pid = patient or fixture.removesuffix(".json")
    body = hook_body(patient_id=pid, prefetch=full_prefetch(fixture_resources(fixture), pid))
    response = post(client, f"/cds-services/{PV}", body)
    assert response.status_code == 200, response.get_json()
    cards: list[dict[str, Any]] = response.get_json()["cards"]
    return cards


def _trials(cards: list[dict[str, Any]]) -> list[str]:
    return sorted(c["summary"].split(": ", 1)[1].split(" ", 1)[0] for c in cards)


@pytest.mark.parametrize(
    ("fixture", "trials"),
    [
        ("both-candidate.json", [A, B]),
        ("ileal-net-a-only.json", [A]),  # metastatic small-bowel NET: the CapTem + Y90 trial
        ("grade-1-b-only.json", [B]),  # resectable-type pancreatic NET G1: the PRRT trial
        ("non-net.json", []),
        ("prior-tace.json", []),
        ("grade-unrecorded.json", [A, B]),  # missing key data: needs review, not 412
    ],
)
def test_r10_fixture_patients(client: FlaskClient, fixture: str, trials: list[str]) -> None:
    cards = _cards(client, fixture)
    assert _trials(cards) == trials
    if fixture == "grade-unrecorded.json":
        assert all("unknown" in c["summary"] for c in cards)


def test_r11_same_input_same_content(client: FlaskClient) -> None:
    one = _cards(client, "both-candidate.json")
    two = _cards(client, "both-candidate.json")
    assert without_uuids({"cards": one}) == without_uuids({"cards": two})
    assert {c["uuid"] for c in one}.isdisjoint({c["uuid"] for c in two})
