"""What every backend is: :class:`Backend` (one artifact, one ``run``) and the graph's inputs.

The backend modules implement :class:`Backend`; :mod:`modloc.engine.runtime.backends`
opens one by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from modloc.engine.base.features import FEATURE_SIZE, RGB_SIZE
from modloc.engine.runtime.artifacts import Artifact, frame_mask


class Backend(ABC):
    """A loaded artifact that scores batches.

    Attributes:
        name: the backend's name (a key of :data:`BACKENDS`).
        artifact: the verified artifact it runs (manifest included).
    """

    name: str

    def __init__(self, artifact: Artifact):
        self.artifact = artifact

    @property
    def class_ids(self) -> tuple[int, ...]:
        """Vocabulary ids of the output columns."""
        return self.artifact.class_ids

    @property
    def kind(self) -> str:
        """``"video"`` or ``"segment"``."""
        return self.artifact.kind

    @property
    def precision(self) -> str:
        return self.artifact.precision

    @abstractmethod
    def run(self, features: np.ndarray, mask: np.ndarray | None = None,
            num_frames: np.ndarray | None = None) -> np.ndarray:
        """``(B, M, 1152)`` uint8 frames → ``(B, C)`` float32 probabilities.

        Padding is given by ``mask`` (``(B, M)``, 1 at valid frames) or by ``num_frames``
        (``(B,)`` valid frames per row); with neither, every frame is valid. The bytes of
        padded frames are ignored.
        """

    @abstractmethod
    def close(self) -> None:
        """Release what the backend holds (sessions, engines, device memory)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def graph_inputs(artifact: Artifact, features: np.ndarray, mask: np.ndarray | None = None,
                 num_frames: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The graph's input arrays, by name, for a batch (checked, C-contiguous).

    ``features`` is split into ``rgb`` and ``audio`` for a graph that takes them apart.
    """
    features = np.asarray(features)
    if features.dtype != np.uint8 or features.ndim != 3 or features.shape[2] != FEATURE_SIZE:
        raise ValueError(f"features must be (B, M, {FEATURE_SIZE}) uint8, got "
                         f"{features.dtype} {features.shape}")
    batch, frames, _ = features.shape
    if mask is not None and num_frames is not None:
        raise ValueError("give the padding as mask or as num_frames, not both")
    if num_frames is not None:
        mask = frame_mask(num_frames, frames)
    elif mask is None:
        mask = np.ones((batch, frames), np.float32)
    mask = np.ascontiguousarray(mask, dtype=np.float32)
    if mask.shape != (batch, frames):
        raise ValueError(f"mask must be ({batch}, {frames}), got {mask.shape}")
    if artifact.split_streams:
        return {"rgb": np.ascontiguousarray(features[:, :, :RGB_SIZE]),
                "audio": np.ascontiguousarray(features[:, :, RGB_SIZE:]), "mask": mask}
    return {"features": np.ascontiguousarray(features), "mask": mask}


__all__ = ["Backend", "graph_inputs"]
