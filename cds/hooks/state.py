"""Per-app state built once by the factory: settings, trials, registry, store, authenticator."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from flask import current_app

from cds.config import Settings
from cds.criteria import TrialSet
from cds.fhir.queries import PatientQuery
from cds.hooks.auth import Authenticator
from cds.hooks.cards import TrialInfo
from cds.hooks.registry import ServiceRegistry
from cds.hooks.store import Store

__all__ = ["EXTENSION", "HooksState", "state"]

EXTENSION = "cds.hooks"


@dataclass(frozen=True)
class HooksState:
    """Everything a request needs that does not change between requests."""

    settings: Settings
    trials: TrialSet
    infos: Mapping[str, TrialInfo]
    queries: tuple[PatientQuery, ...]
    registry: ServiceRegistry
    store: Store
    #: None when client authentication is off (development only)
    authenticator: Authenticator | None
    #: resource type -> (trial, criterion) pairs whose rules read it


def state() -> HooksState:
    found: HooksState = current_app.extensions[EXTENSION]
    return found
