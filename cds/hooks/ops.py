"""Blueprint for operations: GET /healthz, open without client authentication."""

from __future__ import annotations

from flask import Blueprint, Response

from cds.hooks.outcome import json_response

__all__ = ["blueprint"]

blueprint = Blueprint("cds_ops", __name__)


@blueprint.get("/healthz")
def healthz() -> Response:
    return json_response({"status": "ok"})
