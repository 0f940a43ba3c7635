"""One structured log line per call: what was asked, what was used, what was answered, how fast."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CallLog", "log"]

log = logging.getLogger("cds.hooks.calls")

_MAX_TEXT = 128


def _clip(value: str | None) -> str | None:
    # Caller-supplied strings (hookInstance) are clipped; json.dumps escapes them.
    return value if value is None or len(value) <= _MAX_TEXT else value[:_MAX_TEXT] + "…"


@dataclass
class CallLog:
    """The fields of the call's log line. Never a token, a JWT or patient data: ids of
    services, trials, cards and keys, counts, statuses and timings only (best practices:
    "never store, share or log access_token", "never log the JWT")."""

    method: str
    path: str
    started: float = field(default_factory=time.perf_counter)
    service: str | None = None
    hook: str | None = None
    hook_instance: str | None = None
    iss: str | None = None
    tenant: str | None = None
    jti: str | None = None
    prefetch_used: list[str] = field(default_factory=list)
    prefetch_fetched: list[str] = field(default_factory=list)
    prefetch_empty: list[str] = field(default_factory=list)
    prefetch_incomplete: list[str] = field(default_factory=list)
    fhir_calls: int = 0
    timed_out: bool = False
    cards: list[str] = field(default_factory=list)
    trial_statuses: dict[str, str] = field(default_factory=dict)
    suppressed: list[str] = field(default_factory=list)
    rules_version: dict[str, str] = field(default_factory=dict)
    feedback_items: int | None = None
    note: str | None = None

    def emit(self, status: int) -> None:
        line: dict[str, Any] = {
            "event": "cds-call",
            "method": self.method,
            "path": self.path,
            "status": status,
            "latency_ms": round((time.perf_counter() - self.started) * 1000, 1),
        }
        optional: dict[str, Any] = {
            "service": self.service,
            "hook": self.hook,
            "hookInstance": _clip(self.hook_instance),
            "iss": self.iss,
            "tenant": self.tenant,
            "jti": _clip(self.jti),
            "prefetch_used": self.prefetch_used,
            "prefetch_fetched": self.prefetch_fetched,
            "prefetch_empty": self.prefetch_empty,
            "prefetch_incomplete": self.prefetch_incomplete,
            "fhir_calls": self.fhir_calls or None,
            "timed_out": self.timed_out or None,
            "card_count": len(self.cards) if self.hook else None,
            "card_uuids": self.cards,
            "trials": self.trial_statuses,
            "suppressed": self.suppressed,
            "rules_version": self.rules_version,
            "feedback_items": self.feedback_items,
            "note": self.note,
        }
        line.update({k: v for k, v in optional.items() if v not in (None, [], {})})
        log.info(json.dumps(line, ensure_ascii=True, separators=(",", ":")))
