"""CORS with an origin allowlist: browser CDS clients (the sandbox) preflight every call."""

from __future__ import annotations

from flask import Flask, Response, request

__all__ = ["ALLOWED_HEADERS", "ALLOWED_METHODS", "install_cors"]

# The sandbox sends Authorization on every call, so every call is preflighted; allowing the
# origin alone fails with "Request header field authorization is not allowed".
ALLOWED_HEADERS = "Authorization, Content-Type"
ALLOWED_METHODS = "GET, POST, OPTIONS"
_MAX_AGE = "600"


def install_cors(app: Flask, origins: tuple[str, ...]) -> None:
    """Answer preflights before auth and routing; add CORS headers to allowed origins only.

    2.0 'Cross-Origin Resource Sharing': "CDS Services and browser-based CDS Clients will
    require CORS support". ``"*"`` (development only, checked in config) allows any origin.
    """
    allow_any = "*" in origins
    allowed = frozenset(o.rstrip("/").lower() for o in origins if o != "*")

    def origin_allowed(origin: str) -> bool:
        return allow_any or origin.rstrip("/").lower() in allowed

    @app.before_request
    def _preflight() -> Response | None:
        if request.method != "OPTIONS":
            return None
        response = Response(status=204)
        origin = request.headers.get("Origin")
        if origin and origin_allowed(origin):
            response.headers["Access-Control-Allow-Methods"] = ALLOWED_METHODS
            response.headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
            response.headers["Access-Control-Max-Age"] = _MAX_AGE
        response.headers["Allow"] = ALLOWED_METHODS
        return response

    @app.after_request
    def _cors_headers(response: Response) -> Response:
        origin = request.headers.get("Origin")
        response.vary.add("Origin")
        if origin and origin_allowed(origin):
            # Echo the one origin (never "*" with credentials-bearing requests).
            response.headers["Access-Control-Allow-Origin"] = origin
        return response
