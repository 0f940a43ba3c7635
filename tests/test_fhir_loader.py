"""Preparing fixture bundles for loading: stable ids, rewritten references, tags, clear refusals."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from cds.errors import InputError
from cds.fhir.loader import DEFAULT_TAG, parse_tag, prepare_entries, transaction_bundle

PATIENT_URN = "urn:uuid:3f1c7d0e-8a55-4c43-9a71-0f5a1a2b3c4d"


def bundle(*entries: dict[str, Any], kind: str = "collection") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def test_urn_uuid_references_become_type_id_and_ids_come_from_fullurls() -> None:
    source = bundle(
        {"fullUrl": PATIENT_URN, "resource": {"resourceType": "Patient"}},
        {
            "fullUrl": "http://example.org/fhir/Condition/c1",
            "resource": {"resourceType": "Condition", "subject": {"reference": PATIENT_URN}},
        },
        {
            "resource": {
                "resourceType": "Observation",
                "id": "o1",
                "subject": {"reference": PATIENT_URN},
                "hasMember": [{"reference": "http://example.org/fhir/Condition/c1"}],
            }
        },
    )
    original = copy.deepcopy(source)
    prepared = prepare_entries(source, file="f.json", tag=DEFAULT_TAG)
    patient_id = PATIENT_URN.removeprefix("urn:uuid:")
    assert [e.reference for e in prepared] == [
        f"Patient/{patient_id}",
        "Condition/c1",
        "Observation/o1",
    ]
    assert prepared[1].resource["subject"]["reference"] == f"Patient/{patient_id}"
    assert prepared[2].resource["hasMember"][0]["reference"] == "Condition/c1"
    assert source == original  # the caller's bundle is not changed

    tx = transaction_bundle(prepared)
    assert tx["type"] == "transaction"
    assert [e["request"] for e in tx["entry"]][1] == {"method": "PUT", "url": "Condition/c1"}


def test_every_resource_is_tagged_once() -> None:
    tagged = {
        "resourceType": "Patient",
        "id": "p1",
        "meta": {"tag": [{"system": DEFAULT_TAG[0], "code": DEFAULT_TAG[1]}]},
    }
    [entry] = prepare_entries(bundle({"resource": tagged}), file="f", tag=DEFAULT_TAG)
    assert entry.resource["meta"]["tag"] == [{"system": DEFAULT_TAG[0], "code": DEFAULT_TAG[1]}]
    [entry] = prepare_entries(bundle({"resource": tagged}), file="f", tag=("urn:t", "run-1"))
    assert {"system": "urn:t", "code": "run-1"} in entry.resource["meta"]["tag"]


def test_entries_without_a_resource_are_skipped_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    entries = [
        {"resource": {"id": "x"}},
        {"fullUrl": "urn:uuid:00000000-0000-4000-8000-000000000001"},
        {"resource": {"resourceType": "Patient", "id": "p1"}},
    ]
    prepared = prepare_entries(bundle(*entries), file="dir/x.json", tag=DEFAULT_TAG)
    assert [e.reference for e in prepared] == ["Patient/p1"]
    skipped = [r.getMessage() for r in caplog.records if "has no resource" in r.getMessage()]
    assert skipped == [
        "dir/x.json: entry 0: has no resource with a resourceType; skipped",
        "dir/x.json: entry 1: has no resource with a resourceType; skipped",
    ]


def test_a_message_bundle_is_unwrapped() -> None:
    inner = bundle({"resource": {"resourceType": "Patient", "id": "p1"}})
    outer = bundle({"resource": {"resourceType": "MessageHeader", "id": "h1"}}, {"resource": inner})
    prepared = prepare_entries(outer, file="m.json", tag=DEFAULT_TAG)
    assert [e.reference for e in prepared] == ["MessageHeader/h1", "Patient/p1"]


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([{"resource": {"resourceType": "Patient"}}], "entry 0: Patient has no usable id"),
        (
            [
                {"resource": {"resourceType": "Patient", "id": "p1"}},
                {"resource": {"resourceType": "Patient", "id": "p1"}},
            ],
            "entry 1: Patient/p1 is also",
        ),
        (
            [
                {
                    "resource": {
                        "resourceType": "Observation",
                        "id": "o",
                        "subject": {"reference": "urn:uuid:nowhere"},
                    }
                }
            ],
            "matches no fullUrl",
        ),
        (
            [
                {
                    "resource": {"resourceType": "Patient", "id": "p1"},
                    "request": {"method": "DELETE", "url": "Patient/p1"},
                }
            ],
            "DELETE cannot be loaded",
        ),
    ],
)
def test_unusable_entries_are_refused_naming_file_and_entry(entries, message) -> None:
    with pytest.raises(InputError, match=message) as caught:
        prepare_entries(bundle(*entries), file="dir/x.json", tag=DEFAULT_TAG)
    assert str(caught.value).startswith("dir/x.json: entry")


def test_not_a_bundle() -> None:
    with pytest.raises(InputError, match="x.json: not a FHIR Bundle"):
        prepare_entries({"resourceType": "Patient"}, file="x.json", tag=DEFAULT_TAG)


def test_outcome_entries_are_skipped() -> None:
    source = bundle(
        {
            "resource": {"resourceType": "OperationOutcome", "issue": []},
            "search": {"mode": "outcome"},
        }
    )
    assert prepare_entries(source, file="f", tag=DEFAULT_TAG) == []


def test_parse_tag() -> None:
    assert parse_tag("urn:x|run-7") == ("urn:x", "run-7")
    assert parse_tag("only-code") == (DEFAULT_TAG[0], "only-code")
    for bad in ("|code", "urn:x|", ""):
        with pytest.raises(InputError):
            parse_tag(bad)
