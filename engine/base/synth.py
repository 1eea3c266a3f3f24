"""A synthetic YouTube-8M-format dataset with a known answer (``modloc synth``).

The real dataset (1.5 TB) is out of reach, so the demo, the tests and the benchmarks run on
data generated here: real-format frame-level TFRecords whose truth is known.

How a video is made
-------------------
- **Classes.** ``segment_classes`` ids are taken from the 1000 segment-rated classes (in
  ``segment_label_ids.csv`` order) and ``extra_classes`` more from the rest of the 3862
  vocabulary (video-level only, never rated, as in the real data). Classes are grouped into
  ``verticals``; a class prototype is a shared vertical component plus its own, for RGB
  (1024-d) and audio (128-d), so classes of one vertical are confusable. Popularity is
  long-tailed (Zipf with ``popularity_exponent``).
- **Labels.** ``1 + Poisson(labels_per_video - 1)`` distinct true classes per video, drawn
  by popularity.
- **Where a class shows.** Each true class is present in 1..``max_runs`` contiguous runs of
  5-second segments covering a ``presence`` fraction of the video (drawn per class and video
  from ``[min_presence, max_presence]``): localization is a real task, and giving every
  segment its video's score (the "dummy" prediction) is beatable.
- **Frames** (1 per second, ``min_frames``..``max_frames`` per video):
  ``x_t = style_v + Σ_c w_ct · signal · prototype_c + noise · ε_t`` with ``w_ct = 1`` in the
  class's segments and ``context`` elsewhere (a labelled class leaves a weak trace all over
  its video), a per-video style vector of scale ``style``, white noise ``ε``; then clipped and
  quantized exactly like YouTube-8M (:func:`modloc.engine.base.features.quantize`).

Splits (as in the real data)
----------------------------
- ``train``: video-level labels only, noisy: each true label is missed with probability
  ``missed_label_rate``, and ``Poisson(spurious_labels)`` spurious labels are added.
- ``validate``: the same noisy video labels, plus rated segments (the small clean split).
- ``test``: features with no labels at all; the truth is written separately to
  ``test_truth/`` with the same context keys as ``validate`` (clean video labels and rated
  segments, no frames), so ``modloc eval --labels`` reads both alike.

Rating policy (``validate`` and the ``test`` truth)
---------------------------------------------------
Ratings are made on full 5-second segments, one rated class per segment (as in the 2019
data), only for segment classes:

- for each true class, up to ``positive_ratings_per_class`` segments where it shows
  (score 1) and up to ``negative_ratings_per_class`` segments of the same video where it
  does not (score 0): *which segments of a labelled video show the class*;
- for each spurious label of the video, and for one class of the same vertical as a true
  class that the video does not have, ``absent_class_ratings`` segments rated 0: *classes
  the video does not have*.

Determinism and scale
---------------------
Every shard is generated from its own seed (derived from ``seed``, the split and the shard
index), one video at a time, and written as it is made: memory stays bounded whatever the
size, and the bytes do not depend on ``workers``. ``synth.json`` records the configuration,
the class lists and the counts.

Writing into an existing directory
----------------------------------
A split that is generated replaces that split: before its shards are written, the shard
files an earlier run left in its directory (``<split>/<split>NNNN.tfrecord`` and, for
``test``, ``test_truth/testNNNN.tfrecord``, with their ``.tmp`` leftovers) are deleted, so
a run with fewer shards leaves none of the old ones behind to be read as duplicate videos.
Only names this generator writes are touched: any other file stays, and splits not
generated in this run are left as they are.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from modloc.engine.base.features import SEGMENT_FRAMES, quantize
from modloc.engine.base.io.examples import FEATURE_SIZE, RGB_SIZE, Video, encode_truth, encode_video
from modloc.engine.base.io.tfrecord import TFRecordWriter
from modloc.engine.base.vocab import NUM_VIDEO_CLASSES, default_segment_class_ids

SPLITS = ("train", "validate", "test")
_ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
_ID_LENGTH = 5
_ID_SPACE = len(_ID_ALPHABET) ** _ID_LENGTH
_ID_STRIDE = 7_368_787  # coprime with 36**5: index → id is a bijection that looks shuffled
_ID_PREFIX = {"train": "r", "validate": "v", "test": "t"}


@dataclass(frozen=True)
class SynthConfig:
    """Every knob of the generator; the defaults are the ``demo`` preset."""

    seed: int = 0
    train_videos: int = 1500
    validate_videos: int = 300
    test_videos: int = 300
    videos_per_shard: int = 250
    segment_classes: int = 40
    extra_classes: int = 40
    verticals: int = 8
    popularity_exponent: float = 1.0
    labels_per_video: float = 3.0
    min_frames: int = 60
    max_frames: int = 300
    min_presence: float = 0.15
    max_presence: float = 0.6
    max_runs: int = 2
    signal: float = 0.55
    vertical_share: float = 0.5
    context: float = 0.2
    style: float = 0.3
    noise: float = 0.65
    missed_label_rate: float = 0.15
    spurious_labels: float = 0.3
    positive_ratings_per_class: int = 2
    negative_ratings_per_class: int = 1
    absent_class_ratings: int = 1

    def __post_init__(self) -> None:
        problems = []
        for name in ("train_videos", "validate_videos", "test_videos"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        if self.videos_per_shard < 1:
            problems.append("videos_per_shard must be >= 1")
        if not 1 <= self.segment_classes <= 1000:
            problems.append("segment_classes must be in [1, 1000]")
        if not 0 <= self.extra_classes <= NUM_VIDEO_CLASSES - 1000:
            problems.append(f"extra_classes must be in [0, {NUM_VIDEO_CLASSES - 1000}]")
        if not 1 <= self.min_frames <= self.max_frames:
            problems.append("need 1 <= min_frames <= max_frames")
        if not 0 < self.min_presence <= self.max_presence <= 1:
            problems.append("need 0 < min_presence <= max_presence <= 1")
        if self.labels_per_video < 1:
            problems.append("labels_per_video must be >= 1")
        if self.verticals < 1 or self.max_runs < 1:
            problems.append("verticals and max_runs must be >= 1")
        for name in ("missed_label_rate", "vertical_share", "context"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} must be in [0, 1]")
        # scales and counts: a negative value has no meaning (and `not >= 0` refuses NaN)
        for name in ("popularity_exponent", "signal", "style", "noise", "spurious_labels",
                     "positive_ratings_per_class", "negative_ratings_per_class", "absent_class_ratings"):
            if not getattr(self, name) >= 0:
                problems.append(f"{name} must be >= 0")
        if problems:
            raise ValueError("invalid synthetic dataset config: " + "; ".join(problems))

    def videos(self, split: str) -> int:
        return getattr(self, f"{split}_videos")

    def shards(self, split: str) -> int:
        return max(1, math.ceil(self.videos(split) / self.videos_per_shard))


PRESETS: dict[str, SynthConfig] = {
    "tiny": SynthConfig(train_videos=48, validate_videos=24, test_videos=24, videos_per_shard=16,
                        segment_classes=12, extra_classes=6, verticals=3, min_frames=8,
                        max_frames=40),
    "demo": SynthConfig(),
    "bench": SynthConfig(train_videos=20_000, validate_videos=2_000, test_videos=2_000,
                         videos_per_shard=500, segment_classes=100, extra_classes=100,
                         verticals=12),
    "large": SynthConfig(train_videos=100_000, validate_videos=10_000, test_videos=10_000,
                         videos_per_shard=1_000, segment_classes=1000, extra_classes=1000,
                         verticals=25),
}


@dataclass(frozen=True)
class ClassSpace:
    """The synthetic world: class ids, popularity, verticals and prototypes."""

    class_ids: np.ndarray  # (C,) vocabulary ids; the first `segment_classes` are rated
    segment_classes: int
    popularity: np.ndarray  # (C,) float64, sums to 1
    vertical: np.ndarray  # (C,) int
    prototypes: np.ndarray  # (C, 1152) float32

    def is_segment_class(self, position: int) -> bool:
        return position < self.segment_classes


def build_class_space(config: SynthConfig) -> ClassSpace:
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0xC1A55]))
    segment_ids = default_segment_class_ids()[: config.segment_classes]
    other = np.setdiff1d(np.arange(NUM_VIDEO_CLASSES), default_segment_class_ids())
    extra_ids = np.sort(rng.choice(other, size=config.extra_classes, replace=False))
    class_ids = np.concatenate([segment_ids, extra_ids]).astype(np.int64)
    count = len(class_ids)
    # Popularity ranks are shuffled so that rated and video-only classes both span the tail.
    ranks = rng.permutation(count)
    popularity = 1.0 / (ranks + 1.0) ** config.popularity_exponent
    popularity /= popularity.sum()
    vertical = rng.integers(0, config.verticals, size=count)
    vertical_protos = rng.standard_normal((config.verticals, FEATURE_SIZE))
    own_protos = rng.standard_normal((count, FEATURE_SIZE))
    share = config.vertical_share
    prototypes = math.sqrt(share) * vertical_protos[vertical] + math.sqrt(1 - share) * own_protos
    # Each class leans on one modality more than the other, as real concepts do.
    rgb_weight = rng.uniform(0.6, 1.0, size=(count, 1))
    audio_weight = rng.uniform(0.3, 1.0, size=(count, 1))
    prototypes[:, :RGB_SIZE] *= rgb_weight
    prototypes[:, RGB_SIZE:] *= audio_weight
    return ClassSpace(class_ids, config.segment_classes, popularity, vertical,
                      prototypes.astype(np.float32))


def video_id(split: str, index: int) -> str:
    """A unique, shuffled-looking id: a split letter (r, v, t) + 5 base-36 characters."""
    if not 0 <= index < _ID_SPACE:
        raise ValueError(f"video index {index} outside [0, {_ID_SPACE})")
    value = (index * _ID_STRIDE + 12_345) % _ID_SPACE
    chars = []
    for _ in range(_ID_LENGTH):
        value, digit = divmod(value, len(_ID_ALPHABET))
        chars.append(_ID_ALPHABET[digit])
    return _ID_PREFIX[split] + "".join(reversed(chars))


@dataclass
class SyntheticVideo:
    """A generated video and its truth."""

    video: Video  # what goes into the split's records (labels as that split has them)
    true_positions: np.ndarray  # (T,) positions in the class space of the true classes
    presence: np.ndarray  # (T, S) bool: class t shows in segment s (S = ceil(M / 5))


def _runs(rng: np.random.Generator, segments: int, fraction: float, max_runs: int) -> np.ndarray:
    """(segments,) bool with ~fraction of them set, in 1..max_runs contiguous runs."""
    present = np.zeros(segments, dtype=bool)
    total = max(1, round(fraction * segments))
    runs = int(rng.integers(1, max_runs + 1))
    lengths = np.maximum(1, np.diff(np.linspace(0, total, runs + 1).round().astype(int)))
    for length in lengths:
        length = min(int(length), segments)
        start = int(rng.integers(0, segments - length + 1))
        present[start : start + length] = True
    return present


def _sample_classes(rng: np.random.Generator, popularity: np.ndarray, count: int,
                    exclude: np.ndarray | None = None) -> np.ndarray:
    weights = popularity.copy()
    if exclude is not None and len(exclude):
        weights[exclude] = 0.0
    available = int(np.count_nonzero(weights))
    count = min(count, available)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    return rng.choice(len(popularity), size=count, replace=False, p=weights / weights.sum())


def _rate(rng: np.random.Generator, config: SynthConfig, space: ClassSpace,
          true_positions: np.ndarray, presence: np.ndarray, spurious: np.ndarray,
          full_segments: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rated (class id, start time, score) triples, one class per segment (module docstring)."""
    free = np.ones(full_segments, dtype=bool)
    classes, starts, scores = [], [], []

    def take(candidates: np.ndarray, count: int, position: int, score: float) -> None:
        candidates = candidates[free[candidates]]
        for segment in rng.permutation(candidates)[:count]:
            free[segment] = False
            classes.append(int(space.class_ids[position]))
            starts.append(int(segment) * SEGMENT_FRAMES)
            scores.append(score)

    all_segments = np.arange(full_segments)
    for row, position in enumerate(true_positions):
        if not space.is_segment_class(position):
            continue
        shows = presence[row, :full_segments]
        take(all_segments[shows], config.positive_ratings_per_class, position, 1.0)
        take(all_segments[~shows], config.negative_ratings_per_class, position, 0.0)
    absent = list(spurious)
    for position in true_positions:
        same_vertical = np.flatnonzero(
            (space.vertical == space.vertical[position])
            & (np.arange(len(space.class_ids)) < space.segment_classes)
        )
        same_vertical = np.setdiff1d(same_vertical, true_positions)
        if len(same_vertical):
            absent.append(int(rng.choice(same_vertical)))
            break
    for position in dict.fromkeys(absent):
        if space.is_segment_class(position) and position not in true_positions:
            take(all_segments, config.absent_class_ratings, position, 0.0)
    order = np.argsort(starts, kind="stable")
    return (np.asarray(classes, np.int64)[order], np.asarray(starts, np.int64)[order],
            np.asarray(scores, np.float32)[order])


def generate_video(rng: np.random.Generator, config: SynthConfig, space: ClassSpace,
                   split: str, index: int) -> SyntheticVideo:
    """One video of ``split`` (see the module docstring for the model)."""
    num_frames = int(rng.integers(config.min_frames, config.max_frames + 1))
    segments = -(-num_frames // SEGMENT_FRAMES)
    label_count = 1 + int(rng.poisson(config.labels_per_video - 1))
    true_positions = np.sort(_sample_classes(rng, space.popularity, label_count))
    presence = np.stack([
        _runs(rng, segments, rng.uniform(config.min_presence, config.max_presence), config.max_runs)
        for _ in true_positions
    ])
    frame_weights = np.where(presence, 1.0, config.context).astype(np.float32)
    frame_weights = np.repeat(frame_weights, SEGMENT_FRAMES, axis=1)[:, :num_frames]  # (T, M)
    signal = config.signal * (frame_weights.T @ space.prototypes[true_positions])  # (M, 1152)
    style = config.style * rng.standard_normal(FEATURE_SIZE, dtype=np.float32)
    noise = config.noise * rng.standard_normal((num_frames, FEATURE_SIZE), dtype=np.float32)
    features = quantize(signal + style + noise)

    kept = true_positions[rng.random(len(true_positions)) >= config.missed_label_rate]
    spurious = _sample_classes(rng, space.popularity, int(rng.poisson(config.spurious_labels)),
                               exclude=true_positions)
    noisy_labels = np.sort(space.class_ids[np.concatenate([kept, spurious])])
    true_labels = np.sort(space.class_ids[true_positions])

    rated = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    if split != "train":
        rated = _rate(rng, config, space, true_positions, presence, spurious,
                      num_frames // SEGMENT_FRAMES)
    video = Video(
        id=video_id(split, index),
        features=features,
        labels=true_labels if split == "test" else noisy_labels,
        segment_labels=rated[0],
        segment_start_times=rated[1],
        segment_end_times=rated[1] + SEGMENT_FRAMES,
        segment_scores=rated[2],
    )
    return SyntheticVideo(video, true_positions, presence)


def iter_split(config: SynthConfig, split: str, shard: int,
               space: ClassSpace | None = None) -> Iterator[SyntheticVideo]:
    """The videos of one shard of one split, deterministic for the config."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")
    space = space if space is not None else build_class_space(config)
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, SPLITS.index(split), shard]))
    first = shard * config.videos_per_shard
    last = min(config.videos(split), first + config.videos_per_shard)
    for index in range(first, last):
        yield generate_video(rng, config, space, split, index)


@dataclass
class ShardSummary:
    split: str
    shard: int
    paths: list[str]
    videos: int = 0
    frames: int = 0
    labels: int = 0
    rated_segments: int = 0
    positive_segments: int = 0


def shard_path(out_dir: Path, split: str, shard: int) -> Path:
    return out_dir / split / f"{split}{shard:04d}.tfrecord"


def truth_path(out_dir: Path, shard: int) -> Path:
    return out_dir / "test_truth" / f"test{shard:04d}.tfrecord"


def _old_shards(out_dir: Path, split: str) -> list[Path]:
    """The files an earlier run wrote for ``split`` (:func:`shard_path`, :func:`truth_path`),
    by their exact names: nothing else in those directories matches."""
    places = [(out_dir / split, split)]
    if split == "test":
        places.append((out_dir / "test_truth", "test"))
    found = []
    for directory, stem in places:
        pattern = re.compile(rf"{stem}[0-9]{{4,}}\.tfrecord(?:\.tmp)?")
        if directory.is_dir():
            found += [path for path in directory.iterdir()
                      if pattern.fullmatch(path.name) and path.is_file()]
    return sorted(found)


def write_shard(config: SynthConfig, out_dir: str | os.PathLike, split: str, shard: int) -> ShardSummary:
    """Generate and write one shard (and, for ``test``, its truth file)."""
    out_dir = Path(out_dir)
    path = shard_path(out_dir, split, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = ShardSummary(split, shard, [str(path)])
    truth_writer = None
    if split == "test":
        truth_file = truth_path(out_dir, shard)
        truth_file.parent.mkdir(parents=True, exist_ok=True)
        summary.paths.append(str(truth_file))
        truth_writer = TFRecordWriter(truth_file)
    try:
        with TFRecordWriter(path) as writer:
            for item in iter_split(config, split, shard):
                video = item.video
                writer.write(encode_video(video, include_labels=split != "test"))
                if truth_writer is not None:
                    truth_writer.write(encode_truth(video))
                summary.videos += 1
                summary.frames += video.num_frames
                summary.labels += len(video.labels)
                summary.rated_segments += len(video.segment_labels)
                summary.positive_segments += int(np.count_nonzero(video.segment_scores == 1.0))
    except BaseException:
        if truth_writer is not None:
            truth_writer.abort()
        raise
    if truth_writer is not None:
        truth_writer.close()
    return summary


@dataclass
class SynthResult:
    out_dir: str
    config: SynthConfig
    splits: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"out_dir": self.out_dir, "config": asdict(self.config), "splits": self.splits}


def generate(config: SynthConfig, out_dir: str | os.PathLike, workers: int = 1,
             splits: tuple[str, ...] = SPLITS,
             progress: Callable[[ShardSummary], None] | None = None) -> SynthResult:
    """Write every shard of ``splits`` under ``out_dir`` and ``synth.json`` beside them.

    Shards are independent, so ``workers`` processes write them in parallel; the bytes are
    the same for any ``workers``. The shard files an earlier run wrote for ``splits`` are
    deleted first (module docstring, "Writing into an existing directory").
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in splits:
        for path in _old_shards(out_dir, split):
            path.unlink()
    jobs = [(split, shard) for split in splits for shard in range(config.shards(split))
            if config.videos(split) > 0]
    summaries: list[ShardSummary] = []
    if workers <= 1:
        for split, shard in jobs:
            summaries.append(write_shard(config, out_dir, split, shard))
            if progress:
                progress(summaries[-1])
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(write_shard, config, out_dir, split, shard) for split, shard in jobs]
            for future in futures:
                summaries.append(future.result())
                if progress:
                    progress(summaries[-1])
    result = SynthResult(str(out_dir), config)
    for split in splits:
        totals = {"shards": 0, "videos": 0, "frames": 0, "labels": 0, "rated_segments": 0,
                  "positive_segments": 0}
        for summary in summaries:
            if summary.split == split:
                totals["shards"] += 1
                for key in ("videos", "frames", "labels", "rated_segments", "positive_segments"):
                    totals[key] += getattr(summary, key)
        result.splits[split] = totals
    space = build_class_space(config)
    manifest = {
        **result.to_json(),
        "segment_class_ids": space.class_ids[: space.segment_classes].tolist(),
        "extra_class_ids": space.class_ids[space.segment_classes :].tolist(),
        "layout": {
            "train": "train/train*.tfrecord",
            "validate": "validate/validate*.tfrecord",
            "test": "test/test*.tfrecord",
            "test_truth": "test_truth/test*.tfrecord",
        },
    }
    (out_dir / "synth.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return result


def config_from(preset: str = "demo", **overrides) -> SynthConfig:
    """A preset with some fields replaced (``None`` values are ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: expected one of {sorted(PRESETS)}")
    known = {f.name for f in fields(SynthConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown synth parameters: {sorted(unknown)}")
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
