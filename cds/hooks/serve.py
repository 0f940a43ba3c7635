"""`cds serve` and the container command: the CDS Hooks service under gunicorn.

One source for gunicorn's settings (:func:`gunicorn_settings`): ``cds serve`` passes them to
gunicorn's embedding API, and ``scripts/gunicorn-cmd`` loads them as gunicorn's config file
(``-c python:cds.hooks.gunicorn_conf``), so both run the same workers, threads, keep-alive,
logging and HTTP-level error bodies.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
from collections.abc import Callable, Mapping
from typing import Any

from flask import Flask

from cds.config import server_options

__all__ = ["gunicorn_settings", "json_write_error", "register", "serve_config"]

log = logging.getLogger("cds.hooks")


def register(subparsers: Any, fixtures_subparsers: Any) -> None:
    """Add ``cds serve`` (the CLI dispatcher calls this for every subcommand module)."""
    defaults = server_options({})
    parser = subparsers.add_parser(
        "serve",
        help="run the CDS Hooks service",
        description=(
            "Serve CDS Hooks 2.0 discovery, hook calls and feedback. Settings come from CDS_*"
            " environment variables and --config FILE (JSON or TOML); see cds/config.py."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port to bind (8080)")
    parser.add_argument("--config", metavar="FILE", help="settings file, JSON or TOML")
    parser.add_argument(
        "--dev",
        action="store_true",
        help="development mode: client authentication OFF, plain-http FHIR servers and jku on"
        " loopback allowed (a warning is logged)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=defaults["workers"],
        help=f"worker processes ({defaults['workers']})",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=defaults["threads"],
        help=f"threads per worker ({defaults['threads']})",
    )
    parser.set_defaults(func=run)


def serve_config(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration mapping ``cds serve`` passes to the app factory."""
    config: dict[str, Any] = {}
    if args.config:
        config["config_file"] = args.config
    if args.dev:
        # --dev is the one explicit switch for the insecure conveniences.
        config["dev"] = True
        config["auth_required"] = False
    return config


def gunicorn_settings(bind: str, workers: int, threads: int) -> dict[str, Any]:
    """gunicorn's settings for this service (names as in gunicorn's config file)."""
    return {
        "bind": bind,
        "workers": workers,
        # gthread: a hook call waits on FHIR fallback queries, so threads keep a worker busy
        # with other calls meanwhile.
        "worker_class": "gthread",
        "threads": threads,
        "timeout": 30,
        "graceful_timeout": 10,
        # Longer than gunicorn's 2 s default: a keep-alive connection whose next request waits
        # for a busy worker thread was otherwise reset under load (seen in bench_hooks.py).
        "keepalive": 75,
        "accesslog": None,  # the app writes one structured line per call itself
        "on_starting": _on_starting,
        "post_worker_init": _post_worker_init,
    }


def _on_starting(server: Any) -> None:
    from cds.cli import configure_logging

    # Without this, under the container command nothing configured logging: the per-call
    # lines (INFO) and the reasons for 401s were dropped.
    configure_logging()


def _post_worker_init(worker: Any) -> None:
    import gunicorn.util

    # gunicorn answers what it refuses itself (a request line over limit_request_line: 414,
    # headers over limit_request_field_size: 431, a malformed request: 400) with an HTML page
    # written by gunicorn.util.write_error, before the app sees the request. Its workers
    # call it through the module, so this one replacement makes those answers the same JSON
    # OperationOutcomes as the app's (CDS Hooks 3.0: non-2xx responses SHOULD carry one).
    gunicorn.util.write_error = json_write_error


def json_write_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn.util.write_error's signature, answering an OperationOutcome. ``mesg`` (which
    quotes the refused request) is not echoed."""
    from cds.hooks.outcome import operation_outcome

    body = json.dumps(
        operation_outcome(status_int, f"{reason}: refused by the HTTP server"),
        separators=(",", ":"),
    ).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode("latin-1") + body)


def run(args: argparse.Namespace) -> int:
    from cds.hooks.app import create_app

    config = serve_config(args)
    # Build one app in the master first: a bad setting or trial definition fails here, with the
    # CLI's one-line error and exit status, before a socket is bound. Workers build their own
    # (a SQLite connection must not cross a fork).
    create_app(config).extensions["cds.hooks"].store.close()
    options = gunicorn_settings(f"{args.host}:{args.port}", args.workers, args.threads)
    _Gunicorn(lambda: create_app(config), options).run()
    return 0


def _gunicorn_base() -> Any:
    from gunicorn.app.base import BaseApplication

    return BaseApplication


class _Gunicorn(_gunicorn_base()):  # type: ignore[misc]
    """gunicorn's embedding API: our options, our factory, no command-line parsing."""

    def __init__(self, factory: Callable[[], Flask], options: Mapping[str, Any]) -> None:
        self._factory = factory
        self._options = dict(options)
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            if value is not None:
                self.cfg.set(key, value)

    def load(self) -> Flask:
        return self._factory()
