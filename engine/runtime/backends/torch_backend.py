"""The PyTorch backend: an artifact's ``model.pt2`` on a CPU or a CUDA device.

``model.pt2`` is the ``torch.export`` program that ``modloc export`` translated to
``model.onnx`` (:mod:`modloc.engine.runtime.artifacts`), saved with ``torch.export.save``: the folded
graph as ATen operations with its weights, loaded here with ``torch.export.load``. The
training code is not needed to load it, nor imported.

- **Checks**: the program's input names, dtypes and shapes (batch and frames dynamic) and
  its output dtypes and shapes must match the manifest (:func:`modloc.engine.runtime.artifacts.check_io`);
  the output names, and the kind, graph, leaf and precision the program was exported as,
  come from the file's :data:`modloc.engine.runtime.artifacts.PT2_METADATA` and must match too.
- **Precisions**: fp32, fp16 and bf16 programs run on the CPU and on CUDA (PyTorch has CPU
  kernels for both reduced types, where ONNX Runtime's CPU provider has none for bf16). An
  INT8 artifact has no model.pt2: its graph is ONNX Runtime's QDQ quantization of the ONNX
  file.
- **Transfers**: arrays become tensors with ``torch.from_numpy`` (no copy on the CPU); on
  CUDA they go through pinned memory with ``non_blocking`` copies, uint8 frames as they are
  (4x fewer bytes than float32).
- **Compilation**: ``compile=True`` runs the program through ``torch.compile`` (default
  mode: Inductor kernels, a C++ compiler on the CPU, Triton on CUDA). The first call of each
  new input shape compiles (seconds to minutes); after a second shape the dimensions are
  compiled as dynamic. ``cuda_graphs=True`` compiles with mode ``"reduce-overhead"``: CUDA
  graphs replay each shape's kernels in one launch, one graph recorded per ``(B, M)``
  shape, so callers should send a few fixed batch shapes (the batcher's buckets).

PyTorch is imported only when a backend is created: ``pip install 'modloc[train]'`` (or
``torch``) for this backend alone.
"""

from __future__ import annotations

import contextlib
import json
import threading

import numpy as np

from modloc.engine.runtime.artifacts import (
    PT2_FILE,
    PT2_METADATA,
    Artifact,
    ArtifactError,
    TensorSpec,
    check_io,
)
from modloc.engine.runtime.backends.interface import Backend, graph_inputs


def import_torch():
    """The ``torch`` module, or an ImportError that says how to get it."""
    try:
        import torch
    except ImportError:
        raise ImportError("the torch backend needs PyTorch: pip install 'modloc[train]' "
                          "(or pip install torch)") from None
    return torch


class TorchBackend(Backend):
    """``model.pt2`` of an artifact, run by PyTorch.

    Args:
        artifact: a verified artifact (:func:`modloc.engine.runtime.artifacts.load_artifact`) holding
            model.pt2 (fp32, fp16 or bf16; exported by a modloc that writes it).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        compile: run the program through ``torch.compile`` (default mode).
        cuda_graphs: compile with mode ``"reduce-overhead"`` (CUDA graphs; CUDA only;
            implies ``compile``). Calls are serialized: a graph's outputs live in memory
            that its next replay overwrites.
        threads: PyTorch's intra-op threads (``torch.set_num_threads``: process-wide, unlike
            ONNX Runtime's per-session setting); None leaves them as they are.

    Raises:
        ImportError: PyTorch is not installed.
        ArtifactError: no model.pt2, a file this torch cannot load, or a program that does
            not match the manifest.
        RuntimeError: CUDA requested where torch sees no CUDA device.
        ValueError: an unknown device, ``cuda_graphs`` off CUDA, ``threads`` < 1.
    """

    name = "torch"

    def __init__(self, artifact: Artifact, device: str = "cpu", compile: bool = False,
                 cuda_graphs: bool = False, threads: int | None = None):
        torch = import_torch()
        super().__init__(artifact)
        self.device = _device(torch, device)
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA device, not {self.device}: CUDA graphs "
                             "record GPU kernels (on the CPU use compile=True)")
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
        self._torch = torch
        program, description = _load_program(torch, artifact)
        inputs, outputs = _program_specs(program, description, artifact)
        check_io(artifact, "inputs", inputs, f"torch.export program ({PT2_FILE})")
        check_io(artifact, "outputs", outputs, f"torch.export program ({PT2_FILE})")
        self.outputs = [spec.name for spec in outputs]
        self._probabilities = self.outputs.index("probabilities")
        if self.device.type != "cpu":
            from torch.export.passes import move_to_device_pass

            # rewrites the device arguments inside the graph too, not only the weights
            program = move_to_device_pass(program, self.device)
        module = program.module()
        self.compiled = compile or cuda_graphs
        self.cuda_graphs = cuda_graphs
        if cuda_graphs:
            module = torch.compile(module, mode="reduce-overhead")
        elif compile:
            module = torch.compile(module)
        self.module = module
        self._lock = threading.Lock() if cuda_graphs else contextlib.nullcontext()

    def run(self, features: np.ndarray, mask: np.ndarray | None = None,
            num_frames: np.ndarray | None = None) -> np.ndarray:
        with self._lock:
            outputs = self._forward(features, mask, num_frames)
            return _to_numpy(outputs[self._probabilities])

    def run_outputs(self, features: np.ndarray, mask: np.ndarray | None = None,
                    num_frames: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Every output of the program (probabilities and logits), by name: ``(B, C)`` float32."""
        with self._lock:
            outputs = self._forward(features, mask, num_frames)
            return {name: _to_numpy(output) for name, output in zip(self.outputs, outputs, strict=True)}

    def _forward(self, features: np.ndarray, mask: np.ndarray | None,
                 num_frames: np.ndarray | None) -> tuple:
        """The program's outputs (tensors on the device) for one checked batch."""
        torch = self._torch
        arrays = graph_inputs(self.artifact, features, mask, num_frames)
        tensors = [self._to_device(arrays[spec.name]) for spec in self.artifact.inputs]
        with torch.inference_mode():
            if self.cuda_graphs:
                # the previous call's outputs were copied out: its graph memory may be reused
                torch.compiler.cudagraph_mark_step_begin()
            return self.module(*tensors)

    def _to_device(self, array: np.ndarray):
        tensor = self._torch.from_numpy(array)
        if self.device.type == "cuda":
            # pinned memory makes the copy asynchronous; the caching host allocator keeps the
            # pinned block alive until the copy has run
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def close(self) -> None:
        self.module = None


def _device(torch, device: str):
    """``device`` as a ``torch.device``, refused when this machine cannot run it."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r} ({error})") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested, but torch {torch.__version__} sees no "
                               "CUDA device (torch.cuda.is_available() is False): use device='cpu', "
                               "or a CUDA build of torch on a machine with an NVIDIA GPU")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {device!r} requested, but torch sees "
                               f"{torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type != "cpu":
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return parsed


def _load_program(torch, artifact: Artifact) -> tuple:
    """``(ExportedProgram, description)`` of the artifact's model.pt2, refused when it is
    missing, unreadable or exported as another model than the manifest's."""
    path = artifact.pt2_path
    if path is None:
        reason = (artifact.manifest.get("pt2") or {}).get("reason")
        raise ArtifactError(
            f"{artifact.path}: no {PT2_FILE}, which the torch backend runs: "
            + (f"{reason}" if reason else "the artifact was exported by a modloc that did not "
               "write it; re-export the checkpoint with this modloc (modloc export), or run it "
               "with the onnxruntime or tensorrt backend"))
    extra_files = {PT2_METADATA: ""}
    try:
        program = torch.export.load(path, extra_files=extra_files)
    except Exception as error:  # torch raises many classes here, none of them specific
        exported_with = artifact.manifest.get("versions", {}).get("torch")
        raise ArtifactError(f"{path}: torch {torch.__version__} cannot load the program (saved "
                            f"with torch {exported_with}): {error}") from None
    try:
        description = json.loads(extra_files[PT2_METADATA])
        exported_as = {key: description[key] for key in ("kind", "graph", "leaf", "precision")}
        description["outputs"] = [str(name) for name in description["outputs"]]
    except (ValueError, KeyError, TypeError):
        raise ArtifactError(f"{path}: no readable {PT2_METADATA} inside (what the program is): "
                            "not a file written by modloc export") from None
    leaf = artifact.manifest["model"].get("leaf") or {}
    expected = {"kind": artifact.kind, "graph": artifact.graph, "leaf": leaf.get("index"),
                "precision": artifact.precision}
    differences = [f"{key} {exported_as[key]!r} instead of {value!r}"
                   for key, value in expected.items() if exported_as[key] != value]
    if differences:
        raise ArtifactError(f"{path}: the program was exported as another model than the "
                            f"manifest describes: {'; '.join(differences)}")
    return program, description


def _program_specs(program, description: dict,
                   artifact: Artifact) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The program's inputs and outputs as the manifest describes tensors.

    Input names come from the program's signature, output names from its description;
    dtypes and shapes from the traced values (a dynamic dimension reads as None).
    """
    signature = program.graph_signature
    values = {node.name: node.meta.get("val") for node in program.graph.nodes}
    names = description["outputs"]
    if len(names) != len(signature.user_outputs):
        raise ArtifactError(f"{artifact.path / PT2_FILE}: names {len(names)} outputs {names}, the "
                            f"program returns {len(signature.user_outputs)}")
    inputs = [_spec(name, values.get(name)) for name in signature.user_inputs]
    outputs = [_spec(name, values.get(node)) for name, node in zip(names, signature.user_outputs,
                                                                   strict=True)]
    return inputs, outputs


def _spec(name: str, value) -> TensorSpec:
    if value is None or not hasattr(value, "dtype"):
        return TensorSpec(name, "not a tensor", ())
    shape = tuple(dim if isinstance(dim, int) else None for dim in value.shape)
    return TensorSpec(name, str(value.dtype).removeprefix("torch."), shape)


def _to_numpy(tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


__all__ = ["TorchBackend", "import_torch"]
