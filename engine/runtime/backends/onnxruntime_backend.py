"""The ONNX Runtime backend: an artifact's ``model.onnx`` in an ``InferenceSession``.

The CPU provider runs fp32, fp16 and INT8 (QDQ) graphs. It has no bf16 kernels: a bf16
artifact needs a GPU provider (``CUDAExecutionProvider``, ``TensorrtExecutionProvider``)
or the TensorRT backend, and the CPU provider refuses it with that message.

INT8 on the CPU provider: an artifact quantizes activations as symmetric int8 (zero point
0), the form TensorRT's explicit quantization requires. On x86, ONNX Runtime fuses QDQ
pairs into integer kernels only for uint8 activations (the VNNI instructions multiply
uint8 by int8); with int8 activations it dequantizes and multiplies in float, slower than
the fp32 graph. So the session gets the same graph with every activation Q/DQ pair moved
to uint8 with zero point 128: ``q_u8 = q_s8 + 128`` on the same scale, the same numbers,
a different encoding (:func:`uint8_activations`; it needs the ``onnx`` package).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from modloc.engine.runtime.artifacts import Artifact, ArtifactError, TensorSpec, check_io
from modloc.engine.runtime.backends.interface import Backend, graph_inputs

# ONNX Runtime's type strings for the dtypes an artifact's inputs and outputs use
_ORT_TYPES = {"tensor(uint8)": "uint8", "tensor(float)": "float32",
              "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16"}


class OnnxRuntimeBackend(Backend):
    """``model.onnx`` of an artifact in ONNX Runtime.

    Args:
        artifact: a verified artifact (:func:`modloc.engine.runtime.artifacts.load_artifact`).
        providers: execution providers in order of preference (default: CPU only).
        threads: intra-op threads (None: ONNX Runtime's default, one per core).
        session_config: session configuration entries, e.g.
            ``{"session.intra_op.allow_spinning": "0"}`` where other work shares the cores.
    """

    name = "onnxruntime"

    def __init__(self, artifact: Artifact,
                 providers: tuple[str | tuple[str, dict], ...] = ("CPUExecutionProvider",),
                 threads: int | None = None, session_config: Mapping[str, str] | None = None):
        super().__init__(artifact)
        try:
            import onnxruntime
        except ImportError:
            raise ImportError("the onnxruntime backend needs ONNX Runtime: pip install onnxruntime "
                              "(or modloc[export])") from None
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = threads
        for key, value in (session_config or {}).items():
            options.add_session_config_entry(key, value)
        model: str | bytes = str(artifact.onnx_path)
        # a provider is a name or (name, provider options), as InferenceSession takes them
        names = [provider if isinstance(provider, str) else provider[0] for provider in providers]
        self.uint8_activations = artifact.precision == "int8" and names == ["CPUExecutionProvider"]
        if self.uint8_activations:
            model = uint8_activations(artifact.onnx_path)
        try:
            self.session = onnxruntime.InferenceSession(model, options, providers=list(providers))
        except Exception as error:  # ORT raises its own classes, none of them exported
            hint = (" ONNX Runtime's CPU provider has no bf16 kernels: run bf16 artifacts on a "
                    "GPU provider or with TensorRT." if artifact.precision == "bf16" else "")
            raise ArtifactError(f"{artifact.path}: ONNX Runtime cannot load {artifact.onnx_path.name} "
                                f"with {list(providers)}: {error}.{hint}") from None
        check_io(artifact, "inputs", [_spec(node) for node in self.session.get_inputs()],
                 "ONNX Runtime session")
        check_io(artifact, "outputs", [_spec(node) for node in self.session.get_outputs()],
                 "ONNX Runtime session")
        self.providers = tuple(self.session.get_providers())
        # ONNX Runtime only warns when a provider is not in its build (the CPU package has no
        # CUDA) and runs on the rest: a run asked for a GPU must not silently use the CPU
        missing = [name for name in names if name not in self.providers]
        if missing:
            raise ArtifactError(f"{artifact.path}: ONNX Runtime {onnxruntime.__version__} has no "
                                f"{', '.join(missing)} here (available: "
                                f"{', '.join(onnxruntime.get_available_providers())}); CUDA needs "
                                "the onnxruntime-gpu package in place of onnxruntime")

    def run(self, features: np.ndarray, mask: np.ndarray | None = None,
            num_frames: np.ndarray | None = None) -> np.ndarray:
        inputs = graph_inputs(self.artifact, features, mask, num_frames)
        return self.session.run(["probabilities"], inputs)[0]

    def run_outputs(self, features: np.ndarray, mask: np.ndarray | None = None,
                    num_frames: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Every output of the graph (probabilities and logits), by name."""
        inputs = graph_inputs(self.artifact, features, mask, num_frames)
        names = [output.name for output in self.artifact.outputs]
        return dict(zip(names, self.session.run(names, inputs), strict=True))

    def close(self) -> None:
        self.session = None


def uint8_activations(path) -> bytes:
    """The QDQ graph at ``path`` with its int8 activation quantization re-encoded as uint8.

    Every QuantizeLinear (in ONNX Runtime's QDQ graphs only activations have one; weights
    are stored quantized) gets a uint8 zero point 128 higher, and so do the
    DequantizeLinear nodes reading it. Returns the serialized model.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ImportError("running an INT8 artifact on ONNX Runtime's CPU provider needs the onnx "
                          "package: pip install onnx") from None
    model = onnx.load(path)
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    shifted: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 3:
            continue
        zero_point = numpy_helper.to_array(initializers[node.input[2]])
        if zero_point.dtype != np.int8:
            continue
        name = shifted.get(node.input[2])
        if name is None:
            name = shifted[node.input[2]] = f"{node.input[2]}_uint8"
            model.graph.initializer.append(numpy_helper.from_array(
                (zero_point.astype(np.int16) + 128).astype(np.uint8), name))
        node.input[2] = name
        for reader in readers.get(node.output[0], []):
            if reader.op_type != "DequantizeLinear":
                raise ArtifactError(f"{path}: QuantizeLinear {node.name} feeds a {reader.op_type}, "
                                    "not a DequantizeLinear: not a QDQ graph")
            reader.input[2] = name
    used = {name for node in model.graph.node for name in node.input}
    kept = [tensor for tensor in model.graph.initializer if tensor.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return model.SerializeToString()


def _spec(node) -> TensorSpec:
    return TensorSpec(node.name, _ORT_TYPES.get(node.type, node.type), tuple(node.shape))


__all__ = ["OnnxRuntimeBackend", "uint8_activations"]
