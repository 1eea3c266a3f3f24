"""Inference backends: one artifact (:mod:`modloc.engine.runtime.artifacts`), one ``run``.

Every backend takes what the engine holds, uint8 frames and valid-frame counts (or a frame
mask), and returns the artifact's probabilities::

    backend = open_backend("runs/demo/export/segment/ensemble-fp32")      # ONNX Runtime
    probabilities = backend.run(features, num_frames=num_frames)          # (B, C) float32
    backend.class_ids                                                     # column → class

- ``"onnxruntime"``: :class:`modloc.engine.runtime.backends.onnxruntime_backend.OnnxRuntimeBackend`
  (``model.onnx``);
- ``"tensorrt"``: :class:`modloc.engine.runtime.backends.tensorrt_backend.TensorRTBackend` (an artifact
  built with ``modloc build``; needs TensorRT and an NVIDIA GPU);
- ``"torch"``: :class:`modloc.engine.runtime.backends.torch_backend.TorchBackend` (``model.pt2``, the
  ``torch.export`` program of the same graph; CPU or CUDA, optionally ``torch.compile``
  and CUDA graphs; fp32, fp16 and bf16 artifacts, INT8 ones have no program).

Each backend module imports its runtime only when a backend is created, so importing
this package costs nothing and needs none of them.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from modloc.engine.runtime.artifacts import Artifact, ArtifactError, load_artifact
from modloc.engine.runtime.backends.interface import Backend, graph_inputs


def _onnxruntime() -> type[Backend]:
    from modloc.engine.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend


def _tensorrt() -> type[Backend]:
    from modloc.engine.runtime.backends.tensorrt_backend import TensorRTBackend

    return TensorRTBackend


def _torch() -> type[Backend]:
    from modloc.engine.runtime.backends.torch_backend import TorchBackend

    return TorchBackend


# The one list of backend names; each class is imported only when its backend is opened.
BACKENDS: dict[str, Callable[[], type[Backend]]] = {
    "onnxruntime": _onnxruntime, "tensorrt": _tensorrt, "torch": _torch}


def open_backend(artifact: Artifact | str | os.PathLike, backend: str = "onnxruntime",
                 **options) -> Backend:
    """Load an artifact (verified) into ``backend`` with its ``options``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    if not isinstance(artifact, Artifact):
        artifact = load_artifact(artifact)
    return BACKENDS[backend]()(artifact, **options)


__all__ = ["BACKENDS", "ArtifactError", "Backend", "graph_inputs", "open_backend"]
