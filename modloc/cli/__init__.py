"""The ``modloc`` command: one entry point, one subcommand per verb (the roof: imports every
room, imported by nothing).

Verbs live by room: :mod:`~modloc.cli.data` (``synth``, ``inspect``, ``eval``),
:mod:`~modloc.cli.runtime` (``infer``, ``show``), :mod:`~modloc.cli.service` (``serve``,
``client``), :mod:`~modloc.cli.training` (``models``, ``train``, ``finetune``,
``evaluate``), :mod:`~modloc.cli.export` (``export``, ``build``) and
:mod:`~modloc.cli.demo`. Every verb is a thin wrapper over one library function, and
imports it only when it runs. On failure a verb prints one line, ``modloc VERB: error:
…``, and exits non-zero; with ``MODLOC_TRACEBACK=1`` in the environment the traceback is
shown instead. A verb whose stdout is closed by its reader (``modloc … | head``) ends
quietly with status 141, as Unix tools do.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from modloc._version import __version__
from modloc.cli import data, demo, export, runtime, service, training

log = logging.getLogger("modloc")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modloc",
        description="Temporal concept localization on YouTube-8M features (the MOD system).",
        epilog="On failure a verb prints one line (modloc VERB: error: ...) and exits 1; set "
               "MODLOC_TRACEBACK=1 in the environment to see the traceback instead.",
    )
    parser.add_argument("--version", action="version", version=f"modloc {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Verb modules import what they run inside their handlers (torch only in training and
    # export verbs), so a serving install without torch still parses every verb.
    for verbs in (data, runtime, demo, service, training, export):
        verbs.add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        status = int(args.handler(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers below
        return status
    except BrokenPipeError:
        # the reader of stdout went away (`modloc ... | head`): end quietly, as Unix tools
        # do, with the status a SIGPIPE death has; stdout goes to /dev/null so that the
        # interpreter's own final flush does not complain
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:
        print(f"modloc {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, ImportError) as error:
        # Bad input (CorruptRecordError and RecordFormatError are ValueErrors), a file or
        # network problem, a device or server failure, a missing optional package: one line
        # for the user; the traceback with MODLOC_TRACEBACK=1 (raised) or -vv (logged).
        if os.environ.get("MODLOC_TRACEBACK", "") not in ("", "0"):
            raise
        log.debug("failure", exc_info=True)
        print(f"modloc {args.command}: error: {error}", file=sys.stderr)
        return 1

