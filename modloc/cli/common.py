"""What every verb module of the ``modloc`` command shares."""

from __future__ import annotations

import argparse
import json
import sys


def print_json(payload) -> None:
    """``payload`` as indented JSON on stdout, the ``--json`` output of every verb."""
    json.dump(payload, sys.stdout, indent=2)
    sys.stdout.write("\n")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value
