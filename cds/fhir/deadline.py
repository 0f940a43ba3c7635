"""A total deadline for HTTP exchanges, whatever the server does.

requests' read timeout applies to each socket read, so a server that trickles a byte every few
seconds is never timed out. Here one watchdog thread per process holds every exchange's
deadline; when one passes, it shuts the exchange's socket down (``shutdown(SHUT_RDWR)`` wakes
a blocked ``recv`` at once), and the exchange ends in an error its caller reports as a timeout.
The same switch lets a client abort what it has in flight (``FhirClient.close``), so abandoned
fetches end instead of piling up in a worker.

The socket is found through urllib3: the connection classes mounted by :func:`mount` note
themselves in the calling thread's current :class:`Watch` when a request starts on them.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import requests
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

__all__ = ["Watch", "mount", "watching"]


class Watch:
    """One exchange under a deadline (``time.monotonic()``)."""

    __slots__ = ("_lock", "conn", "deadline", "expired", "finished")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.conn: HTTPConnection | None = None
        self.expired = False
        self.finished = False
        self._lock = threading.Lock()

    def attach(self, conn: HTTPConnection) -> None:
        with self._lock:
            self.conn = conn
            cut = self.expired
        if cut:
            _shutdown(conn)

    def cut(self) -> None:
        """End the exchange now: its socket is shut down (a blocked read returns at once)."""
        with self._lock:
            if self.finished:
                return
            self.expired = True
            conn = self.conn
        if conn is not None:
            _shutdown(conn)

    def finish(self) -> None:
        with self._lock:
            self.finished = True


def _shutdown(conn: HTTPConnection) -> None:
    sock = getattr(conn, "sock", None)
    if sock is None:
        return
    with contextlib.suppress(OSError):  # already closed
        sock.shutdown(socket.SHUT_RDWR)


class _Watchdog:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Watch]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="fhir-deadline", daemon=True)
        self._thread.start()

    def add(self, watch: Watch) -> None:
        with self._cond:
            heapq.heappush(self._heap, (watch.deadline, next(self._seq), watch))
            if self._heap[0][2] is watch:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                deadline, _, watch = self._heap[0]
                if watch.finished:
                    heapq.heappop(self._heap)
                    continue
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
            watch.cut()


_DOGS: dict[int, _Watchdog] = {}
_DOGS_LOCK = threading.Lock()
_CURRENT = threading.local()


def _watchdog() -> _Watchdog:
    # Keyed by pid: a thread does not survive a fork (gunicorn workers, sweep workers).
    pid = os.getpid()
    with _DOGS_LOCK:
        dog = _DOGS.get(pid)
        if dog is None:
            dog = _DOGS[pid] = _Watchdog()
        return dog


@contextmanager
def watching(deadline: float) -> Iterator[Watch]:
    """Run the requests made in this block by this thread under ``deadline``."""
    watch = Watch(deadline)
    previous = getattr(_CURRENT, "watch", None)
    _CURRENT.watch = watch
    _watchdog().add(watch)
    try:
        yield watch
    finally:
        watch.finish()
        _CURRENT.watch = previous


def _note(conn: HTTPConnection) -> None:
    watch: Watch | None = getattr(_CURRENT, "watch", None)
    if watch is not None:
        watch.attach(conn)


class _Conn(HTTPConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        _note(self)
        super().request(*args, **kwargs)


class _ConnS(HTTPSConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        _note(self)
        super().request(*args, **kwargs)


class _Pool(HTTPConnectionPool):
    ConnectionCls = _Conn


class _PoolS(HTTPSConnectionPool):
    ConnectionCls = _ConnS


def mount(session: requests.Session, adapter: requests.adapters.HTTPAdapter) -> None:
    """Mount ``adapter`` for http and https with connections that deadlines can cut."""
    adapter.poolmanager.pool_classes_by_scheme = {"http": _Pool, "https": _PoolS}
    session.mount("https://", adapter)
    session.mount("http://", adapter)
