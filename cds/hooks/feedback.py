"""Blueprint for feedback (POST /cds-services/{id}/feedback): validated, idempotent, stored."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, g
from werkzeug.exceptions import NotFound

from cds.hooks.calllog import CallLog
from cds.hooks.cards import OVERRIDE_SYSTEM, SUPPRESSING_REASONS
from cds.hooks.outcome import json_response, operation_outcome
from cds.hooks.services import read_json_body
from cds.hooks.state import state
from cds.hooks.validation import validate_feedback

__all__ = ["blueprint"]

log = logging.getLogger("cds.hooks.feedback")

blueprint = Blueprint("cds_feedback", __name__)


@blueprint.post("/cds-services/<service_id>/feedback")
def feedback(service_id: str) -> Response:
    """2.0 'Feedback': items ``accepted`` (with acceptedSuggestions) or ``overridden`` (with an
    optional overrideReason). "A card may receive feedback several times": storing is
    idempotent, so a repeated item answers 200 and stays one record."""
    st = state()
    call_log: CallLog = g.call_log
    call_log.service = service_id
    if service_id not in st.registry.ids():
        raise NotFound(f"no CDS service {service_id!r}")
    body = read_json_body()
    validate_feedback(body)
    if not isinstance(body, dict):  # validate_feedback has refused anything else
        raise TypeError("feedback body is not an object")
    items = body["feedback"]
    stored = 0
    unknown = 0
    for item in items:
        card = st.store.issued_card(item["card"])
        if card is None or card.service != service_id:
            # Spec silent on unknown cards; policy: accept (200), store, log the uuid only.
            unknown += 1
            card = None
        reason = (item.get("overrideReason") or {}).get("reason") or {}
        # Reasons are keyed by code and system, never display (the sandbox sends no display).
        ours = reason.get("system") == OVERRIDE_SYSTEM
        if st.store.record_feedback(
            service_id,
            item,
            card,
            suppress=SUPPRESSING_REASONS if ours else (),
            suppress_days=st.settings.suppress_days,
        ):
            stored += 1
    call_log.feedback_items = len(items)
    if unknown:
        call_log.note = f"{unknown} feedback item(s) for cards this service did not issue"
    message = f"{len(items)} feedback item(s) received, {stored} new"
    return json_response(operation_outcome(200, message, severity="information"))
