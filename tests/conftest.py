"""Shared fixtures: the real YouTube-8M files beside the repository, synthetic datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _real_data_dir() -> Path:
    return Path(os.environ.get("MODLOC_YT8M_DATA", REPO.parent / "shared" / "data" / "yt8m"))


@pytest.fixture(scope="session")
def real_data() -> Path:
    """``../shared/data/yt8m`` (or $MODLOC_YT8M_DATA): real YouTube-8M shards and records."""
    path = _real_data_dir()
    if not (path / "video_level_v2_2018").is_dir():
        pytest.skip(f"real YouTube-8M sample files not found at {path} (set MODLOC_YT8M_DATA)")
    return path


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """The ``tiny`` synthetic preset, generated once per test session."""
    from engine.synth import config_from, generate

    out = tmp_path_factory.mktemp("tiny")
    generate(config_from("tiny"), out)
    return out
