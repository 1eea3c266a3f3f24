"""``modloc infer``: TFRecords through the engine, offline, into a Kaggle submission.

::

    modloc infer runs/demo/export --data 'test/*.tfrecord' --out submission.csv \\
        --truth 'test_truth/*.tfrecord'
    torchrun --nproc-per-node 3 -m modloc infer …     # the same, sharded by file

Files are read in sorted order; under torchrun each rank reads every N-th file
(:mod:`modloc.engine.runtime.distributed`), ranks its videos with their global (file, record) order as
the tie key, and rank 0 merges the shards' top-K states into exactly the single-process
rankings and writes the CSV, byte for byte the same.

MAP@K is reported when ratings exist: from ``--truth`` files, or else from the segment
ratings the data records carry themselves (a ``validate`` split); truth files that rate
few of the localized videos are refused (:func:`modloc.engine.base.scoring.check_overlap`).

With ``video_predictions`` the video-level predictions are written too, in the starter
code's format (``VideoId,LabelConfidencePairs``: each video's top-N candidate classes and
their video scores, REFERENCE §7 step 1), in the files' order under torchrun as well;
``modloc eval --predictions`` scores it against video labels.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence

import numpy as np

from modloc.engine.base.io.examples import Video
from modloc.engine.base.io.readers import read_videos
from modloc.engine.base.io.tfrecord import Patterns, count_records, expand_paths
from modloc.engine.base.metrics import SegmentTruth, segment_map
from modloc.engine.base.metrics.segment import VideoRatings
from modloc.engine.base.progress import Progress
from modloc.engine.base.scoring import check_overlap
from modloc.engine.base.submission import check_rankable_id, write_video_predictions
from modloc.engine.runtime.distributed import (
    Shard,
    broadcast,
    finish,
    gather,
    shard_files,
    video_order,
)
from modloc.engine.runtime.expansion import ExpansionCut, entries_of
from modloc.engine.runtime.localizer import Localizer
from modloc.engine.runtime.pipeline import PipelineConfig

log = logging.getLogger(__name__)

CHUNK_VIDEOS = 256  # videos per engine call: large device batches, bounded memory
PREFETCH_CHUNKS = 2  # decoded chunks waiting while the engine works on one


def ordered_chunks(files: list[tuple[int, str]], size: int) -> Iterator[tuple[list[Video], list[int]]]:
    """``(videos, orders)`` chunks of the given files, each video with its global order.

    A record without frames, a video-level record, or a video id that a segment id
    ``'<video id>:<start>'`` cannot carry is refused here, naming its file and record,
    before any work is spent on it (the CSV would otherwise fail only at the very end).
    """
    videos: list[Video] = []
    orders: list[int] = []
    for file_index, path in files:
        # no skip_corrupt: the position in the file is the record index
        for record_index, video in enumerate(read_videos(path, require_frames=True)):
            check_rankable_id(video.id, f"{path}: record {record_index}: ")
            videos.append(video)
            orders.append(video_order(file_index, record_index))
            if len(videos) == size:
                yield videos, orders
                videos, orders = [], []
    if videos:
        yield videos, orders


class Prefetcher:
    """``chunks`` produced by a reader thread ``depth`` ahead (the native decoder releases
    the GIL, so decoding overlaps the models); its errors are raised to the consumer.

    Use it as a context manager: :meth:`close` stops the reader and joins it when the
    consumer stops early (an error, an interrupt). A reader left running inside the native
    decoder while the interpreter exits is torn down mid-call, which aborts the process.
    """

    _DONE = object()

    def __init__(self, chunks: Iterator, depth: int = PREFETCH_CHUNKS):
        self._chunks = chunks
        self._slots: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._produce, name="modloc-reader", daemon=True)
        self.thread.start()

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    chunk = next(self._chunks)
                except StopIteration:
                    self._slots.put(self._DONE)
                    return
                self._slots.put(chunk)
        except BaseException as error:  # handed over to the consumer
            self._slots.put(error)
        finally:
            close = getattr(self._chunks, "close", None)
            if close is not None:  # the reader's files are closed by the thread that reads
                close()

    def __iter__(self) -> Iterator:
        while (item := self._slots.get()) is not self._DONE:
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop the reader after its current chunk and wait for it to end."""
        self._stop.set()
        while self.thread.is_alive():
            try:  # a reader blocked on a full queue is freed by taking its chunk
                self._slots.get(timeout=0.05)
            except queue.Empty:
                pass
        self.thread.join()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _expansion_cut(localizer: Localizer, files: list[tuple[int, str]], chunk_videos: int, shard: Shard,
                   progress: bool | None, description: str) -> ExpansionCut:
    """The first pass of ``--expansion-cut``: every video's candidates (the video model
    alone), gathered from every rank; the cut built on rank 0 and sent to all."""
    ranked = set(localizer.rankings.class_ids)
    parts = []
    with Progress(f"{description} (video scores)", count_records(path for _, path in files), "video",
                  enabled=progress, position=shard.rank) as bar, \
            Prefetcher(ordered_chunks(files, chunk_videos)) as chunks:
        for videos, orders in chunks:
            candidate_ids, candidate_scores = localizer.pipeline.candidates(videos)
            parts.append(entries_of(videos, orders, candidate_ids, candidate_scores, ranked))
            bar.update(len(videos))
    local = np.concatenate(parts) if parts else np.zeros((0, 4))
    gathered = gather(local, shard)
    cut = ExpansionCut.build(np.concatenate(gathered), localizer.rankings.k) if shard.is_root else None
    return broadcast(cut, shard)


def infer(
    artifacts: str | os.PathLike,
    data: Patterns,
    out: str | os.PathLike,
    truth: Patterns | None = None,
    video: str | None = None,
    segment: str | None = None,
    backend: str = "onnxruntime",
    config: PipelineConfig | None = None,
    fallback: bool = False,
    class_ids: Sequence[int] | None = None,
    chunk_videos: int = CHUNK_VIDEOS,
    progress: bool | None = None,
    shard: Shard | None = None,
    backend_options: dict | None = None,
    expansion_cut: bool = False,
    video_predictions: str | os.PathLike | None = None,
    allow_low_overlap: bool = False,
) -> dict | None:
    """Localize every video of ``data`` and write the Kaggle submission ``out``.

    Args:
        artifacts: ``modloc export``'s output (``video/<variant>``, ``segment/<variant>``);
            ``video``/``segment`` pick the variants (default ``distill-fp32``).
        data: frame-level TFRecords.
        out: the submission CSV (written by rank 0).
        truth: segment ratings to score the submission (default: those ``data`` carries).
        backend: ``onnxruntime``, ``torch`` or ``tensorrt``.
        config: batching and fusion settings.
        fallback: REFERENCE §7 step 5 fill of short rankings.
        class_ids: the ranked classes, the CSV's rows (default: the 1000 segment classes).
        chunk_videos: videos per engine call.
        progress: report progress on stderr (:class:`~modloc.engine.base.progress.Progress`;
            False: silent).
        shard: this process's rank (default: from torchrun's environment).
        expansion_cut: apply REFERENCE §7 step 3's expansion cut (:mod:`modloc.engine.runtime.expansion`),
            as the reference submission did: every video is first scored by the video model
            alone (the files are read twice, the video model runs twice), then localized.
        video_predictions: also write the video-level prediction file here (module doc).
        allow_low_overlap: score ``truth`` files that rate few of the videos, with a
            warning, instead of refusing them.

    Returns:
        The report on rank 0 (``videos``, ``windows``, rates, ``submission``, ``map`` when
        ratings exist, per-stage seconds); None on the other ranks.
    """
    shard = shard or Shard.from_environment()
    files = expand_paths(data)
    mine = shard_files(files, shard)
    started = time.perf_counter()
    ratings: list[VideoRatings] = []
    localized: list[str] = []  # the video ids, for the overlap with --truth
    predicted: list[tuple] = []  # per chunk: (orders, video ids, candidate ids, scores)
    with Localizer.from_artifacts(artifacts, video, segment, backend, config,
                                  backend_options=backend_options, class_ids=class_ids,
                                  fallback=fallback) as localizer:
        rankings = localizer.rankings
        description = "infer" if shard.world_size == 1 else f"infer rank {shard.rank}/{shard.world_size}"
        if expansion_cut:
            rankings.expansion = _expansion_cut(localizer, mine, chunk_videos, shard, progress, description)
        with Progress(description, count_records(path for _, path in mine), "video",
                      enabled=progress, position=shard.rank) as bar:
            with Prefetcher(ordered_chunks(mine, chunk_videos)) as chunks:
                for videos, orders in chunks:
                    results = localizer.localize(videos, orders)
                    if truth is not None:
                        localized.extend(video.id for video in videos)
                    if video_predictions is not None:
                        predicted.append(_candidates(results, orders))
                    if truth is None:
                        ratings.extend(VideoRatings.of(v) for v in videos if len(v.segment_labels))
                    bar.update(len(videos))
                    bar.set_postfix(segments_per_s=f"{localizer.pipeline.times.windows / bar.elapsed:,.0f}")
        local = {"rank": shard.rank, "files": len(mine), "rankings": rankings.state(),
                 "times": localizer.pipeline.times.to_json(), "ratings": ratings,
                 "localized": localized, "predicted": predicted}
        parts = gather(local, shard)
        if not shard.is_root:
            finish(shard)
            return None
        for part in parts[1:]:
            rankings.merge_state(part["rankings"])
        videos_seen = sum(part["times"]["videos"] for part in parts)
        if not videos_seen:
            raise ValueError(f"no video in {data}")
        rows = rankings.rows()
        rankings.write_submission(out)
        if video_predictions is not None:
            _write_video_predictions(video_predictions, [chunk for part in parts for chunk in part["predicted"]])
    finish(shard)
    seconds = time.perf_counter() - started
    windows = sum(part["times"]["windows"] for part in parts)
    report = {
        "submission": str(out), "videos": videos_seen, "windows": windows,
        "ranks": shard.world_size, "backend": backend, "seconds": round(seconds, 3),
        "videos_per_second": round(videos_seen / seconds, 1),
        "segments_per_second": round(windows / seconds, 1),
        "ranked_segments": sum(map(len, rows.values())), "k": rankings.k,
        "stage_seconds": {stage: round(sum(p["times"]["seconds"][stage] for p in parts), 3)
                          for stage in parts[0]["times"]["seconds"]},
    }
    rated = SegmentTruth.from_videos(read_videos(truth)) if truth is not None else \
        SegmentTruth.from_videos(r for part in parts for r in part["ratings"])
    if video_predictions is not None:
        report["video_predictions"] = str(video_predictions)
    if truth is not None:
        check_overlap({video_id for part in parts for video_id in part["localized"]}, rated.video_ids,
                      f"the data {data if isinstance(data, str) else ' '.join(map(str, data))}",
                      truth if isinstance(truth, str) else " ".join(map(str, truth)), allow_low_overlap)
    if len(rated):
        scores = segment_map(rows, rated, k=rankings.k)
        report.update(map=scores.map, ceiling=scores.ceiling, classes=scores.classes)
    log.info("infer: %d videos, %d windows in %.1f s → %s", videos_seen, windows, seconds, out)
    return report


def _candidates(results, orders) -> tuple:
    """One chunk's video-level predictions: ``(orders, video ids, (V, n) candidate ids,
    (V, n) video scores)``, compact enough to gather from every rank."""
    return (np.asarray(orders, np.int64), [result.video_id for result in results],
            np.stack([result.candidate_ids for result in results]).astype(np.int32),
            np.stack([result.candidate_scores for result in results]).astype(np.float32))


def _write_video_predictions(path: str | os.PathLike, chunks: list[tuple]) -> None:
    """Every rank's chunks in the files' order (the single-process order) as G's file."""
    if not chunks:
        write_video_predictions(path, [])
        return
    orders = np.concatenate([chunk[0] for chunk in chunks])
    video_ids = [video_id for chunk in chunks for video_id in chunk[1]]
    ids = np.concatenate([chunk[2] for chunk in chunks])
    scores = np.concatenate([chunk[3] for chunk in chunks])
    write_video_predictions(path, ((video_ids[row], zip(ids[row].tolist(), scores[row].tolist(), strict=True))
                                   for row in np.argsort(orders, kind="stable")))


__all__ = ["Prefetcher", "infer", "ordered_chunks"]
