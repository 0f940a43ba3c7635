"""`cds serve`: run the CDS Hooks service under gunicorn (settings checked before it starts)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Mapping
from typing import Any

from flask import Flask

__all__ = ["register", "serve_config"]

log = logging.getLogger("cds.hooks")


def register(subparsers: Any, fixtures_subparsers: Any) -> None:
    """Add ``cds serve`` (the CLI dispatcher calls this for every subcommand module)."""
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
    parser.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    parser.add_argument("--threads", type=int, default=4, help="threads per worker (4)")
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


def run(args: argparse.Namespace) -> int:
    from cds.hooks.app import create_app

    config = serve_config(args)
    # Build one app in the master first: a bad setting or trial definition fails here, with the
    # CLI's one-line error and exit status, before a socket is bound. Workers build their own
    # (a SQLite connection must not cross a fork).
    create_app(config).extensions["cds.hooks"].store.close()
    options = {
        "bind": f"{args.host}:{args.port}",
        "workers": args.workers,
        "threads": args.threads,
        "worker_class": "gthread",
        "timeout": 30,
        "graceful_timeout": 10,
        # Longer than gunicorn's 2 s default: a keep-alive connection whose next request waits
        # for a busy worker thread was otherwise reset under load (seen in bench_hooks.py).
        "keepalive": 75,
        "accesslog": None,  # the app writes one structured line per call itself
    }
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
