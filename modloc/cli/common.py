"""What every verb module of the ``modloc`` command shares."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence


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


def add_field_options(parser: argparse.ArgumentParser, config: type, names: Sequence[str] | None = None,
                      defaults: bool = True) -> None:
    """One ``--field-name`` flag per field of the dataclass ``config`` (``names``: only
    these), typed by the field's default; ``defaults=False`` leaves them None when omitted
    (for overrides on top of a preset). The one way a verb maps flags to a flat config."""
    for item in dataclasses.fields(config):
        if names is not None and item.name not in names:
            continue
        default = item.default
        parser.add_argument(f"--{item.name.replace('_', '-')}", dest=item.name, type=type(default),
                            default=default if defaults else None,
                            help=f"(default {default})" if defaults else f"(preset value if omitted; default {default})")


def field_values(args: argparse.Namespace, config: type, names: Sequence[str] | None = None) -> dict:
    """The values of :func:`add_field_options`' flags, by field name."""
    return {item.name: getattr(args, item.name) for item in dataclasses.fields(config)
            if names is None or item.name in names}
