"""Blueprint for discovery (GET /cds-services) and hook calls (POST /cds-services/{id})."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, g, request
from werkzeug.exceptions import NotFound, UnsupportedMediaType

from cds.errors import HookRequestError
from cds.hooks.auth import ClientIdentity
from cds.hooks.calllog import CallLog
from cds.hooks.outcome import json_response
from cds.hooks.screening import HookCall
from cds.hooks.smart import launch_url
from cds.hooks.state import state
from cds.hooks.validation import parse_json_body, validate_context, validate_request

__all__ = ["blueprint", "read_json_body"]

log = logging.getLogger("cds.hooks")

blueprint = Blueprint("cds_services", __name__)


@blueprint.get("/cds-services")
def discovery() -> Response:
    # 2.0 Discovery: "GET {baseUrl}/cds-services" SHALL always be available.
    return json_response(state().registry.discovery())


def read_json_body() -> object:
    """The body as JSON: ``application/json`` (any charset parameter) or ``+json``."""
    mimetype = request.mimetype
    if mimetype and mimetype != "application/json" and not mimetype.endswith("+json"):
        raise UnsupportedMediaType("the request body must be application/json")
    return parse_json_body(request.get_data(cache=False))


@blueprint.post("/cds-services/<service_id>")
def invoke(service_id: str) -> Response:
    st = state()
    call_log: CallLog = g.call_log
    call_log.service = service_id
    if service_id not in st.registry.ids():
        raise NotFound(f"no CDS service {service_id!r}")
    body = read_json_body()
    if not isinstance(body, dict):
        raise HookRequestError("the request body must be a JSON object")
    validate_request(body)
    call_log.hook = str(body["hook"])
    call_log.hook_instance = str(body["hookInstance"])
    service = st.registry.route(service_id, body["hook"])
    validate_context(service.hook, body["context"])
    if not isinstance(body.get("prefetch", {}), dict):
        raise HookRequestError("must be an object", field="prefetch")
    identity: ClientIdentity = g.identity
    call = HookCall(
        service=service,
        body=body,
        identity=identity,
        state=st,
        log=call_log,
        deadline=g.started_monotonic + st.settings.time_budget_s,
        launch_url=launch_url(st.settings),
    )
    # No catch-all here: an unexpected error is a logged 500 OperationOutcome (outcome.py),
    # never "{"cards": []}", which an EHR shows as "nothing to say" about the patient.
    cards = service.handler(call)
    # 2.0: "{"cards": []}" when there is no guidance: the one allowed empty array.
    return json_response({"cards": cards})
