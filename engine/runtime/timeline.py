"""``modloc show``: one video's localization as a PNG timeline.

Rows are the video's candidate classes (vocabulary name, class id and the video score
``P_vid``, labelled as such), columns its 5-second segments, colour the fused score
``P_vid^a · P_seg^b``; a candidate the segment model does not score is a grey row. Known
ratings (``--truth``, or the ratings the record carries) are marked on their cell: a white
dot for a positive rating, a red cross for a negative one, explained by a legend below the
plot (never over its cells); a rated class that is not a candidate gets a row of its own
below a rule, so a miss of stage 1 is visible too.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from modloc.engine.base.atomic import write_atomically
from modloc.engine.base.features import SEGMENT_FRAMES
from modloc.engine.base.io.examples import Video
from modloc.engine.base.io.readers import read_videos
from modloc.engine.base.io.tfrecord import Patterns
from modloc.engine.base.vocab import Vocabulary, default_vocabulary
from modloc.engine.runtime.pipeline import VideoLocalization


def find_video(video_id: str, patterns: Patterns) -> Video:
    """The first record of ``patterns`` with id ``video_id`` (files in sorted order)."""
    for video in read_videos(patterns, require_frames=True):
        if video.id == video_id:
            return video
    raise ValueError(f"no video {video_id!r} in {patterns}")


def ratings_of(video_id: str, records: Iterable[Video]) -> dict[tuple[int, int], float]:
    """``(class id, start) → rating`` of ``video_id`` gathered from rated records."""
    ratings: dict[tuple[int, int], float] = {}
    for record in records:
        if record.id == video_id:
            for label, start, score in zip(record.segment_labels.tolist(), record.segment_start_times.tolist(),
                                           record.segment_scores.tolist(), strict=True):
                ratings[(int(label), int(start))] = float(score)
    return ratings


def render_timeline(result: VideoLocalization, path: str | os.PathLike,
                    ratings: dict[tuple[int, int], float] | None = None,
                    vocabulary: Vocabulary | None = None, title: str | None = None) -> Path:
    """Write the timeline PNG of one localized video; returns its path."""
    png = io.BytesIO()
    # "tight": the figure grows to hold the legend below the plot
    timeline_figure(result, ratings, vocabulary, title).savefig(png, format="png", dpi=110,
                                                                bbox_inches="tight")
    write_atomically(path, png.getvalue())
    return Path(path)


def timeline_figure(result: VideoLocalization, ratings: dict[tuple[int, int], float] | None = None,
                    vocabulary: Vocabulary | None = None, title: str | None = None):
    """The timeline of one localized video as a matplotlib Figure (module doc)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("modloc show draws with matplotlib: pip install matplotlib "
                          "(or modloc[train])") from None
    vocabulary = vocabulary or default_vocabulary()
    ratings = ratings or {}
    candidates = [int(c) for c in result.candidate_ids]
    extra = sorted({label for label, _ in ratings} - set(candidates))
    rows = candidates + extra
    column_of = {int(start): column for column, start in enumerate(result.window_starts.tolist())}
    heat = np.full((len(rows), len(result.window_starts)), np.nan)
    heat[: len(candidates)] = result.fused.T

    figure = Figure(figsize=(max(6.0, 0.35 * len(column_of) + 4.0), 0.32 * len(rows) + 1.6),
                    tight_layout=True)
    axes = figure.subplots()
    cmap = _colormap()
    image = axes.imshow(np.ma.masked_invalid(heat), aspect="auto", cmap=cmap, vmin=0.0, vmax=1.0,
                        interpolation="nearest")
    figure.colorbar(image, ax=axes, fraction=0.03, pad=0.01, label="fused score")
    for positive, style in ((True, {"marker": "o", "c": "white", "edgecolors": "black"}),
                            (False, {"marker": "x", "c": "red"})):
        points = [(column_of[start], rows.index(label)) for (label, start), score in ratings.items()
                  if start in column_of and (score > 0) == positive]
        if points:
            xs, ys = zip(*points, strict=True)
            axes.scatter(xs, ys, s=28, linewidths=1.2, **style,
                         label="rated positive" if positive else "rated negative")
    if extra:
        axes.axhline(len(candidates) - 0.5, color="black", linewidth=1.2)
    labels = [f"{vocabulary.name(c)[:28]} ({c}) P_vid {result.candidate_scores[i]:.2f}"
              for i, c in enumerate(candidates)]
    labels += [f"{vocabulary.name(c)[:28]} ({c}) not a candidate" for c in extra]
    axes.set_yticks(range(len(rows)), labels, fontsize=7)
    axes.set_ylabel("candidate class (id), video score P_vid", fontsize=8)
    ticks = list(range(0, len(result.window_starts), max(1, len(result.window_starts) // 20)))
    axes.set_xticks(ticks, [str(int(result.window_starts[t])) for t in ticks], fontsize=7)
    axes.set_xlabel(f"segment start (s); {SEGMENT_FRAMES}-second segments")
    axes.set_title(title or f"video {result.video_id}: {result.num_frames} s, "
                   f"{len(candidates)} candidates", fontsize=9)
    if ratings:  # below the plot: a legend inside would cover cells
        axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=7,
                    frameon=False)
    return figure


def _colormap():
    from matplotlib import colormaps

    return colormaps["viridis"].with_extremes(bad="#d9d9d9")  # grey: a candidate the segment model does not score


def show(video_id: str, artifacts: str | os.PathLike, data: Patterns, out: str | os.PathLike,
         truth: Patterns | None = None, **engine_options) -> dict:
    """Localize one video of ``data`` with the artifacts and draw its timeline to ``out``.

    ``engine_options`` go to :meth:`modloc.engine.runtime.localizer.Localizer.from_artifacts` (variants,
    backend, pipeline config). Returns a summary: the candidates and the best segments.
    """
    from modloc.engine.runtime.localizer import Localizer

    video = find_video(video_id, data)
    ratings = ratings_of(video_id, read_videos(truth)) if truth is not None else ratings_of(video_id, [video])
    with Localizer.from_artifacts(artifacts, **engine_options) as localizer:
        result = localizer.localize([video], rank=False)[0]
    path = render_timeline(result, out, ratings)
    return {"video": video_id, "frames": result.num_frames, "png": str(path),
            "candidates": [{"class": int(c), "video_score": float(s),
                            "best_segments": result.segments(int(c))[:3]}
                           for c, s in zip(result.candidate_ids, result.candidate_scores, strict=True)],
            "ratings": len(ratings)}


__all__ = ["find_video", "ratings_of", "render_timeline", "show", "timeline_figure"]
