"""The localizer: the pipeline (stages 1–3) and the rankings (stage 4) over exported models.

::

    localizer = Localizer.from_artifacts("runs/demo/export", backend="onnxruntime")
    results = localizer.localize(videos)             # per video: candidates, fused window scores
    localizer.rankings.rows()                        # class id → best segment ids (stage 4)
    localizer.rankings.write_submission("out.csv")   # the Kaggle CSV

Stages 1–3 are :class:`~modloc.engine.runtime.pipeline.Pipeline`; stage 4 is
:class:`~modloc.engine.runtime.rankings.Rankings` (in memory, or durable for the service).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from modloc.engine.base.io.examples import Video
from modloc.engine.runtime.pipeline import (
    Pipeline,
    PipelineConfig,
    ScoringModel,
    VideoLocalization,
)
from modloc.engine.runtime.rankings import Rankings, RedisSettings
from modloc.engine.runtime.topk import StatePolicy

DEFAULT_VARIANT = "distill-fp32"


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


def ranking_settings(video_backend, segment_backend, config: PipelineConfig) -> dict:
    """What decides the fused scores that fill durable rankings: each model (its ONNX
    graph's sha256, graph and precision) and the fusion settings. The state directory
    records them, and refuses a restart that would mix in scores made otherwise."""
    fusion = config.fusion

    def model(backend) -> dict:
        artifact = backend.artifact
        return {"onnx_sha256": artifact.manifest["onnx"]["sha256"],
                "variant": f"{artifact.graph}-{artifact.precision}"}

    return {"video_model": model(video_backend), "segment_model": model(segment_backend),
            "top_n": fusion.top_n, "video_exponent": fusion.video_exponent,
            "segment_exponent": fusion.segment_exponent, "max_frames": config.max_frames}


class Localizer:
    """Localizes videos and ranks them.

    Args:
        pipeline: stages 1–3.
        rankings: stage 4 (default: new in-memory :class:`Rankings` of the 1000 segment
            classes with the pipeline's ``k`` and ``include_partial``).
        backends: backends the localizer owns and closes.
    """

    def __init__(self, pipeline: Pipeline, rankings: Rankings | None = None,
                 backends: Sequence = ()):
        fusion = pipeline.config.fusion
        self.pipeline = pipeline
        self.rankings = rankings if rankings is not None else Rankings(
            k=fusion.k, include_partial=fusion.include_partial)
        if (self.rankings.k, self.rankings.include_partial) != (fusion.k, fusion.include_partial):
            raise ValueError(f"the rankings keep k={self.rankings.k} (include_partial="
                             f"{self.rankings.include_partial}), the pipeline fuses for k={fusion.k} "
                             f"(include_partial={fusion.include_partial})")
        self._backends = list(backends)

    @classmethod
    def from_artifacts(cls, artifacts: str | os.PathLike, video: str | None = None,
                       segment: str | None = None, backend: str = "onnxruntime",
                       config: PipelineConfig | None = None, backend_options: dict | None = None,
                       class_ids: Sequence[int] | None = None, fallback: bool = False,
                       state_dir: str | os.PathLike | None = None,
                       redis: RedisSettings | None = None,
                       state_policy: StatePolicy | None = None) -> Localizer:
        """A localizer over exported artifacts (:func:`artifact_paths`) on ``backend``.

        ``class_ids``, ``fallback`` and ``state_dir`` (durable rankings, opened with
        ``state_policy``; the directory records the :func:`ranking_settings` that fill it)
        or ``redis`` (shared ones) make its :class:`Rankings`.
        """
        from modloc.engine.runtime.backends import open_backend

        config = config or PipelineConfig()
        video_path, segment_path = artifact_paths(artifacts, video, segment)
        opened = []
        try:
            for path, kind in ((video_path, "video"), (segment_path, "segment")):
                opened.append(open_backend(path, backend, **(backend_options or {})))
                if opened[-1].kind != kind:
                    raise ValueError(f"{path} holds a {opened[-1].kind}-level model where a "
                                     f"{kind}-level one is expected")
            pipeline = Pipeline(ScoringModel.from_backend(opened[0]),
                                ScoringModel.from_backend(opened[1]), config)
            settings = ranking_settings(opened[0], opened[1], config) if state_dir is not None else None
            rankings = Rankings(class_ids, config.fusion.k, include_partial=config.fusion.include_partial,
                                fallback=fallback, directory=state_dir, redis=redis,
                                settings=settings, policy=state_policy)
        except BaseException:
            for loaded in opened:
                loaded.close()
            raise
        return cls(pipeline, rankings, backends=opened)

    @property
    def backends(self) -> tuple:
        """The backends the localizer loaded and owns (video-level, segment-level), for
        callers that serve the same models another way (the KServe endpoint)."""
        return tuple(self._backends)

    def localize(self, videos: Sequence[Video], orders: Sequence[int] | None = None,
                 rank: bool = True) -> list[VideoLocalization]:
        """Stages 1–3 on ``videos``, then (``rank``) stage 4 (:meth:`Rankings.add_all`).

        ``orders``: each video's tie key (default: the order the rankings see them).
        """
        results = self.pipeline.localize(videos)
        if rank:
            self.rankings.add_all(results, orders)
        return results

    def close(self) -> None:
        for backend in self._backends:
            backend.close()
        self._backends = []
        self.rankings.close()

    def __enter__(self) -> Localizer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["DEFAULT_VARIANT", "Localizer", "artifact_paths", "ranking_settings"]
