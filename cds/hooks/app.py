"""The Flask app factory: configuration in, a CDS Hooks 2.0 service out (gunicorn: create_app())."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, g, request

from cds.config import Settings, load_config
from cds.criteria import TrialSet, load_trials
from cds.criteria.reads import REFERENCED_TYPES
from cds.errors import InputError
from cds.fhir.queries import build_patient_queries, prefetch_templates
from cds.hooks import feedback, ops, services, smart
from cds.hooks.auth import Authenticator, ClientIdentity
from cds.hooks.calllog import CallLog
from cds.hooks.cards import trial_infos
from cds.hooks.cors import install_cors
from cds.hooks.outcome import register_error_handlers
from cds.hooks.registry import Service, ServiceRegistry
from cds.hooks.screening import order_check, patient_view
from cds.hooks.state import EXTENSION, HooksState
from cds.hooks.store import Store

__all__ = ["ORDER_CHECK_IDS", "PATIENT_VIEW_ID", "build_registry", "create_app"]

log = logging.getLogger("cds.hooks")

PATIENT_VIEW_ID = "trial-screening"
# One service per hook: a service URL then means one hook, whatever the EHR's registration
# model (CDS Hooks 2.0: a service is "available at {baseUrl}/cds-services/{id}").
ORDER_CHECK_IDS = {"order-select": "trial-order-select", "order-sign": "trial-order-sign"}
#: endpoints open without client authentication
_OPEN_PATHS = frozenset({"/healthz"})


def _trial_list(trials: TrialSet) -> str:
    return "; ".join(f"{t.id} ({t.short_title})" for t in trials)


def build_registry(trials: TrialSet) -> ServiceRegistry:
    """The services for the enabled trials; their prefetch templates come from the trials."""
    if len(trials) == 0:
        return ServiceRegistry(())
    templates = prefetch_templates(trials)
    read = ", ".join(("Patient", *trials.types_read(), *REFERENCED_TYPES))
    usage = (
        f"Reads the patient's {read} resources, by prefetch or from"
        " fhirServer (fhirAuthorization with patient read scopes, or an open server)."
        " Absent data that cannot be fetched: 412. Data missing from the record: criteria"
        " shown as unknown. Past its time budget the service answers with what it can say."
    )
    names = _trial_list(trials)
    return ServiceRegistry(
        [
            Service(
                id=PATIENT_VIEW_ID,
                hook="patient-view",
                title="Clinical trial screening",
                description=(
                    f"Screens the patient for the clinical trials {names}: one card per trial"
                    " the patient may be a candidate for: what would settle the open items, and"
                    " a link to the screening page (a SMART app) with the evidence."
                ),
                usage_requirements=usage,
                prefetch=templates,
                handler=patient_view,
            ),
            *(
                Service(
                    id=ORDER_CHECK_IDS[hook],
                    hook=hook,
                    title="Trial eligibility check of draft orders",
                    description=(
                        f"Warns when a draft order would make the patient ineligible for one of"
                        f" the clinical trials {names} while the patient may be a candidate."
                    ),
                    usage_requirements=usage,
                    prefetch=templates,
                    handler=order_check,
                )
                for hook in ("order-select", "order-sign")
            ),
        ]
    )


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the service. ``config`` overrides ``CDS_*`` environment variables (see
    :mod:`cds.config`); every setting is validated before any file or socket is opened."""
    settings = load_config(config, env=os.environ)
    # None enables every shipped trial; an empty list enables none (discovery then empty).
    shipped = load_trials()
    trials = shipped if settings.trials is None else shipped.only(settings.trials)
    unknown_off = [t for t in settings.cards_off if t not in shipped.ids]
    if unknown_off:
        raise InputError(
            f"unknown trial {', '.join(unknown_off)} (known: {', '.join(shipped.ids)})",
            source="cards_off",
        )
    store = Store(settings.feedback_db)
    hooks_state = HooksState(
        settings=settings,
        trials=trials,
        infos=trial_infos(trials),
        queries=build_patient_queries(trials),
        registry=build_registry(trials),
        store=store,
        authenticator=Authenticator(settings, store) if settings.auth_required else None,
    )
    app = Flask("cds.hooks")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.extensions[EXTENSION] = hooks_state
    _warn_if_insecure(settings)

    install_cors(app, settings.cors_origins)  # first: preflights skip auth
    app.before_request(_authenticate)
    app.after_request(_log_call)
    app.register_blueprint(services.blueprint)
    app.register_blueprint(feedback.blueprint)
    app.register_blueprint(ops.blueprint)
    app.register_blueprint(smart.blueprint)
    register_error_handlers(app)
    return app


def _warn_if_insecure(settings: Settings) -> None:
    if settings.dev:
        log.warning(
            "DEVELOPMENT MODE: plain-http FHIR servers and jku URLs on loopback are allowed%s",
            "" if settings.auth_required else "; CDS client authentication is OFF",
        )
    if not settings.auth_required:
        log.warning("CDS client authentication is OFF: any caller can use this service")
    if "*" in settings.cors_origins:
        log.warning("CORS allows any origin ('*')")


def _audience(settings: Settings) -> str:
    """The URL this call was made to, as the client must have put it in ``aud``."""
    if settings.public_base_url:
        return settings.public_base_url.rstrip("/") + request.path
    # Development only (config requires public_base_url otherwise): the URL as received.
    return request.base_url


def _authenticate() -> None:
    from cds.hooks.state import state

    g.started_monotonic = time.monotonic()
    if request.path in _OPEN_PATHS or request.path.startswith(smart.PREFIX + "/"):
        # The screening page is a SMART app: its users sign in with the EHR's OAuth server.
        return
    g.call_log = CallLog(method=request.method, path=request.path)
    st = state()
    if st.authenticator is None:
        g.identity = ClientIdentity(iss=None)
        return
    # 2.0 'Trusting CDS Clients': every request carries "Authorization: Bearer {{JWT}}".
    identity = st.authenticator.verify(request.headers.get("Authorization"), _audience(st.settings))
    g.identity = identity
    g.call_log.iss, g.call_log.tenant, g.call_log.jti = identity.iss, identity.tenant, identity.jti


def _log_call(response: Response) -> Response:
    call_log: CallLog | None = g.pop("call_log", None)
    if call_log is not None:
        call_log.emit(response.status_code)
    return response
