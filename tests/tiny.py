"""What the training, export and TensorRT tests share: the tiny tree and the synthetic splits."""

from __future__ import annotations

import json
from pathlib import Path

# A 2 x 2 MOD tree of tiny NeXtVLADs: the paper's code paths at a size that trains in seconds.
TINY_MODEL = {"branching": [2, 2], "cluster_size": 4, "groups": 2, "expansion": 2,
              "hidden_size": 16, "gating_reduction": 4}


def split(dataset: Path, name: str) -> str:
    """Glob of one split of a synthetic dataset (``train``, ``validate``, ``test``, ``test_truth``)."""
    return str(dataset / name / "*.tfrecord")


def synth_manifest(dataset: Path) -> dict:
    """The dataset's ``synth.json`` (class lists, counts, layout)."""
    return json.loads((dataset / "synth.json").read_text())
