"""The `cds` command line: one entry point, subcommands registered by the modules that own them."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from cds.errors import CdsError

# Each module owns its subcommand: it exposes ``register(subparsers, fixtures_subparsers)``
# and sets ``func`` (args -> exit status) on the parsers it adds. Keyed by the command, so that
# a run imports only its own command's modules (the web server's, say, cost a sweep ~0.15 s);
# `cds --help` and an unknown command import them all.
_SUBCOMMAND_MODULES = {
    "evaluate": ("cds.evaluate_command",),
    "fixtures": ("cds.fhir.loader", "cds.synthetic"),
    "serve": ("cds.hooks.serve",),
    "sweep": ("cds.sweep.command",),
}

log = logging.getLogger("cds")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for ``command`` (every command when it is ``None`` or not one of ours)."""
    parser = argparse.ArgumentParser(
        prog="cds", description="Screen FHIR R4 patients for NET clinical trials."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail to stderr")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fixtures = subparsers.add_parser("fixtures", help="load or generate FHIR test data")
    fixtures_sub = fixtures.add_subparsers(dest="fixtures_command", required=True, metavar="ACTION")
    every = [name for names in _SUBCOMMAND_MODULES.values() for name in names]
    for name in _SUBCOMMAND_MODULES.get(command or "", every):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # A subcommand whose module is not there yet is simply not offered.
            if exc.name != name:
                raise
            continue
        module.register(subparsers, fixtures_sub)
    return parser


def configure_logging(*, verbose: bool = False) -> None:
    """The one logging setup: every command, and the container's gunicorn command (its
    on_starting hook calls this), log to stderr in this format. A no-op once configured."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The command is the first word that is not an option (the only top-level option,
    # -v/--verbose, takes no value).
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)
    configure_logging(verbose=args.verbose)
    try:
        status: int = args.func(args)
    except CdsError as exc:
        # One line naming the file or field and the problem; the chained cause goes to the
        # debug log only, so users never see a traceback.
        print(f"cds: error: {exc}", file=sys.stderr)
        log.debug("cause", exc_info=exc)
        return exc.exit_code
    except KeyboardInterrupt:
        print("cds: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`cds evaluate ... | head`): not an error worth a traceback.
        sys.stderr.close()
        return 0
    return status


if __name__ == "__main__":
    sys.exit(main())
