"""The exported computation: a trained model rewritten for inference, constants folded.

:func:`export_module` turns a checkpoint's model (a MOD tree, one of its leaves, or a
plain NeXtVLAD) into an :class:`ExportGraph`, a module that takes what clients hold, the
raw bytes of the YouTube-8M format, and returns probabilities and logits::

    features uint8 (B, M, 1152)  ─┐  (or rgb uint8 (B, M, 1024) + audio uint8 (B, M, 128))
    mask float32 (B, M)          ─┴─ c = where(mask, float(bytes) - p, 0)
        ─ folded NeXtVLAD leaves (and gates) ─ logits (B, C) ─ sigmoid ─ probabilities (B, C)

Padding. A masked (video-mode) leaf ignores padded frames, and an ensemble's gates read
``Σ_real c / max(n, R)`` (the reference's frame mean on centered codes, where a padding
frame is ``c = 0``: :func:`modloc.training.models.reference_gate_input`), so a video-mode
graph gives the same outputs however far a batch is padded (:attr:`ExportGraph.pad_to` is
None). Two graphs must be fed a fixed number of frames: an unmasked (segment-mode) graph
counts padded frames, as the reference's zero-padded last window does (5 frames), and an
ensemble of a checkpoint made before the gate input was recorded (``gate_input
"padded_mean"``) averages over every input frame (300 frames, as the reference pads).

Folding (every map below is affine per dimension, so it merges into the next linear layer,
computed in float64 and rounded once):

- dequantization and RGB un-whitening (:func:`modloc.engine.base.features.input_affine`) go into each
  leaf's expansion layers and into every gate's first layer. The layers take *centered*
  codes ``c = q - p``, with ``p`` = 127.00195 the code of a dequantized 0.0
  (:data:`modloc.engine.runtime.artifacts.PADDING_CODE`): a padding frame is exactly ``c = 0``, and the
  first matrix products sum centered values, as the reference's do. (Folded onto the raw
  codes 0..255, every product would carry a large common offset for its bias to cancel,
  at a cost of about two orders of magnitude of float32 precision in the first layer.)
- ``cluster_bn`` into the cluster-logit layer, ``vlad_bn`` and ``hidden_bn`` into the hidden
  layer, the gating BN into the squeeze layer, each gate's BN into its FC.

Precision is carried by the graph itself (TensorRT ≥ 10 builds strongly typed networks,
11 only those): with ``dtype`` fp16 or bf16 the weights and the per-frame and per-video
linear layers run in that type, while the softmaxes, the L2 normalizations and the long
reductions (the VLAD aggregation over frames × groups, the gates' frame means, the
mixtures' sums) run in float32, and both outputs are float32.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from modloc.engine.base.features import (
    FEATURE_SIZE,
    MAX_FRAMES,
    RGB_SIZE,
    SEGMENT_FRAMES,
    input_affine,
)
from modloc.engine.runtime.artifacts import PADDING_CODE
from modloc.training.models import (
    MixtureNode,
    MODTree,
    NeXtVLAD,
    NeXtVLADModel,
    gate_frames,
    leaf_paths,
)

GraphKind = Literal["distill", "ensemble", "single"]
COMPUTE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    """``1 / (1 + exp(-x))``, spelled out rather than ``torch.sigmoid``.

    ONNX Runtime's CPU Sigmoid is a fast approximation whose relative error grows to 2e-3
    at -11 and past 100% near -18. Small values matter here: an attention weight scales
    its frame's VLAD residuals (left unnormalized where they fall under the L2 floor), and
    rankings multiply small probabilities (``P_vid^a · P_seg^b``). The spelled-out form is
    exact to float32 rounding over the whole range, in every runtime.
    """
    return torch.reciprocal(1.0 + torch.exp(-x))


def _bn_affine(bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference BatchNorm as ``y = a * x + b`` (float64)."""
    a = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return a, bn.bias.double() - bn.running_mean.double() * a


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    """A linear layer holding ``weight`` (out, in) and ``bias``, rounded to ``dtype`` once."""
    # built on meta: the weights are replaced, so initializing them would be wasted work
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
    return layer


def centered_input_affine() -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)``, float64 ``(1152,)``: model input = ``scale * c + shift`` for a
    centered code ``c = q - PADDING_CODE`` (``shift`` is the input of a padding frame)."""
    scale, bias = (torch.tensor(v, dtype=torch.float64) for v in input_affine())
    return scale, scale * PADDING_CODE + bias


class FoldedNeXtVLAD(nn.Module):
    """NeXtVLAD pooling on centered codes: ``(B, M, N)`` → ``(B, F·K)`` float32, before ``vlad_bn``.

    ``scale``/``shift`` map the stream's centered codes to the model input; they fold into
    the expansion layer. The caller folds ``vlad_bn`` into whatever consumes the output.
    """

    def __init__(self, vlad: NeXtVLAD, scale: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.groups, self.clusters, self.group_size = vlad.groups, vlad.cluster_size, vlad.group_size
        weight, expand_bias = vlad.expand.weight.double(), vlad.expand.bias.double()
        self.expand = _linear(weight * scale[None, :], weight @ shift + expand_bias, dtype)
        self.attention = _linear(vlad.attention.weight.double(), vlad.attention.bias.double(), dtype)
        a, b = _bn_affine(vlad.cluster_bn)
        self.cluster_logits = _linear(a[:, None] * vlad.cluster_logits.weight.double(), b, dtype)
        self.register_buffer("centers", vlad.centers.detach().float().clone())

    def forward(self, codes: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.normalized(self.residuals(codes, mask))

    def residuals(self, codes: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``(B, F, K)`` float32 ``Σ_i Σ_g att · α · (x̃ − c)``: a sum over the frames (the
        part of the pooling that adds up over any split of them)."""
        batch, frames, _ = codes.shape
        x = self.expand(codes)
        attention = sigmoid(self.attention(x))
        if mask is not None:
            attention = attention * mask[..., None]
        rows = frames * self.groups
        logits = self.cluster_logits(x).float().reshape(batch, rows, self.clusters)
        assignment = torch.softmax(logits, dim=2) * attention.float().reshape(batch, rows, 1)
        grouped = x.float().reshape(batch, rows, self.group_size)
        vlad = torch.bmm(grouped.transpose(1, 2), assignment)
        return vlad - assignment.sum(dim=1, keepdim=True) * self.centers

    def normalized(self, residuals: torch.Tensor) -> torch.Tensor:
        """``(B, F, K)`` (or flattened ``(B, F·K)``) residuals → ``(B, F·K)``, L2-normalized
        per cluster."""
        vlad = residuals.reshape(-1, self.group_size, self.clusters)
        # TF l2_normalize: the norm floored at 1e-6, as modloc.training.models.nextvlad does
        vlad = F.normalize(vlad, p=2.0, dim=1, eps=1e-6)
        return vlad.reshape(-1, self.group_size * self.clusters)


class FoldedLeaf(nn.Module):
    """A NeXtVLADModel on centered codes: ``(B, M, 1024)``, ``(B, M, 128)`` → logits ``(B, C)``
    float32.

    Its forward takes the frame mean too, unused, so that a mixture calls leaves and
    nodes alike.
    """

    def __init__(self, model: NeXtVLADModel, dtype: torch.dtype):
        super().__init__()
        scale, shift = centered_input_affine()
        self.dtype = dtype
        self.video_vlad = FoldedNeXtVLAD(model.video_vlad, scale[:RGB_SIZE], shift[:RGB_SIZE], dtype)
        self.audio_vlad = FoldedNeXtVLAD(model.audio_vlad, scale[RGB_SIZE:], shift[RGB_SIZE:], dtype)
        a_vlad, b_vlad = (torch.cat(pair) for pair in zip(
            _bn_affine(model.video_vlad.vlad_bn), _bn_affine(model.audio_vlad.vlad_bn), strict=True))
        a_hidden, b_hidden = _bn_affine(model.hidden_bn)
        hidden = model.hidden.weight.double()
        self.hidden = _linear(a_hidden[:, None] * hidden * a_vlad[None, :],
                              a_hidden * (hidden @ b_vlad) + b_hidden, dtype)
        a_gate, b_gate = _bn_affine(model.gating.bn)
        self.squeeze = _linear(a_gate[:, None] * model.gating.squeeze.weight.double(), b_gate, dtype)
        self.excite = _linear(model.gating.excite.weight.double(), None, dtype)
        self.classifier = _linear(model.classifier.weight.double(),
                                  model.classifier.bias.double(), dtype)

    def forward(self, rgb: torch.Tensor, audio: torch.Tensor, frame_mean: torch.Tensor | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        return self.head(torch.cat([self.video_vlad(rgb, mask), self.audio_vlad(audio, mask)], dim=1))

    def head(self, vlad: torch.Tensor) -> torch.Tensor:
        """``(B, video F·K + audio F·K)`` normalized VLADs → ``(B, C)`` float32 logits."""
        hidden = self.hidden(vlad.to(self.dtype))
        gates = sigmoid(self.excite(torch.relu(self.squeeze(hidden))))
        return self.classifier(hidden * gates).float()


class FoldedMixture(nn.Module):
    """A mixture node: ``softmax(FC(BN(frame mean)))`` over its children's logits, float32.

    The gate reads the frame mean of the centered codes (:class:`ExportGraph` computes it);
    the input affine and the BN fold into its FC.
    """

    def __init__(self, node: MixtureNode, dtype: torch.dtype):
        super().__init__()
        scale, shift = centered_input_affine()
        a, b = _bn_affine(node.gate.bn)
        weight = node.gate.fc.weight.double()
        # the gate is small (1152 → children) and feeds a softmax: it stays float32
        self.gate = _linear(weight * (a * scale)[None, :],
                            weight @ (a * shift + b) + node.gate.fc.bias.double(), torch.float32)
        self.branches = nn.ModuleList(
            FoldedLeaf(child, dtype) if node.holds_leaves else FoldedMixture(child, dtype)
            for child in node.branches)

    def forward(self, rgb: torch.Tensor, audio: torch.Tensor, frame_mean: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        return self.mix(frame_mean, [branch(rgb, audio, frame_mean, mask) for branch in self.branches])

    def mix(self, frame_mean: torch.Tensor, child_logits: list[torch.Tensor]) -> torch.Tensor:
        """The children's ``(B, C)`` logits mixed by the gate on ``(B, 1152)`` ``frame_mean``."""
        weights = torch.softmax(self.gate(frame_mean), dim=1)
        return (weights[:, :, None] * torch.stack(child_logits, dim=1)).sum(dim=1)


class ExportGraph(nn.Module):
    """``features, mask`` → ``(probabilities, logits)``, both ``(B, C)`` float32.

    Args:
        body: a :class:`FoldedLeaf` or :class:`FoldedMixture`.
        dtype: the compute type of the body's linear layers.
        use_mask: multiply the attention by the mask (video mode); the mask always decides
            which frames are padding.
        gate_frames: a mixture's gates read ``Σ_real c / max(n, gate_frames)`` (the
            reference's frame mean); None: the mean over every input frame (the
            ``"padded_mean"`` form of older checkpoints) or no gates.

    Attributes:
        pad_to: the frames per example the graph must be fed (module doc), or None: any
            number, the padding does not change the outputs.
    """

    input_names = ("features", "mask")
    output_names = ("probabilities", "logits")
    description = "modloc export: uint8 YouTube-8M frames + mask -> class probabilities"

    def __init__(self, body: nn.Module, dtype: torch.dtype, use_mask: bool,
                 gate_frames: int | None = None):
        super().__init__()
        self.body = body
        self.dtype = dtype
        self.use_mask = use_mask
        self.needs_frame_mean = isinstance(body, FoldedMixture)
        self.gate_frames = gate_frames if self.needs_frame_mean else None
        if not use_mask:
            self.pad_to: int | None = SEGMENT_FRAMES
        elif self.needs_frame_mean and self.gate_frames is None:
            self.pad_to = MAX_FRAMES
        else:
            self.pad_to = None

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Every input's dynamic axes by name (for ``torch.export`` and the ONNX axes)."""
        return {name: {0: "batch", 1: "frames"} for name in self.input_names}

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        """Inputs to capture the graph with (sizes 2 and 3: ``torch.export`` specializes
        dimensions of size 0 and 1)."""
        examples = {"features": torch.zeros(2, 3, FEATURE_SIZE, dtype=torch.uint8),
                    "rgb": torch.zeros(2, 3, RGB_SIZE, dtype=torch.uint8),
                    "audio": torch.zeros(2, 3, FEATURE_SIZE - RGB_SIZE, dtype=torch.uint8),
                    "mask": torch.ones(2, 3)}
        return tuple(examples[name] for name in self.input_names)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.streams(features[:, :, :RGB_SIZE], features[:, :, RGB_SIZE:], mask)

    def streams(self, rgb: torch.Tensor, audio: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The graph on separate uint8 streams ``(B, M, 1024)`` and ``(B, M, 128)``."""
        rgb, audio, attention_mask = centered_codes(rgb, audio, mask, self.use_mask)
        frame_mean = None
        if self.needs_frame_mean and self.gate_frames is None:
            frame_mean = torch.cat([rgb.mean(dim=1), audio.mean(dim=1)], dim=1)
        elif self.needs_frame_mean:
            frames = (mask > 0).float().sum(dim=1, keepdim=True)
            frame_mean = (torch.cat([rgb.sum(dim=1), audio.sum(dim=1)], dim=1)
                          / torch.clamp(frames, min=float(self.gate_frames)))
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.dtype)
        logits = self.body(rgb.to(self.dtype), audio.to(self.dtype), frame_mean, attention_mask)
        return sigmoid(logits), logits


def centered_codes(rgb: torch.Tensor, audio: torch.Tensor, mask: torch.Tensor, use_mask: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """uint8 ``(B, M, 1024)``, ``(B, M, 128)`` and ``(B, M)`` mask → float32 centered codes
    (``q − PADDING_CODE``; 0 at padded frames, whatever their bytes) and the attention mask
    (``(B, M)`` float32 in video mode, else None)."""
    valid = mask[:, :, None] > 0
    rgb = torch.where(valid, rgb.float() - PADDING_CODE, 0.0)
    audio = torch.where(valid, audio.float() - PADDING_CODE, 0.0)
    return rgb, audio, valid[:, :, 0].float() if use_mask else None


class SplitStreamsGraph(ExportGraph):
    """:class:`ExportGraph` taking ``rgb, audio, mask``: for clients that hold the two
    streams apart, as the TFRecords do."""

    input_names = ("rgb", "audio", "mask")

    def forward(self, rgb: torch.Tensor, audio: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.streams(rgb, audio, mask)


def export_module(model: nn.Module, graph: GraphKind, leaf: int | None = None,
                  precision: str = "fp32", split_streams: bool = False) -> ExportGraph:
    """The :class:`ExportGraph` of ``model`` (eval mode, on the CPU).

    Args:
        model: a :class:`modloc.training.models.MODTree` (graphs ``"distill"``, ``"ensemble"``) or
            a :class:`modloc.training.models.NeXtVLADModel` (graph ``"single"``).
        graph: ``"distill"`` (tree leaf ``leaf``), ``"ensemble"`` (the root's mixture) or
            ``"single"``.
        leaf: the leaf index of a distill graph (depth-first order).
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"`` (INT8 is quantized from fp32 ONNX).
        split_streams: separate ``rgb`` and ``audio`` inputs.
    """
    if precision not in COMPUTE_DTYPES:
        raise ValueError(f"precision {precision!r} is not built from PyTorch; expected one of "
                         f"{sorted(COMPUTE_DTYPES)}")
    dtype = COMPUTE_DTYPES[precision]
    if isinstance(model, MODTree):
        config = model.config.leaf
        if graph == "ensemble":
            body: nn.Module = FoldedMixture(model.root, dtype)
        elif graph == "distill":
            if leaf is None or not 0 <= leaf < model.num_leaves:
                raise ValueError(f"leaf must be in [0, {model.num_leaves}) for a "
                                 f"{model.config.branching} tree, got {leaf}")
            body = FoldedLeaf(model.node(leaf_paths(model.config.branching)[leaf]), dtype)
        else:
            raise ValueError(f"a MOD tree exports as 'distill' or 'ensemble', not {graph!r}")
    elif isinstance(model, NeXtVLADModel):
        if graph != "single":
            raise ValueError(f"a single NeXtVLAD exports as graph 'single', not {graph!r}")
        config = model.config
        body = FoldedLeaf(model, dtype)
    else:
        raise TypeError(f"cannot export a {type(model).__name__}: export handles NeXtVLAD "
                        "models and MOD trees")
    if model.inputs.transform != "unwhiten":
        raise ValueError(f"input transform {model.inputs.transform!r} cannot be folded")
    use_mask = config.mode == "video"
    reference_gates = isinstance(model, MODTree) and model.config.gate_input == "reference"
    graph_class = SplitStreamsGraph if split_streams else ExportGraph
    return graph_class(body, dtype, use_mask=use_mask,
                       gate_frames=gate_frames(use_mask) if reference_gates else None).eval()


__all__ = ["COMPUTE_DTYPES", "ExportGraph", "centered_codes", "centered_input_affine", "sigmoid", "FoldedLeaf", "FoldedMixture", "FoldedNeXtVLAD",
           "GraphKind", "SplitStreamsGraph", "export_module"]
