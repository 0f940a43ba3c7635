"""The `cds` command line: one entry point, subcommands registered by the modules that own them."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from cds.errors import CdsError

# Each module owns its subcommand: it exposes ``register(subparsers, fixtures_subparsers)``
# and sets ``func`` (args -> exit status) on the parsers it adds.
_SUBCOMMAND_MODULES = (
    "cds.evaluate_command",
    "cds.fhir.loader",
    "cds.synthetic",
    "cds.hooks.serve",
    "cds.sweep.command",
)

log = logging.getLogger("cds")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cds", description="Screen FHIR R4 patients for NET clinical trials."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail to stderr")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fixtures = subparsers.add_parser("fixtures", help="load or generate FHIR test data")
    fixtures_sub = fixtures.add_subparsers(dest="fixtures_command", required=True, metavar="ACTION")
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # A subcommand whose module is not there yet is simply not offered.
            if exc.name != name:
                raise
            continue
        module.register(subparsers, fixtures_sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
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
