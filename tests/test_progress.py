"""Long work speaks: the one progress helper, and the verbs that use it with stderr piped."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modloc.engine.base.progress import Progress, announce, log_interval

MODLOC = [sys.executable, "-m", "modloc"]
LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] ")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_piped_progress_logs_count_rate_elapsed_and_eta_on_a_timer():
    stream = io.StringIO()
    with Progress("work", total=10, unit="item", interval=0.05, stream=stream) as bar:
        bar.update(4)
        bar.set_postfix(loss="0.5")
        time.sleep(0.3)  # no update meanwhile: the timer still writes
    lines = stream.getvalue().splitlines()
    assert all(LINE.match(line) for line in lines)
    assert lines[0].endswith("work: 0/10 item (0%), started")
    periodic = [line for line in lines[1:-1]]
    assert len(periodic) >= 3  # every 0.05 s over 0.3 s, with room for a busy machine
    assert re.search(r"work: 4/10 item \(40%\), [\d.]+ item/s, elapsed 00:00, ETA 00:0\d, loss 0.5$",
                     periodic[-1])
    assert re.search(r"work: 4/10 item \(40%\), .*, elapsed 00:00, done, loss 0.5$", lines[-1])


def test_unknown_total_says_so_and_a_failure_says_stopped():
    stream = io.StringIO()
    with pytest.raises(KeyError), Progress("scan", unit="video", interval=0.05, stream=stream) as bar:
        bar.update(3)
        time.sleep(0.12)
        raise KeyError("boom")
    lines = stream.getvalue().splitlines()
    assert "scan: 3 video, " in lines[1] and lines[1].endswith("ETA unknown")
    assert lines[-1].endswith("stopped")


def test_a_total_learnt_midway_gives_an_eta():
    stream = io.StringIO()
    with Progress("train", unit="step", interval=10, stream=stream) as bar:
        bar.update(2)
        bar.set_total(8)
        assert "2/8 step (25%)" in bar.line() and "ETA unknown" not in bar.line()


def test_a_terminal_gets_a_bar_and_disabled_work_says_nothing():
    terminal = _Terminal()
    with Progress("work", total=3, stream=terminal) as bar:
        bar.update(3)
    assert "\r" in terminal.getvalue() and "3/3" in terminal.getvalue()
    silent = io.StringIO()
    with Progress("work", total=3, enabled=False, stream=silent) as bar:
        bar.update(3)
    announce("about to work", enabled=False, stream=silent)
    assert silent.getvalue() == ""
    announce("about to work", stream=silent)
    assert LINE.match(silent.getvalue()) and silent.getvalue().endswith("about to work\n")


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("MODLOC_PROGRESS_SECONDS", raising=False)
    assert log_interval() == 15
    monkeypatch.setenv("MODLOC_PROGRESS_SECONDS", "0.5")
    assert log_interval() == 0.5
    monkeypatch.setenv("MODLOC_PROGRESS_SECONDS", "soon")
    with pytest.raises(ValueError, match="MODLOC_PROGRESS_SECONDS='soon': expected seconds"):
        log_interval()


def piped(argv: list[str], cwd: Path, seconds: float = 0.5) -> subprocess.CompletedProcess:
    """A ``modloc`` verb with stdout and stderr piped (not a terminal), log lines every
    ``seconds``."""
    environment = {**os.environ, "MODLOC_PROGRESS_SECONDS": str(seconds)}
    return subprocess.run([*MODLOC, *argv], cwd=cwd, env=environment, capture_output=True,
                          text=True, timeout=600)


def test_piped_synth_and_inspect_log_their_progress_on_stderr(tmp_path):
    done = piped(["synth", "--out", "data", "--preset", "tiny", "--splits", "validate"], tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0].endswith("synth: 0/24 video (0%), started") and "24/24 video" in lines[-1]
    assert lines[-1].endswith("done") and "video/s" in lines[-1]
    assert "synth: " not in done.stdout and "validate" in done.stdout  # the result on stdout
    done = piped(["inspect", "--json", "data/validate/*.tfrecord"], tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("{")
    assert done.stderr.splitlines()[-1].endswith("done") and "inspect: " in done.stderr


def test_piped_training_prints_its_plan_then_steps_with_an_eta(tiny_dataset, tmp_path):
    from tiny import TINY_MODEL, split, synth_manifest

    overrides = [f"--model-override={key}={value}".replace(" ", "") for key, value in TINY_MODEL.items()]
    segment_classes = synth_manifest(tiny_dataset)["segment_class_ids"]
    classes = ",".join(map(str, segment_classes))
    done = piped(["train", "--data", split(tiny_dataset, "train"), "--out", "run", *overrides,
                  "--classes", classes, "--batch-size", "8", "--epochs", "1", "--pad-to",
                  "longest", "--max-frames", "20"], tmp_path, seconds=0.2)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "pretrain: " in line]
    assert all(LINE.match(line) for line in lines)
    # the plan first: the model as built (a 2x2 tree, not the preset's 4x3), data, schedule, device
    assert "pretrain: model 2x2 MOD tree (preset mod_4x3) (" in lines[0]
    assert f"parameters, {len(segment_classes)} classes) -> run" in lines[0]
    assert "data 3 file(s)" in lines[1] and ", 48 videos, video mode;" in lines[1]
    assert "batch 8, epochs 1 (6 steps per epoch)" in lines[1]
    assert "device cpu" in lines[2] and "torch thread(s)" in lines[2]
    assert lines[3].endswith("pretrain: 0/6 step (0%), started")
    assert any(re.search(r"step/s, elapsed \d\d:\d\d, ETA \d\d:\d\d, loss ", line) for line in lines[4:-1])
    assert "pretrain: 6/6 step (100%)" in lines[-1] and "done" in lines[-1]
    assert "checkpoint: run/step-00000006" in done.stdout
