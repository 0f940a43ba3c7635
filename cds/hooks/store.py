"""The embedded SQLite store: issued cards, feedback, card suppression and seen JWT ids."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["FeedbackRecord", "IssuedCard", "Store"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS issued_card (
    uuid TEXT PRIMARY KEY,
    service TEXT NOT NULL,
    hook TEXT NOT NULL,
    hook_instance TEXT NOT NULL,
    scope TEXT NOT NULL,
    patient TEXT NOT NULL,
    trial TEXT NOT NULL,
    issued_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS feedback (
    key TEXT PRIMARY KEY,
    service TEXT NOT NULL,
    card TEXT NOT NULL,
    outcome TEXT NOT NULL,
    outcome_timestamp TEXT NOT NULL,
    accepted_suggestions TEXT,
    reason_system TEXT,
    reason_code TEXT,
    user_comment TEXT,
    trial TEXT,
    scope TEXT,
    patient TEXT,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_card ON feedback (card);
CREATE TABLE IF NOT EXISTS suppression (
    scope TEXT NOT NULL,
    patient TEXT NOT NULL,
    trial TEXT NOT NULL,
    reason_code TEXT NOT NULL,
    until REAL NOT NULL,
    PRIMARY KEY (scope, patient, trial, reason_code)
);
CREATE TABLE IF NOT EXISTS seen_jti (
    iss TEXT NOT NULL,
    jti TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (iss, jti)
);
"""

_PURGE_EVERY = 512


@dataclass(frozen=True, slots=True)
class IssuedCard:
    """What a card uuid stood for when we issued it: feedback names only the uuid."""

    uuid: str
    service: str
    hook: str
    hook_instance: str
    scope: str  # the client's namespace of patient ids: "iss|tenant|fhirServer"
    patient: str
    trial: str


@dataclass(frozen=True, slots=True)
class FeedbackRecord:
    """One stored feedback item, joined to the card it was about when we know it."""

    service: str
    card: str
    outcome: str
    outcome_timestamp: str
    accepted_suggestions: tuple[str, ...]
    reason_system: str | None
    reason_code: str | None
    user_comment: str | None
    trial: str | None
    patient: str | None


class Store:
    """A small SQLite database shared by threads (one lock) and processes (WAL).

    :param path: a file path, or ``":memory:"`` for a private in-process database
    """

    def __init__(self, path: str) -> None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, check_same_thread=False, timeout=10.0)
        self._conn.execute("PRAGMA busy_timeout = 10000")
        if path != ":memory:":
            self._retry_locked(lambda: self._conn.execute("PRAGMA journal_mode = WAL"))
            self._conn.execute("PRAGMA synchronous = NORMAL")

        def create() -> None:
            with self._conn:
                self._conn.executescript(_SCHEMA)

        self._retry_locked(create)
        self._writes = 0

    @staticmethod
    def _retry_locked(step: Callable[[], object], seconds: float = 10.0) -> None:
        """Run a start-up step that SQLite may refuse with "database is locked" while another
        process (the other gunicorn worker, starting at the same moment) runs its own: the
        switch to WAL does not wait on the busy timeout."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                step()
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- JWT replay -------------------------------------------------------------------------

    def remember_jti(self, iss: str, jti: str, expires_at: float) -> bool:
        """Record a token id; False when it was already seen and has not expired (a replay).

        One statement, atomic in SQLite across threads and processes (gunicorn workers share
        the file): the insert fails on the (iss, jti) key unless the row there has expired,
        in which case it is taken over. A SELECT-then-INSERT let two workers both see
        "unseen" and both accept the token.
        """
        now = time.time()
        with self._lock, self._conn:
            self._maybe_purge(now)
            cursor = self._conn.execute(
                "INSERT INTO seen_jti (iss, jti, expires_at) VALUES (?, ?, ?)"
                " ON CONFLICT (iss, jti) DO UPDATE SET expires_at = excluded.expires_at"
                " WHERE seen_jti.expires_at < ?",
                (iss, jti, expires_at, now),
            )
            return cursor.rowcount == 1

    def _maybe_purge(self, now: float) -> None:
        self._writes += 1
        if self._writes % _PURGE_EVERY == 1:
            self._conn.execute("DELETE FROM seen_jti WHERE expires_at < ?", (now,))
            self._conn.execute("DELETE FROM suppression WHERE until < ?", (now,))

    # -- cards and feedback -----------------------------------------------------------------

    def record_cards(self, cards: Iterable[IssuedCard]) -> None:
        rows = [
            (c.uuid, c.service, c.hook, c.hook_instance, c.scope, c.patient, c.trial, time.time())
            for c in cards
        ]
        if not rows:
            return
        with self._lock, self._conn:
            self._conn.executemany(
                "INSERT OR IGNORE INTO issued_card VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows
            )

    def issued_card(self, uuid: str) -> IssuedCard | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT uuid, service, hook, hook_instance, scope, patient, trial"
                " FROM issued_card WHERE uuid = ?",
                (uuid,),
            ).fetchone()
        return IssuedCard(*row) if row else None

    def record_feedback(
        self,
        service: str,
        item: dict[str, Any],
        card: IssuedCard | None,
        *,
        suppress: Sequence[str] = (),
        suppress_days: int = 0,
    ) -> bool:
        """Store one feedback item; False when the same item was already stored (idempotent).

        When the item overrides ``card`` with a reason whose code is in ``suppress``, that
        trial's cards are suppressed for the patient for ``suppress_days`` from now.
        """
        # 2.0: "a card may receive feedback several times": identical items are one record.
        key = hashlib.sha256(
            json.dumps([service, item], sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()
        reason = (item.get("overrideReason") or {}).get("reason") or {}
        accepted = tuple(s["id"] for s in item.get("acceptedSuggestions", ()))
        now = time.time()
        with self._lock, self._conn:
            cursor = self._conn.execute(
                "INSERT OR IGNORE INTO feedback VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key,
                    service,
                    item["card"],
                    item["outcome"],
                    item["outcomeTimestamp"],
                    json.dumps(accepted) if accepted else None,
                    reason.get("system"),
                    reason.get("code"),
                    (item.get("overrideReason") or {}).get("userComment"),
                    card.trial if card else None,
                    card.scope if card else None,
                    card.patient if card else None,
                    now,
                ),
            )
            inserted = cursor.rowcount == 1
            code = reason.get("code")
            if (
                card is not None
                and item["outcome"] == "overridden"
                and code in suppress
                and suppress_days > 0
            ):
                self._conn.execute(
                    "INSERT OR REPLACE INTO suppression VALUES (?, ?, ?, ?, ?)",
                    (card.scope, card.patient, card.trial, code, now + suppress_days * 86400.0),
                )
        return inserted

    def feedback_for_card(self, card: str) -> list[FeedbackRecord]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT service, card, outcome, outcome_timestamp, accepted_suggestions,"
                " reason_system, reason_code, user_comment, trial, patient"
                " FROM feedback WHERE card = ? ORDER BY received_at",
                (card,),
            ).fetchall()
        return [
            FeedbackRecord(
                service=r[0],
                card=r[1],
                outcome=r[2],
                outcome_timestamp=r[3],
                accepted_suggestions=tuple(json.loads(r[4])) if r[4] else (),
                reason_system=r[5],
                reason_code=r[6],
                user_comment=r[7],
                trial=r[8],
                patient=r[9],
            )
            for r in rows
        ]

    def suppressed(self, scope: str, patient: str) -> dict[str, set[str]]:
        """Trials whose cards are suppressed for this patient now: trial -> reason codes."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT trial, reason_code FROM suppression"
                " WHERE scope = ? AND patient = ? AND until >= ?",
                (scope, patient, time.time()),
            ).fetchall()
        out: dict[str, set[str]] = {}
        for trial, code in rows:
            out.setdefault(trial, set()).add(code)
        return out
