"""The engine: the localization pipeline plus the per-class rankings over every video seen.

::

    engine = Engine.from_artifacts("runs/demo/export", backend="onnxruntime")
    results = engine.localize(videos)          # per video: candidates, fused window scores
    engine.rankings()                          # class id → best segment ids (stage 4)
    engine.write_submission("submission.csv")  # the Kaggle CSV

Stages 1–3 are :class:`modloc.engine.runtime.pipeline.Pipeline`; stage 4 is a native per-class top-K
(:class:`modloc.engine.runtime.topk.TopK`, or its durable form for the service). Each ranked video carries
an ``order``, the tie key of the rankings: by default the order the engine saw the videos,
and for sharded runs a global one (file, record) so that shards merge into exactly the
single-process rankings.

Fallback fill (REFERENCE §7 step 5, off by default): a class with fewer than ``k`` fused
segments is filled from its videos in video-score order, each expanded into its full
windows, skipping segments already ranked, up to ``k``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from modloc.engine.base.features import SEGMENT_FRAMES
from modloc.engine.base.io.examples import Video
from modloc.engine.base.metrics.segment import segment_id
from modloc.engine.base.submission import write_submission
from modloc.engine.base.vocab import default_segment_class_ids
from modloc.engine.runtime.expansion import ExpansionCut
from modloc.engine.runtime.pipeline import (
    Pipeline,
    PipelineConfig,
    ScoringModel,
    VideoLocalization,
    check_rankable_id,
)
from modloc.engine.runtime.topk import TopK

DEFAULT_VARIANT = "distill-fp32"
# REFERENCE §7 step 5: the fallback file (…_test_k1000.csv) holds each video's top 1000 classes
FALLBACK_CLASSES_PER_VIDEO = 1000


def artifact_paths(artifacts: str | os.PathLike, video: str | None = None,
                   segment: str | None = None) -> tuple[Path, Path]:
    """The video-level and segment-level artifact directories.

    ``artifacts`` is what ``modloc export`` wrote for both checkpoints: ``video/<variant>``
    and ``segment/<variant>`` (variant = ``<graph>-<precision>``, e.g. ``distill-fp32``,
    default :data:`DEFAULT_VARIANT`). ``video``/``segment`` may also name an artifact
    directory directly.
    """
    root = Path(artifacts)
    chosen = []
    for kind, variant in (("video", video), ("segment", segment)):
        candidate = Path(variant) if variant and Path(variant).is_dir() else root / kind / (variant or DEFAULT_VARIANT)
        if not (candidate / "manifest.json").is_file():
            present = sorted(p.name for p in (root / kind).iterdir() if (p / "manifest.json").is_file()) \
                if (root / kind).is_dir() else []
            raise FileNotFoundError(f"no {kind}-level artifact at {candidate}"
                                    + (f"; {root / kind} holds: {', '.join(present)}" if present else
                                       f"; expected {root}/{kind}/<graph>-<precision>/ from modloc export"))
        chosen.append(candidate)
    return chosen[0], chosen[1]


class Engine:
    """Localizes videos and keeps the per-class rankings.

    Args:
        pipeline: stages 1–3.
        ranking: the per-class top-K (default: a new :class:`TopK` over ``class_ids``
            with the pipeline's ``k``); pass a durable one to survive restarts.
        class_ids: the ranked classes, the submission's rows (default: the 1000 segment
            classes).
        fallback: fill short rankings from video scores (REFERENCE §7 step 5).
        backends: backends the engine owns and closes.

    ``expansion`` (default None) may be set to an :class:`modloc.engine.runtime.expansion.ExpansionCut`
    before videos are ranked: only the pairs it allows enter the rankings (REFERENCE §7
    step 3; every video then needs its order).
    """

    def __init__(self, pipeline: Pipeline, ranking=None, class_ids: Sequence[int] | None = None,
                 fallback: bool = False, backends: Sequence = ()):
        self.pipeline = pipeline
        self.class_ids = [int(c) for c in (default_segment_class_ids() if class_ids is None else class_ids)]
        self.k = pipeline.config.fusion.k
        self.ranking = ranking if ranking is not None else TopK(self.class_ids, self.k)
        # per class, videos by video score; an entry's "start" holds the video's number of
        # full windows, so this state merges and persists like the rankings themselves
        self.fallback = TopK(self.class_ids, self.k) if fallback else None
        self.expansion: ExpansionCut | None = None
        self._backends = list(backends)

    @classmethod
    def from_artifacts(cls, artifacts: str | os.PathLike, video: str | None = None,
                       segment: str | None = None, backend: str = "onnxruntime",
                       config: PipelineConfig | None = None, backend_options: dict | None = None,
                       **engine_options) -> Engine:
        """An engine over exported artifacts (:func:`artifact_paths`) on ``backend``."""
        from modloc.engine.runtime.backends import open_backend

        video_path, segment_path = artifact_paths(artifacts, video, segment)
        video_backend = open_backend(video_path, backend, **(backend_options or {}))
        segment_backend = open_backend(segment_path, backend, **(backend_options or {}))
        for path, loaded, kind in ((video_path, video_backend, "video"),
                                   (segment_path, segment_backend, "segment")):
            if loaded.kind != kind:
                raise ValueError(f"{path} holds a {loaded.kind}-level model where a {kind}-level "
                                 f"one is expected")
        pipeline = Pipeline(ScoringModel.from_backend(video_backend),
                            ScoringModel.from_backend(segment_backend), config or PipelineConfig())
        return cls(pipeline, backends=(video_backend, segment_backend), **engine_options)

    @property
    def backends(self) -> tuple:
        """The backends the engine loaded and owns (video-level, segment-level), for
        callers that serve the same models another way (the KServe endpoint)."""
        return tuple(self._backends)

    def localize(self, videos: Sequence[Video], orders: Sequence[int] | None = None,
                 rank: bool = True) -> list[VideoLocalization]:
        """Stages 1–3 on ``videos``, then (``rank``) their pairs into the rankings.

        ``orders``: each video's tie key (default: the order the engine sees them).
        """
        results = self.pipeline.localize(videos)
        if rank:
            self.rank(results, orders)
        return results

    def rank(self, results: Sequence[VideoLocalization], orders: Sequence[int] | None = None) -> None:
        """Stage 4: add localized videos to the per-class rankings."""
        if orders is not None and len(orders) != len(results):
            raise ValueError(f"{len(orders)} orders for {len(results)} videos")
        for result in results:  # all or nothing: a refused id leaves the rankings as they were
            check_rankable_id(result.video_id)
        if self.expansion is not None and orders is None:
            raise ValueError("the expansion cut names videos by their order: give every video's")
        include_partial = self.pipeline.config.fusion.include_partial
        for row, result in enumerate(results):
            order = None if orders is None else int(orders[row])
            starts, class_ids, values = result.ranking_pairs(include_partial)
            if self.expansion is not None:
                keep = self.expansion.allowed(order, class_ids, starts)
                starts, class_ids, values = starts[keep], class_ids[keep], values[keep]
            self.ranking.add(result.video_id, starts, class_ids, values, order=order)
            if self.fallback is not None:
                # the reference fills from a video-level file of each video's top 1000 classes
                top = np.argsort(-result.video_scores, kind="stable")[:FALLBACK_CLASSES_PER_VIDEO]
                full_windows = np.full(len(top), result.num_frames // SEGMENT_FRAMES)
                self.fallback.add(result.video_id, full_windows, result.video_class_ids[top],
                                  result.video_scores[top].astype(np.float64), order=order)

    def rankings(self) -> dict[int, list[str]]:
        """Class id → up to ``k`` segment ids, best first (with the fallback fill if on)."""
        rows = self.ranking.rankings()
        if self.fallback is None:
            return rows
        for class_id, segments in rows.items():
            if len(segments) >= self.k:
                continue
            present = set(segments)
            for video_id, full_windows, _ in self.fallback.ranking(class_id):
                for window in range(full_windows):
                    segment = segment_id(video_id, window * SEGMENT_FRAMES)
                    if segment not in present:
                        segments.append(segment)
                        present.add(segment)
                        if len(segments) == self.k:
                            break
                if len(segments) == self.k:
                    break
        return rows

    def write_submission(self, path: str | os.PathLike) -> Path:
        """The Kaggle CSV of the current rankings (one row per ranked class)."""
        write_submission(path, self.rankings(), class_ids=self.class_ids, max_segments=self.k)
        return Path(path)

    def close(self) -> None:
        for backend in self._backends:
            backend.close()
        self._backends = []

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["DEFAULT_VARIANT", "Engine", "artifact_paths"]
