"""FHIR OperationOutcome bodies for every non-2xx answer, and the app's error handlers."""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import Flask, Response, g
from werkzeug.exceptions import HTTPException

from cds.errors import ClientAuthError, HookRequestError, InputError, PrefetchUnavailable

log = logging.getLogger("cds.hooks")

# FHIR R4 issue-type codes (http://hl7.org/fhir/issue-type) per HTTP status.
_ISSUE_CODE = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    412: "incomplete",
    413: "too-costly",
    414: "too-long",
    431: "too-long",
    415: "not-supported",
    500: "exception",
}


def operation_outcome(
    status: int,
    diagnostics: str | None,
    *,
    expression: str | None = None,
    severity: str = "error",
) -> dict[str, Any]:
    """One-issue OperationOutcome. Diagnostics name the problem, never a value sent to us."""
    code = "informational" if severity == "information" else _ISSUE_CODE.get(status, "processing")
    issue: dict[str, Any] = {"severity": severity, "code": code}
    if diagnostics:
        issue["diagnostics"] = diagnostics
    if expression:
        issue["expression"] = [expression]
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def json_response(body: Any, status: int = 200) -> Response:
    """A JSON answer (``application/json``), compact: EHRs parse it, people read the logs."""
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    return Response(text, status=status, mimetype="application/json")


def outcome_response(
    status: int, diagnostics: str | None, *, expression: str | None = None
) -> Response:
    return json_response(operation_outcome(status, diagnostics, expression=expression), status)


def unauthorized() -> Response:
    """401 "without any additional information" (CDS Hooks best practices): the reason is logged."""
    response = outcome_response(401, None)
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


def register_error_handlers(app: Flask) -> None:
    """Map the error tree and HTTP errors to OperationOutcome bodies: never HTML, never a trace."""

    @app.errorhandler(HookRequestError)
    def _bad_hook_request(exc: HookRequestError) -> Response:
        # 3.0 (STU): non-2xx responses SHOULD carry an OperationOutcome naming the problem.
        return outcome_response(400, str(exc), expression=exc.field)

    @app.errorhandler(InputError)
    def _bad_input(exc: InputError) -> Response:
        return outcome_response(400, str(exc), expression=exc.source)

    @app.errorhandler(ClientAuthError)
    def _unauthorized(exc: ClientAuthError) -> Response:
        # iss/jti/tenant may be logged; the token never is (ClientAuthError messages hold none).
        log.info("client authentication failed: %s", exc)
        return unauthorized()

    @app.errorhandler(PrefetchUnavailable)
    def _precondition_failed(exc: PrefetchUnavailable) -> Response:
        # 2.0: "the CDS Service MUST respond with an HTTP 412 Precondition Failed status code"
        return outcome_response(412, str(exc))

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        response = outcome_response(status, exc.name)
        if status == 405 and exc.valid_methods is not None:  # type: ignore[attr-defined]
            response.headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        # A bug: the cause goes to the log with its traceback, the caller gets no detail.
        log.error("unexpected error", exc_info=exc)
        call_log = g.get("call_log")
        if call_log is not None:
            call_log.note = f"internal error: {type(exc).__name__}"
        return outcome_response(500, "internal error")
