"""Evaluating checkpoints: video-level metrics, segment MAP@K of the fused system and the dummy.

- :func:`evaluate_videos`: GAP@20, Hit@1, PERR and MAP (:class:`modloc.engine.base.metrics.VideoMetrics`)
  of a checkpoint on labelled videos, over its class space.
- :func:`evaluate_segments`: the inference pipeline of REFERENCE §7 on a test split. A
  video-level checkpoint scores each video (its top-N classes are the candidates); a
  segment-level checkpoint scores the video's non-overlapping 5-frame windows
  (:func:`modloc.engine.base.windows.pack_segment_windows`, no mask, as in segment mode); the two are
  fused (:mod:`modloc.engine.runtime.fusion`) and ranked per class; and the same candidates give the dummy
  prediction. Both rankings are scored with the Kaggle MAP@K against the truth files. One
  checkpoint may serve as both models.
- :func:`evaluate_batches`: metrics (and the loss) of a model on batches, the trainer's
  periodic evaluation; in segment mode predictions are first multiplied by the label
  weights, as G's ``eval.py`` does (REFERENCE §8.4), so only rated classes count.

Every model runs in eval mode under ``torch.inference_mode``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from modloc.engine.base.features import MAX_FRAMES
from modloc.engine.base.io.tfrecord import Patterns, count_records
from modloc.engine.base.metrics import VideoMetrics
from modloc.engine.base.progress import Progress
from modloc.engine.runtime.fusion import FusionConfig
from modloc.engine.runtime.offline_eval import localize_split
from modloc.engine.runtime.pipeline import PipelineConfig, ScoringModel
from modloc.training.checkpoint import Checkpoint, load_checkpoint, num_classes_of
from modloc.training.data import TorchBatch, make_loader
from modloc.training.datasets import VideoLevelDataset
from modloc.training.models import DBoFModel, MODTree, TreeOutput

LossFunction = Callable[[object, TorchBatch], torch.Tensor]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; any other device is checked here, so that
    one this torch cannot run fails at once with its name (torch's own failure comes later,
    an AssertionError from deep inside the first tensor moved).

    Raises:
        ValueError: not ``cpu``, ``cuda`` or ``cuda:N``, or a CUDA device this machine lacks.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):  # not a device name at all
        parsed = None
    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if parsed is not None and parsed.type == "cpu":
        return parsed
    if parsed is not None and parsed.type == "cuda" and (parsed.index or 0) < cuda_devices:
        return parsed
    usable = ["auto", "cpu", *(["cuda"] if cuda_devices else []),
              *(f"cuda:{index}" for index in range(cuda_devices))]
    build = "" if torch.backends.cuda.is_built() else " (built without CUDA)"
    raise ValueError(f"device {str(device)!r} is not usable here: torch {torch.__version__}"
                     f"{build} runs on {', '.join(usable)}")


def forward(model: nn.Module, features: torch.Tensor, num_frames: torch.Tensor,
            use_mask: bool | None = None):
    """The model's output on a uint8 batch: a :class:`TreeOutput` for trees, else logits.

    ``use_mask`` None keeps the model's mode; DBoF always masks (it pools valid frames).
    """
    if isinstance(model, DBoFModel):
        return model(features, num_frames)
    return model(features, num_frames, use_mask=use_mask)


def root_logits(output) -> torch.Tensor:
    """``(B, C)`` logits of the whole model (a tree's root)."""
    return output.root if isinstance(output, TreeOutput) else output


@torch.inference_mode()
def predict(model: nn.Module, features: torch.Tensor, num_frames: torch.Tensor,
            use_mask: bool | None = None, batch_size: int | None = None) -> np.ndarray:
    """``(N, M, 1152)`` uint8 + ``(N,)`` frames → ``(N, C)`` float32 probabilities.

    The model's device is used; ``batch_size`` splits large inputs into chunks.
    """
    device = next(model.parameters()).device
    chunk = batch_size or max(1, len(features))
    outputs = []
    for begin in range(0, len(features), chunk):
        logits = root_logits(forward(model, features[begin:begin + chunk].to(device),
                                     num_frames[begin:begin + chunk].to(device), use_mask))
        outputs.append(torch.sigmoid(logits.float()).cpu().numpy())
    if not outputs:
        return np.zeros((0, num_classes_of(model.config)), np.float32)
    return np.concatenate(outputs)


@torch.inference_mode()
def evaluate_batches(
    model: nn.Module,
    batches: Iterable[TorchBatch],
    num_classes: int,
    loss_function: LossFunction | None = None,
    top_k: int = 20,
) -> dict:
    """Video metrics (and the mean loss) of ``model`` on ``batches``, in eval mode.

    Segment mode (batches with label weights) is G's ``eval.py``: predictions times the
    weights, every rated row counted, the negatively rated ones too. In video mode a row
    without a label in the class space is left out (on YouTube-8M, with its 3862 classes,
    every video has one; a narrowed class space can leave some without). ``labelled`` in
    the result counts the rows the metrics saw. The model's train/eval mode is restored
    afterwards.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    metrics = VideoMetrics(num_classes, top_k=top_k)
    loss_sum = 0.0
    examples = rows = 0
    try:
        for batch in batches:
            batch = batch.to(device)
            output = forward(model, batch.features, batch.num_frames)
            if loss_function is not None:
                loss_sum += float(loss_function(output, batch)) * len(batch)
            probabilities = torch.sigmoid(root_logits(output).float())
            if batch.label_weights is not None:
                probabilities = probabilities * batch.label_weights
            counted = (batch.label_weights if batch.label_weights is not None else batch.labels)
            labelled = counted.sum(dim=1) > 0
            examples += len(batch)
            if labelled.any():
                rows += int(labelled.sum())
                metrics.accumulate(probabilities[labelled].cpu().numpy(),
                                   batch.labels[labelled].cpu().numpy())
    finally:
        model.train(was_training)
    result: dict = {"examples": examples, "labelled": rows}
    if loss_function is not None and examples:
        result["loss"] = loss_sum / examples
    if rows:
        scores = metrics.get()
        result.update(gap=scores.gap, hit_at_one=scores.hit_at_one, perr=scores.perr, map=scores.map)
    return result


def evaluate_videos(
    checkpoint: Checkpoint,
    labels: Patterns,
    batch_size: int = 64,
    top_k: int = 20,
    workers: int = 0,
    progress: bool | None = None,
) -> dict:
    """GAP@top_k, Hit@1, PERR and MAP of a checkpoint on the labelled videos of ``labels``."""
    dataset = VideoLevelDataset(labels, class_ids=checkpoint.class_ids, shuffle=False)
    loader = make_loader(dataset, batch_size, num_workers=workers)
    batches = -(-count_records(dataset.paths) // batch_size)
    with Progress("evaluate videos", batches, "batch", enabled=progress) as bar:
        result = evaluate_batches(checkpoint.model, bar.each(loader), len(checkpoint.class_ids),
                                  top_k=top_k)
    videos = result.pop("labelled")
    if not videos:
        raise ValueError(f"no video in {labels} has a label among the checkpoint's classes")
    return {**result, "videos": videos, "top_k": top_k}


def evaluate_segments(
    video: Checkpoint,
    segment: Checkpoint,
    test: Patterns,
    truth: Patterns,
    class_ids: Sequence[int] | None = None,
    fusion: FusionConfig | None = None,
    batch_size: int = 32,
    window_batch_size: int = 1024,
    submissions: str | os.PathLike | None = None,
    progress: bool | None = None,
    allow_low_overlap: bool = False,
) -> dict:
    """Segment MAP@K of the fused system and of the dummy prediction on a test split.

    :func:`modloc.engine.runtime.offline_eval.localize_split` with the checkpoints' models as scorers:
    ``video`` gives the candidates (and the dummy's scores), ``segment`` (may be ``video``
    itself) scores every 5-frame window, without a mask as in segment mode (REFERENCE §3
    step 2: a partial window's padding enters the model as padding frames).

    Args:
        test: test TFRecords (frames); truth: their segment ratings (e.g. ``test_truth/``).
        class_ids: the classes to rank (submission rows); default the 1000 segment classes.
        fusion: candidates, exponents, partial windows and ``k`` (default: the reference's).
        batch_size: videos per video-model batch; window_batch_size: windows per
            segment-model batch.
        submissions: a directory to write ``fused.csv`` and ``dummy.csv`` (Kaggle format).
        allow_low_overlap: score truth files that rate few of the test videos, with a
            warning, instead of refusing them.

    Returns:
        as :func:`~modloc.engine.runtime.offline_eval.localize_split`.
    """

    def video_scorer(features: np.ndarray, num_frames: np.ndarray) -> np.ndarray:
        return predict(video.model, torch.from_numpy(features), torch.from_numpy(num_frames))

    def segment_scorer(features: np.ndarray, num_frames: np.ndarray) -> np.ndarray:
        return predict(segment.model, torch.from_numpy(features), torch.from_numpy(num_frames),
                       use_mask=False)

    config = PipelineConfig(fusion=fusion or FusionConfig(), video_batch_size=batch_size,
                            window_batch_size=window_batch_size)
    return localize_split(ScoringModel(video_scorer, video.class_ids, video_pad_to(video.model),
                                       "pytorch video"),
                          ScoringModel(segment_scorer, segment.class_ids, name="pytorch segment"),
                          test, truth, class_ids, config, submissions, progress,
                          allow_low_overlap=allow_low_overlap)


def video_pad_to(model: nn.Module) -> int | None:
    """The frames a video-level batch must be padded to for ``model``: 300 (the reference's
    padding) for a tree with the older ``"padded_mean"`` gates, whose input averages every
    frame of the batch; None (any padding, the scores do not change) otherwise."""
    gated = isinstance(model, MODTree) and model.config.gate_input == "padded_mean"
    return MAX_FRAMES if gated else None


def evaluate(
    checkpoint: str | os.PathLike,
    segment_checkpoint: str | os.PathLike | None = None,
    labels: Patterns | None = None,
    test: Patterns | None = None,
    truth: Patterns | None = None,
    class_ids: Sequence[int] | None = None,
    fusion: FusionConfig | None = None,
    batch_size: int = 32,
    window_batch_size: int = 1024,
    workers: int = 0,
    device: str = "auto",
    submissions: str | os.PathLike | None = None,
    progress: bool | None = None,
    allow_low_overlap: bool = False,
) -> dict:
    """Evaluate checkpoints (``modloc evaluate``): video metrics on ``labels`` and/or
    segment MAP@K on ``test`` + ``truth``.

    ``checkpoint`` is the video-level model; ``segment_checkpoint`` (default: the same)
    scores the windows. Returns ``{"video": {...}}`` and/or ``{"segments": {...}}``.
    """
    if labels is None and test is None:
        raise ValueError("nothing to evaluate: give labelled videos, or a test split and its truth")
    if (test is None) != (truth is None):
        raise ValueError("segment evaluation needs both the test split and its truth files")
    target = resolve_device(device)
    video = load_checkpoint(checkpoint, target)
    result: dict = {"checkpoint": str(checkpoint)}
    if labels is not None:
        result["video"] = evaluate_videos(video, labels, batch_size, workers=workers, progress=progress)
    if test is not None:
        segment = (video if segment_checkpoint is None
                   else load_checkpoint(segment_checkpoint, target))
        result["segment_checkpoint"] = str(segment.path)
        result["segments"] = evaluate_segments(
            video, segment, test, truth, class_ids, fusion, batch_size, window_batch_size,
            submissions=submissions, progress=progress, allow_low_overlap=allow_low_overlap)
    return result


__all__ = ["evaluate", "evaluate_batches", "evaluate_segments", "evaluate_videos", "forward",
           "predict", "resolve_device", "root_logits"]
