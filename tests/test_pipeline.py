"""The pipeline (stages 1–3) and the batcher, over small numpy models with known answers."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from modloc.engine.base.io.examples import Video
from modloc.engine.base.windows import segment_windows
from modloc.engine.runtime.batcher import (
    Batcher,
    BatcherClosed,
    BatcherConfig,
    DeadlineExceeded,
    QueueFull,
)
from modloc.engine.runtime.fusion import FusionConfig, top_candidates
from modloc.engine.runtime.pipeline import Pipeline, PipelineConfig, ScoringModel

VIDEO_CLASSES = tuple(range(10))
SEGMENT_CLASSES = tuple(range(2, 12))  # classes 0 and 1 are candidates the segment model skips


def mean_scorer(columns: slice, masked: bool):
    """Sigmoid of the mean code of some feature columns: over valid frames (video mode),
    or over every frame (segment mode, as the reference's segment model)."""

    def score(features: np.ndarray, num_frames: np.ndarray) -> np.ndarray:
        values = features[:, :, columns].astype(np.float64) - 127.0
        if masked:
            mask = (np.arange(features.shape[1])[None, :] < num_frames[:, None])[:, :, None]
            means = (values * mask).sum(axis=1) / np.maximum(num_frames[:, None], 1)
        else:
            means = values.mean(axis=1)
        return (1.0 / (1.0 + np.exp(-means / 20.0))).astype(np.float32)

    return score


def models(fixed_frames: int | None = None, calls: list | None = None):
    video_score = mean_scorer(slice(0, 10), masked=True)

    def recorded(features, num_frames):
        if calls is not None:
            calls.append(features.shape)
        return video_score(features, num_frames)

    return (ScoringModel(recorded, VIDEO_CLASSES, fixed_frames, "video"),
            ScoringModel(mean_scorer(slice(2, 12), masked=False), SEGMENT_CLASSES, None, "segment"))


def random_videos(count: int, seed: int = 0, lengths=(1, 4, 5, 6, 12, 37, 300, 320)) -> list[Video]:
    rng = np.random.default_rng(seed)
    return [Video(f"v{seed}-{i}", rng.integers(0, 256, (int(rng.choice(lengths)), 1152), dtype=np.uint8))
            for i in range(count)]


def reference(video: Video, fusion: FusionConfig, max_frames: int = 300):
    """One video, window by window and candidate by candidate: (starts, classes, values)."""
    video_model, segment_model = models()
    frames = video.features[:max_frames]
    scores = video_model.score(frames[None], np.array([len(frames)], np.int32))
    ids, values = top_candidates(scores, VIDEO_CLASSES, fusion.top_n)
    windows = segment_windows(frames)
    window_scores = segment_model.score(windows.features, windows.num_frames)
    pairs = [(int(start), int(class_id), float(video_score) ** fusion.video_exponent
              * float(window_scores[row, SEGMENT_CLASSES.index(class_id)]) ** fusion.segment_exponent)
             for row, (start, partial) in enumerate(zip(windows.starts, windows.partial, strict=True))
             if fusion.include_partial or not partial
             for class_id, video_score in zip(ids[0], values[0], strict=True) if class_id in SEGMENT_CLASSES]
    starts, classes, fused = zip(*pairs, strict=True) if pairs else ((), (), ())
    return np.array(starts, np.int64), np.array(classes, np.int64), np.array(fused)


def test_fused_values_exponents_unscored_candidates_and_partial_windows():
    # windows at 0 and 5 are full, the one at 10 partial; class 99 has no segment score
    # one row per video, as a model gives (the pipeline scores a one-row batch as two rows)
    video_model = ScoringModel(lambda f, n: np.tile(np.array([[0.8, 0.6, 0.4]], np.float32), (len(f), 1)),
                               (12, 99, 11))
    segment_model = ScoringModel(lambda f, n: np.array([[0.9, 0.2], [0.1, 0.7], [0.5, 0.5]], np.float32),
                                 (12, 11))
    video = Video("v", np.zeros((12, 1152), np.uint8))
    result = Pipeline(video_model, segment_model, PipelineConfig(fusion=FusionConfig(top_n=3))).localize([video])[0]
    starts, classes, values = result.ranking_pairs()
    assert starts.tolist() == [0, 0, 5, 5] and classes.tolist() == [12, 11, 12, 11]
    # 0.8^0.05 · 0.9^0.95, 0.4^0.05 · 0.2^0.95, 0.8^0.05 · 0.1^0.95, 0.4^0.05 · 0.7^0.95
    np.testing.assert_allclose(values, [0.8947153, 0.2070530, 0.1109569, 0.6806849], rtol=1e-6)
    starts, _, values = result.ranking_pairs(include_partial=True)
    assert starts.tolist() == [0, 0, 5, 5, 10, 10]
    np.testing.assert_allclose(values[4:], [0.8**0.05 * 0.5**0.95, 0.4**0.05 * 0.5**0.95], rtol=1e-6)


@pytest.mark.parametrize("include_partial", [False, True])
def test_pipeline_matches_the_per_video_fusion(include_partial):
    fusion = FusionConfig(top_n=4, include_partial=include_partial)
    videos = random_videos(12)
    pipeline = Pipeline(*models(), PipelineConfig(fusion=fusion, video_batch_size=5, window_batch_size=7))
    results = pipeline.localize(videos)
    assert [r.video_id for r in results] == [v.id for v in videos]
    for video, result in zip(videos, results, strict=True):
        starts, classes, values = result.ranking_pairs(include_partial)
        want_starts, want_classes, want_values = reference(video, fusion)
        np.testing.assert_array_equal(starts, want_starts)
        np.testing.assert_array_equal(classes, want_classes)
        np.testing.assert_allclose(values, want_values, rtol=1e-6)
        assert result.num_frames == min(len(video.features), 300)
        assert result.fused.shape == (-(-result.num_frames // 5), 4)
        assert result.video_scores.shape == (len(VIDEO_CLASSES),)
    assert pipeline.times.videos == 12 and pipeline.times.windows == sum(len(r.window_starts) for r in results)


def test_candidates_the_segment_model_does_not_score_are_nan_and_never_ranked():
    videos = [Video("low", np.full((10, 1152), 200, np.uint8))]
    videos[0].features[:, 2:10] = 0  # classes 0 and 1 become the top candidates
    result = Pipeline(*models(), PipelineConfig(fusion=FusionConfig(top_n=3))).localize(videos)[0]
    assert result.candidate_ids[:2].tolist() == [0, 1]
    assert np.isnan(result.fused[:, :2]).all() and not np.isnan(result.fused[:, 2]).any()
    assert set(result.ranking_pairs()[1].tolist()) == {int(result.candidate_ids[2])}
    assert result.segments(0) == []


def test_results_do_not_depend_on_batch_composition():
    videos = random_videos(9, seed=3)
    alone = [Pipeline(*models()).localize([video])[0] for video in videos]
    together = Pipeline(*models(), PipelineConfig(video_batch_size=4, window_batch_size=3)).localize(videos)
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_array_equal(a.candidate_ids, b.candidate_ids)
        np.testing.assert_allclose(a.fused, b.fused, rtol=1e-6)


def test_video_batches_are_padded_to_the_bucketed_longest_or_to_fixed_frames():
    videos = [Video(f"v{i}", np.ones((n, 1152), np.uint8)) for i, n in enumerate((3, 31, 7))]
    calls: list = []
    Pipeline(*models(calls=calls), PipelineConfig(frame_bucket=30)).localize(videos)
    assert calls == [(3, 60, 1152)]
    calls.clear()
    Pipeline(*models(fixed_frames=300, calls=calls), PipelineConfig(video_batch_size=2)).localize(videos)
    # the last batch holds one video: scored as two copies of it (never a one-row batch)
    assert calls == [(2, 300, 1152), (2, 300, 1152)]
    with pytest.raises(ValueError, match="fewer than max_frames"):
        Pipeline(*models(fixed_frames=100))


def test_segments_of_a_candidate_above_a_threshold_best_first():
    result = Pipeline(*models(), PipelineConfig(fusion=FusionConfig(top_n=3))).localize(random_videos(1, 5, (23,)))[0]
    class_id = int(next(c for c in result.candidate_ids if c in SEGMENT_CLASSES))
    segments = result.segments(class_id)
    assert len(segments) == 4  # full windows only
    assert [s for s, _ in segments] == sorted((s for s, _ in segments), key=lambda s: -dict(segments)[s])
    threshold = segments[1][1]
    assert [s for s, _ in result.segments(class_id, threshold)] == [segments[0][0]]
    assert len(result.segments(class_id, include_partial=True)) == 5


@pytest.mark.parametrize("features, match", [
    (np.zeros((0, 1152), np.uint8), "no frames"),
    (np.zeros((5, 1024), np.uint8), r"\(M, 1152\) uint8"),
    (np.zeros((5, 1152), np.float32), "float32"),
])
def test_bad_videos_are_refused_with_their_id(features, match):
    video = Video("bad-one", np.zeros((5, 1152), np.uint8))
    video.features = features  # what a caller that builds videos itself may hand over
    with pytest.raises(ValueError, match=f"'bad-one'.*{match}|{match}.*'bad-one'"):
        Pipeline(*models()).localize([video])


def test_a_model_returning_the_wrong_shape_is_named():
    broken = ScoringModel(lambda f, n: np.zeros((len(f), 3), np.float32), VIDEO_CLASSES, name="broken")
    with pytest.raises(RuntimeError, match="broken returned scores of shape"):
        Pipeline(broken, models()[1]).localize(random_videos(2))


# --- batcher ---------------------------------------------------------------------------


class Gate:
    """A segment scorer that waits until released, so requests pile up in the queue."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()
        self.score = mean_scorer(slice(2, 12), masked=False)

    def __call__(self, features, num_frames):
        self.entered.set()
        assert self.release.wait(10)
        return self.score(features, num_frames)


def gated_pipeline() -> tuple[Pipeline, Gate]:
    gate = Gate()
    video, _ = models()
    return Pipeline(video, ScoringModel(gate, SEGMENT_CLASSES, name="gated")), gate


def test_concurrent_requests_get_their_own_results_in_merged_batches():
    """8 threads submit 6 videos each while the worker is held on a first request; once
    released, the queued requests share pipeline calls of up to 16 videos (never split: two
    requests, 12 videos, a call) and each thread gets its own results."""
    videos = random_videos(48, seed=7)
    pipeline, gate = gated_pipeline()
    expected_pipeline, open_gate = gated_pipeline()
    open_gate.release.set()
    expected = {r.video_id: r for r in expected_pipeline.localize(videos)}
    with Batcher(pipeline, BatcherConfig(max_batch_videos=16, max_wait=0)) as batcher:
        holder = batcher.submit(random_videos(1, seed=1))
        assert gate.entered.wait(10)
        futures: dict[int, object] = {}

        def client(index: int) -> None:
            futures[index] = batcher.submit(videos[index * 6:(index + 1) * 6])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert batcher.queue_depth == 48
        gate.release.set()
        holder.result(30)
        results = {index: future.result(30) for index, future in futures.items()}
    for index, own in results.items():
        assert [r.video_id for r in own] == [v.id for v in videos[index * 6:(index + 1) * 6]]
        for result in own:
            np.testing.assert_allclose(result.fused, expected[result.video_id].fused, rtol=1e-6)
    assert batcher.stats.videos == 49 and batcher.stats.requests == 9
    assert dict(batcher.stats.batch_sizes) == {1: 1, 12: 4}  # 8 requests in 4 calls


def test_the_queue_limit_is_exact_and_refusal_loses_nothing_queued():
    pipeline, gate = gated_pipeline()
    batcher = Batcher(pipeline, BatcherConfig(max_batch_videos=1, max_wait=0, max_queued_videos=3))
    first = batcher.submit(random_videos(1, seed=1))
    assert gate.entered.wait(10)  # the worker holds the first request; the queue is empty
    queued = [batcher.submit(random_videos(2, seed=2)), batcher.submit(random_videos(1, seed=3))]
    assert batcher.queue_depth == 3
    with pytest.raises(QueueFull, match="limit of 3"):
        batcher.submit(random_videos(1, seed=4))
    gate.release.set()
    assert len(first.result(10)) == 1 and [len(f.result(10)) for f in queued] == [2, 1]
    assert batcher.stats.refused == 1
    batcher.close()


def test_expired_and_cancelled_requests_never_reach_the_device():
    pipeline, gate = gated_pipeline()
    batcher = Batcher(pipeline, BatcherConfig(max_batch_videos=1, max_wait=0))
    running = batcher.submit(random_videos(1, seed=1))
    assert gate.entered.wait(10)
    deadline = time.monotonic() + 0.01
    expired = batcher.submit(random_videos(1, seed=2), deadline=deadline)
    cancelled = batcher.submit(random_videos(1, seed=3))
    assert cancelled.cancel()
    while time.monotonic() <= deadline:  # the deadline has passed (a condition, not a guess)
        time.sleep(0.001)
    gate.release.set()
    running.result(10)
    with pytest.raises(DeadlineExceeded):
        expired.result(10)
    batcher.close()
    assert batcher.stats.expired == 1 and batcher.stats.cancelled == 1
    assert pipeline.times.videos == 1


def test_a_failing_batch_fails_its_requests_and_the_worker_goes_on():
    calls = {"n": 0}
    video, segment = models()

    def flaky(features, num_frames):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device lost")
        return segment.score(features, num_frames)

    with Batcher(Pipeline(video, ScoringModel(flaky, SEGMENT_CLASSES)), BatcherConfig(max_wait=0)) as batcher:
        with pytest.raises(RuntimeError, match="device lost"):
            batcher.localize(random_videos(1, seed=1), timeout=10)
        assert len(batcher.localize(random_videos(2, seed=2), timeout=10)) == 2
    assert batcher.stats.failed == 1


def test_close_without_drain_fails_waiting_requests_and_refuses_new_ones():
    pipeline, gate = gated_pipeline()
    batcher = Batcher(pipeline, BatcherConfig(max_batch_videos=1, max_wait=0))
    running = batcher.submit(random_videos(1, seed=1))
    assert gate.entered.wait(10)
    waiting = batcher.submit(random_videos(1, seed=2))
    closer = threading.Thread(target=batcher.close, kwargs={"drain": False})
    closer.start()
    with pytest.raises(BatcherClosed):
        waiting.result(10)
    gate.release.set()
    closer.join(10)
    assert len(running.result(10)) == 1
    with pytest.raises(BatcherClosed):
        batcher.submit(random_videos(1))


def test_a_bad_video_is_refused_at_submit_not_inside_a_shared_batch():
    with Batcher(Pipeline(*models())) as batcher:
        with pytest.raises(ValueError, match="no frames"):
            batcher.submit([Video("empty", np.zeros((0, 1152), np.uint8))])
        assert batcher.queue_depth == 0


# --- settings, counters, results: values the mutation run found unchecked ----------------


def test_pipeline_defaults_and_the_edges_of_its_settings():
    config = PipelineConfig()
    assert (config.video_batch_size, config.window_batch_size, config.max_frames,
            config.frame_bucket) == (64, 4096, 300, 30)
    PipelineConfig(video_batch_size=1, window_batch_size=1, max_frames=1, frame_bucket=1)
    for name in ("video_batch_size", "window_batch_size", "max_frames", "frame_bucket"):
        with pytest.raises(ValueError, match=f"{name} must be >= 1, got 0"):
            PipelineConfig(**{name: 0})


def test_stage_times_count_every_model_call_and_only_the_calls_time():
    pipeline = Pipeline(*models(), PipelineConfig(video_batch_size=2, window_batch_size=7))
    videos = random_videos(5, seed=3)
    started = time.perf_counter()
    results = pipeline.localize(videos)
    elapsed = time.perf_counter() - started
    windows = sum(len(result.window_starts) for result in results)
    assert pipeline.times.videos == 5 and pipeline.times.windows == windows
    assert pipeline.times.video_batches == 3  # 5 videos, 2 a call
    assert pipeline.times.window_batches == -(-windows // 7)
    # each stage's seconds are a part of the call's wall time (an inequality, not a timing)
    assert all(seconds >= 0 for seconds in pipeline.times.seconds.values())
    assert sum(pipeline.times.seconds.values()) <= elapsed


def test_a_video_graph_is_padded_as_its_manifest_says():
    """A video graph gets the frames its manifest's ``frames.pad_to`` asks for (300 for an
    ensemble exported before the gate input was recorded, None: the batch's own padded
    length); a segment graph's windows are 5 frames whatever it says."""
    from pathlib import Path
    from types import SimpleNamespace

    def backend(kind, pad_to):
        artifact = SimpleNamespace(kind=kind, pad_to=pad_to, path=Path(f"/a/{kind}"))
        return SimpleNamespace(artifact=artifact, class_ids=(3, 5), name="onnxruntime",
                               run=lambda *args, **kwargs: None)

    assert ScoringModel.from_backend(backend("video", 300)).fixed_frames == 300
    assert ScoringModel.from_backend(backend("video", None)).fixed_frames is None
    assert ScoringModel.from_backend(backend("segment", 5)).fixed_frames is None


def test_segments_above_the_default_threshold_of_zero():
    from modloc.engine.runtime.pipeline import VideoLocalization

    result = VideoLocalization(
        video_id="v", num_frames=12, candidate_ids=np.array([7, 3]),
        candidate_scores=np.array([0.9, 0.5]), window_starts=np.array([0, 5, 10]),
        partial=np.array([False, False, True]),
        fused=np.array([[0.0, np.nan], [0.4, np.nan], [0.8, np.nan]]),  # 3: no segment score
        video_scores=np.zeros(2, np.float32), video_class_ids=np.array([3, 7]), audio_frames=12)
    assert result.segments(7) == [(5, 0.4)]  # 0.0 is not above 0; the partial window is out
    assert result.segments(7, include_partial=True) == [(10, 0.8), (5, 0.4)]
    assert result.segments(7, threshold=-1.0) == [(5, 0.4), (0, 0.0)]
    assert result.segments(3) == [] and result.segments(99) == []
    starts, ids, values = result.ranking_pairs()
    np.testing.assert_array_equal(starts, [0, 5])  # class 3's NaN column is not ranked
    np.testing.assert_array_equal(ids, [7, 7])
    np.testing.assert_array_equal(values, [0.0, 0.4])
