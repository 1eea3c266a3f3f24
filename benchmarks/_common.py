"""What every benchmark script writes the same way: the machine, the command, the results file.

Scripts run as ``python benchmarks/bench_x.py``, so this directory is on ``sys.path`` and
they ``import _common``.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance() -> str:
    """Markdown lines: date, machine and the command that reproduces the run."""
    command = " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    return (
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}\n"
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}\n"
        f"- command: `python {command}`"
    )


def write_section(path: Path, section: str, header: str) -> None:
    """Replace the ``## `` section with ``section``'s heading in ``path``, or append it.

    Results files keep one section per configuration (CPU, each GPU, each model), so a run on
    one machine does not erase the numbers measured on another.
    """
    heading = section.splitlines()[0]
    text = path.read_text() if path.exists() else header
    sections = re.split(r"(?m)^(?=## )", text)
    kept = [s for s in sections if s.splitlines()[0] != heading]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(s.rstrip("\n") + "\n" for s in [*kept, section]))
