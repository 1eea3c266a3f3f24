"""The wheel installs exactly one top-level package, ``modloc``, with its built parts."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_one_top_level_package(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q",
                             "-w", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("modloc-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"modloc", wheel.name.split("-")[0] + "-"
                                                     + wheel.name.split("-")[1] + ".dist-info"}
    built = {"modloc/engine/base/data/vocabulary.csv", "modloc/engine/_proto/modloc/v1/localization_pb2.py",
             "modloc/engine/runtime/rankings.py", "modloc/cli/__init__.py", "modloc/training/trainer.py",
             "modloc/export/exporter.py"}
    assert built <= set(names)
    assert any(name.startswith("modloc/engine/_native.") for name in names)
