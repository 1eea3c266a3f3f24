"""The live graphs: a video model split into an encoder (frames → sums) and a head (sums →
probabilities), for live localization (:mod:`modloc.engine.runtime.live`, which explains why
the split is exact).

::

    features uint8 (B, M, 1152), mask float32 (B, M)
        ─ LiveEncoder ─ sums float32 (B, S)    (adds up over any split of a video's frames)
    sums float32 (B, S)
        ─ LiveHead ─ probabilities, logits float32 (B, C)

The sums, in order (:func:`sums_layout`): per leaf, depth-first, the unnormalized RGB
VLAD residuals ``(F·K)`` then the audio ones; for an ensemble the sum of the centered codes
``Σ_real c`` (1152), the gates' input before its division by ``max(n, 300)``; last, the
frame count ``n``. The head normalizes each leaf's residuals per cluster, runs the leaf's
head and mixes the leaves with the gates, as the one-piece graph does. Both graphs are
built from the same folded modules as the one-piece graph (:mod:`modloc.export.graph`),
in fp32 only.

:func:`check_live_parity` is the export's gate: the encoder over all of a video's frames,
and over chunks of 1, 5 and 7 frames summed, then the head, must give the one-piece
graph's probabilities (fed as the engine feeds it, ``frames.pad_to`` honoured) to 1e-4
relative error, on ONNX Runtime.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from modloc.engine.base.features import FEATURE_SIZE, MAX_FRAMES, RGB_SIZE
from modloc.engine.runtime.artifacts import (
    LIVE_DATA_SUFFIX,
    LIVE_ENCODER_FILE,
    LIVE_HEAD_FILE,
    TensorSpec,
)
from modloc.engine.runtime.backends.interface import Backend
from modloc.engine.runtime.live import LiveVideoModel
from modloc.export.graph import ExportGraph, FoldedLeaf, centered_codes, sigmoid
from modloc.export.onnx_export import (
    PARITY_TOLERANCE,
    ParityError,
    export_onnx,
    export_program,
    max_relative_error,
    parity_batches,
)

LIVE_PARITY_SHAPES = ((1, 1), (2, 5), (3, 17), (4, 40), (2, 300))
LIVE_CHUNKS = (1, 5, 7)  # frames per encoder call when the parity check splits a video


def _leaves(body: nn.Module) -> list[FoldedLeaf]:
    """The folded leaves under ``body``, depth-first (the sums' order)."""
    if isinstance(body, FoldedLeaf):
        return [body]
    return [leaf for branch in body.branches for leaf in _leaves(branch)]


def sums_layout(graph: ExportGraph) -> list[dict]:
    """``[{"name", "offset", "size"}]``: the pieces of the sums vector, in order."""
    pieces = []
    for index, leaf in enumerate(_leaves(graph.body)):
        for stream, vlad in (("rgb", leaf.video_vlad), ("audio", leaf.audio_vlad)):
            pieces.append((f"leaf {index} {stream} residuals", vlad.group_size * vlad.clusters))
    if graph.needs_frame_mean:
        pieces.append(("gate code sums", FEATURE_SIZE))
    pieces.append(("frames", 1))
    layout, offset = [], 0
    for name, size in pieces:
        layout.append({"name": name, "offset": offset, "size": size})
        offset += size
    return layout


class LiveEncoder(nn.Module):
    """``features, mask`` → ``sums (B, S)`` float32 (module doc)."""

    input_names = ("features", "mask")
    output_names = ("sums",)
    description = "modloc live encoder: uint8 YouTube-8M frames + mask -> the frames' sums"

    def __init__(self, graph: ExportGraph):
        super().__init__()
        self.source = graph
        self.leaves = _leaves(graph.body)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rgb, audio, attention_mask = centered_codes(features[:, :, :RGB_SIZE],
                                                    features[:, :, RGB_SIZE:], mask, self.source.use_mask)
        parts = []
        for leaf in self.leaves:
            parts.append(leaf.video_vlad.residuals(rgb, attention_mask).flatten(1))
            parts.append(leaf.audio_vlad.residuals(audio, attention_mask).flatten(1))
        if self.source.needs_frame_mean:
            parts += [rgb.sum(dim=1), audio.sum(dim=1)]
        parts.append((mask > 0).float().sum(dim=1, keepdim=True))
        return torch.cat(parts, dim=1)

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return (torch.zeros(2, 3, FEATURE_SIZE, dtype=torch.uint8), torch.ones(2, 3))

    dynamic_axes = {"features": {0: "batch", 1: "frames"}, "mask": {0: "batch", 1: "frames"}}


class LiveHead(nn.Module):
    """``sums (B, S)`` → ``(probabilities, logits)``, both ``(B, C)`` float32 (module doc)."""

    input_names = ("sums",)
    output_names = ("probabilities", "logits")
    description = "modloc live head: a video's frame sums -> class probabilities"
    dynamic_axes = {"sums": {0: "batch"}}

    def __init__(self, graph: ExportGraph):
        super().__init__()
        self.source = graph
        self.layout = sums_layout(graph)
        # the gates' R: the one-piece graph's frames.gate_frames, or the 300 frames an
        # ensemble with "padded_mean" gates is fed (its mean over them is Σ c / 300)
        self.gate_frames = graph.gate_frames or MAX_FRAMES

    def forward(self, sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pieces = iter(torch.split(sums, [piece["size"] for piece in self.layout], dim=1))
        vlads = []
        for leaf in _leaves(self.source.body):
            rgb, audio = next(pieces), next(pieces)
            vlads.append(torch.cat([leaf.video_vlad.normalized(rgb), leaf.audio_vlad.normalized(audio)],
                                   dim=1))
        frame_mean = None
        if self.source.needs_frame_mean:
            codes = next(pieces)
            frame_mean = codes / torch.clamp(sums[:, -1:], min=float(self.gate_frames))
        logits = _head_logits(self.source.body, frame_mean, iter(vlads))
        return sigmoid(logits), logits

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return (torch.zeros(2, self.layout[-1]["offset"] + 1),)


def _head_logits(body: nn.Module, frame_mean: torch.Tensor | None,
                 vlads: Iterator[torch.Tensor]) -> torch.Tensor:
    if isinstance(body, FoldedLeaf):
        return body.head(next(vlads))
    return body.mix(frame_mean, [_head_logits(branch, frame_mean, vlads) for branch in body.branches])


def live_graphs(graph: ExportGraph) -> tuple[LiveEncoder, LiveHead]:
    """The encoder and head of a video-level fp32 :class:`ExportGraph` (eval mode)."""
    if not graph.use_mask:
        raise ValueError("live graphs split a video-level (masked) model; a segment model scores "
                         "each window whole")
    if graph.dtype != torch.float32:
        raise ValueError(f"live graphs are exported in fp32, not {graph.dtype}")
    return LiveEncoder(graph).eval(), LiveHead(graph).eval()


def io_records(encoder: LiveEncoder, head: LiveHead, num_classes: int) -> dict:
    """The manifest's ``inputs``/``outputs`` of both graphs."""
    size = head.layout[-1]["offset"] + 1
    sums = TensorSpec("sums", "float32", ("batch", size))
    return {
        "encoder": {"inputs": [TensorSpec("features", "uint8", ("batch", "frames", FEATURE_SIZE)).to_json(),
                               TensorSpec("mask", "float32", ("batch", "frames")).to_json()],
                    "outputs": [sums.to_json()]},
        "head": {"inputs": [sums.to_json()],
                 "outputs": [TensorSpec(name, "float32", ("batch", num_classes)).to_json()
                             for name in head.output_names]},
    }


def _padded(features: np.ndarray, frames: int) -> np.ndarray:
    out = np.zeros((len(features), frames, FEATURE_SIZE), np.uint8)
    out[:, : features.shape[1]] = features
    return out


def check_live_parity(live: LiveVideoModel, one_piece: Backend,
                      shapes: Sequence[tuple[int, int]] = LIVE_PARITY_SHAPES,
                      chunks: Sequence[int] = LIVE_CHUNKS,
                      tolerance: float = PARITY_TOLERANCE, seed: int = 0) -> dict:
    """Encoder + head against the one-piece graph (module doc).

    Returns ``{"reference", "shapes", "chunks", "max_rel_error", "tolerance", "passed"}``.

    Raises:
        ParityError: naming the worst shape and chunking.
    """
    pad_to = one_piece.artifact.pad_to
    rows = []
    for features, num_frames in parity_batches(shapes, seed):
        frames = features.shape[1]
        expected = one_piece.run(_padded(features, max(frames, pad_to or 0)), num_frames=num_frames)
        results = {"all": live.head(live.encode(features, num_frames))}
        for size in chunks:
            total = np.zeros((len(features), live.sums_size), np.float32)
            for begin in range(0, frames, size):
                valid = np.clip(num_frames - begin, 0, min(size, frames - begin))
                total += live.encode(np.ascontiguousarray(features[:, begin: begin + size]), valid)
            results[str(size)] = live.head(total)
        for chunking, actual in results.items():
            rows.append({"batch": len(features), "frames": frames, "chunk": chunking,
                         "max_rel_error": max_relative_error(actual, expected)})
    worst = max(rows, key=lambda row: row["max_rel_error"])
    result = {"reference": f"the one-piece graph on {one_piece.name}", "output": "probabilities",
              "shapes": [list(shape) for shape in shapes], "chunks": ["all", *map(str, chunks)],
              "max_rel_error": worst["max_rel_error"], "tolerance": tolerance,
              "passed": worst["max_rel_error"] <= tolerance}
    if not result["passed"]:
        raise ParityError(f"live graphs: encoder + head differ from the one-piece graph by a relative "
                          f"{worst['max_rel_error']:.3g} > {tolerance:g} at batch {worst['batch']}, "
                          f"frames {worst['frames']}, chunks of {worst['chunk']}")
    return result


def export_live_graphs(graph: ExportGraph, directory: Path, num_classes: int, opset: int,
                       metadata: dict[str, str]) -> dict:
    """Write ``live_encoder.onnx`` and ``live_head.onnx`` of ``graph`` into ``directory``;
    the manifest's ``live`` record (its ``parity`` set later, by :func:`check_live_parity`)."""
    encoder, head = live_graphs(graph)
    record = {}
    for part, module, name in (("encoder", encoder, LIVE_ENCODER_FILE), ("head", head, LIVE_HEAD_FILE)):
        export_onnx(module, export_program(module), directory / name, opset,
                    {**metadata, "modloc.live": part}, data_file=name + LIVE_DATA_SUFFIX)
        record[part] = {"file": name}
    for part, specs in io_records(encoder, head, num_classes).items():
        record[part].update(specs)
    record["sums"] = {"size": head.layout[-1]["offset"] + 1, "layout": head.layout}
    record["gate_frames"] = head.gate_frames if graph.needs_frame_mean else None
    record["parity"] = None
    return record


__all__ = ["LIVE_CHUNKS", "LIVE_PARITY_SHAPES", "LiveEncoder", "LiveHead", "check_live_parity",
           "export_live_graphs", "io_records", "live_graphs", "sums_layout"]
