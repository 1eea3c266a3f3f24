"""The engine over real exported artifacts: offline ``modloc infer`` (single process and
sharded under torchrun with gloo), the fallback fill, and ``modloc show``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from tiny import split, synth_manifest

from modloc.cli import main
from modloc.engine.base.io.examples import RecordKindError, Video, encode_truth, encode_video
from modloc.engine.base.io.readers import read_videos
from modloc.engine.base.io.tfrecord import write_records
from modloc.engine.base.scoring import evaluate_submission
from modloc.engine.base.submission import read_submission
from modloc.engine.runtime.fusion import FusionConfig
from modloc.engine.runtime.infer import Prefetcher, infer
from modloc.engine.runtime.localizer import Localizer, artifact_paths
from modloc.engine.runtime.pipeline import Pipeline, PipelineConfig, ScoringModel
from modloc.engine.runtime.rankings import Rankings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def classes(tiny_dataset) -> list[int]:
    return synth_manifest(tiny_dataset)["segment_class_ids"]


def infer_args(tiny_artifacts, tiny_dataset, out: Path, classes, *extra: str) -> list[str]:
    return ["infer", str(tiny_artifacts), "--data", split(tiny_dataset, "test"), "--out", str(out),
            "--truth", split(tiny_dataset, "test_truth"), "--k", "1000", *extra]


def test_infer_reports_the_map_that_modloc_eval_computes_from_its_csv(tiny_artifacts, tiny_dataset,
                                                                      tmp_path, capsys):
    out = tmp_path / "submission.csv"
    assert main(infer_args(tiny_artifacts, tiny_dataset, out, None, "--json")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["videos"] == 24 and report["ranks"] == 1 and report["windows"] > 24
    scored = evaluate_submission(str(out), split(tiny_dataset, "test_truth"), k=1000)
    assert report["map"] == pytest.approx(scored["map"], abs=1e-12)
    assert report["ceiling"] == pytest.approx(scored["ceiling"], abs=1e-12)
    assert report["map"] <= report["ceiling"]
    assert scored["duplicates"] == 0 and scored["truncated"] == 0
    rows = read_submission(str(out))
    assert len(rows) == 1000  # one row per default segment class, even the unranked ones


def test_infer_under_torchrun_equals_the_single_process_csv_byte_for_byte(tiny_artifacts, tiny_dataset,
                                                                         tmp_path):
    single = tmp_path / "single.csv"
    infer(tiny_artifacts, split(tiny_dataset, "test"), single,
          config=PipelineConfig(fusion=FusionConfig(k=1000)), progress=False)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for ranks in (2, 3):  # 2 files: with 3 ranks one rank reads nothing
        sharded = tmp_path / f"sharded-{ranks}.csv"
        run = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
             "--standalone", "-m", "modloc", *infer_args(tiny_artifacts, tiny_dataset, sharded, None),
             "--json"],
            capture_output=True, text=True, timeout=240, env=environment, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        report = json.loads(run.stdout[run.stdout.index("{"):])
        assert report["ranks"] == ranks and report["videos"] == 24
        assert sharded.read_bytes() == single.read_bytes()
    # the expansion cut gathers every rank's video scores and sends the cut to all
    single_cut, sharded_cut = tmp_path / "single-cut.csv", tmp_path / "sharded-cut.csv"
    infer(tiny_artifacts, split(tiny_dataset, "test"), single_cut,
          config=PipelineConfig(fusion=FusionConfig(k=12)), progress=False, expansion_cut=True)
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
         "-m", "modloc", *infer_args(tiny_artifacts, tiny_dataset, sharded_cut, None),
         "--k", "12", "--expansion-cut"],
        capture_output=True, text=True, timeout=240, env=environment, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sharded_cut.read_bytes() == single_cut.read_bytes()


def test_expansion_cut_keeps_each_class_within_its_video_ranked_prefix():
    from modloc.engine.runtime.expansion import ExpansionCut

    # class 3: orders 1 and 2 tie at 0.9 (order 1 first), then order 0; limit 6 windows
    entries = np.array([[3, 0.5, 0, 5], [3, 0.9, 2, 4], [3, 0.9, 1, 1], [7, 0.1, 0, 9]], np.float64)
    cut = ExpansionCut.build(entries, limit=6)
    assert cut.allowed_windows == {(3, 1): 1, (3, 2): 4, (3, 0): 1, (7, 0): 6}
    # order 0 keeps its first window only; class 9 has no entry at all
    allowed = cut.allowed(0, np.array([3, 3, 7, 9]), np.array([0, 5, 25, 0]))
    assert allowed.tolist() == [True, False, True, False]


def test_infer_with_the_expansion_cut_ranks_as_the_reference_pipeline(tiny_artifacts, tiny_dataset,
                                                                      tmp_path):
    """REFERENCE §7 steps 1-4 done by hand over the same localizations: per class, the
    first k full windows of its videos by video score (ties: file order), then those ranked
    by fused value; infer --expansion-cut must write exactly that."""
    from modloc.engine.base.features import SEGMENT_FRAMES

    k = 12
    config = PipelineConfig(fusion=FusionConfig(k=k))
    cut, plain = tmp_path / "cut.csv", tmp_path / "plain.csv"
    infer(tiny_artifacts, split(tiny_dataset, "test"), cut, config=config, progress=False,
          expansion_cut=True)
    infer(tiny_artifacts, split(tiny_dataset, "test"), plain, config=config, progress=False)

    videos = list(read_videos(split(tiny_dataset, "test")))  # file order: the videos' orders
    with Localizer.from_artifacts(tiny_artifacts, config=config) as engine:
        results = engine.localize(videos, rank=False)
    ranked = set(engine.rankings.class_ids)
    expansion: dict[int, list[tuple[float, int, int]]] = {}
    for order, (video, result) in enumerate(zip(videos, results, strict=True)):
        for class_id, score in zip(result.candidate_ids.tolist(), result.candidate_scores.tolist(),
                                   strict=True):
            if class_id in ranked:
                expansion.setdefault(class_id, []).append((-score, order, video.audio_frames // 5))
    allowed = set()
    for class_id, entries in expansion.items():
        windows = [(order, start) for _, order, count in sorted(entries)
                   for start in range(0, count * SEGMENT_FRAMES, SEGMENT_FRAMES)][:k]
        allowed.update((class_id, order, start) for order, start in windows)
    expected: dict[int, list[tuple[float, int, int]]] = {}
    for order, result in enumerate(results):
        for start, class_id, value in zip(*(a.tolist() for a in result.ranking_pairs()), strict=True):
            if (class_id, order, start) in allowed and value > 0:
                expected.setdefault(class_id, []).append((-value, order, start))
    rows = read_submission(str(cut))
    for class_id in engine.rankings.class_ids:
        want = [f"{videos[order].id}:{start}" for _, order, start in sorted(expected.get(class_id, []))]
        assert rows[class_id] == want, class_id
    assert rows != read_submission(str(plain))  # at k = 12 the cut changes rankings


def test_fallback_fills_only_from_each_videos_top_1000_classes():
    from modloc.engine.base.io.examples import Video
    from modloc.engine.runtime.rankings import FALLBACK_CLASSES_PER_VIDEO

    # 1500 video classes scored by rank: class c gets 1 - c / 1500, so classes 0..999 are
    # the video's top 1000; the ranked classes 998, 999 (inside) and 1200 (outside)
    classes = tuple(range(1500))
    video_model = ScoringModel(lambda f, n: np.tile(1 - np.arange(1500, dtype=np.float32) / 1500,
                                                    (len(f), 1)), classes)
    segment_model = ScoringModel(lambda f, n: np.zeros((len(f), 3), np.float32), (998, 999, 1200))
    localizer = Localizer(Pipeline(video_model, segment_model, PipelineConfig(fusion=FusionConfig(k=4))),
                          Rankings([998, 999, 1200], k=4, fallback=True))
    localizer.localize([Video("v", np.zeros((10, 1152), np.uint8))], orders=[0])
    rows = localizer.rankings.rows()
    assert FALLBACK_CLASSES_PER_VIDEO == 1000
    assert rows[998] == rows[999] == ["v:0", "v:5"] and rows[1200] == []


def test_fallback_counts_windows_from_the_audio_frames_uncapped():
    """The reference expands a video into range(0, L - L % 5, 5) with L its audio frames,
    not capped at the 300 frames the models read: a 310-frame video offers :300 and :305,
    and one whose audio stream is longer than its RGB stream offers its audio's windows."""
    from modloc.engine.base.io.examples import Video

    classes = (7, 8)
    video_model = ScoringModel(lambda f, n: np.tile(np.float32([0.9, 0.8]), (len(f), 1)), classes)
    segment_model = ScoringModel(lambda f, n: np.zeros((len(f), 2), np.float32), classes)
    localizer = Localizer(Pipeline(video_model, segment_model, PipelineConfig(fusion=FusionConfig(k=100))),
                          Rankings(classes, k=100, fallback=True))
    [result] = localizer.localize([Video("long", np.zeros((310, 1152), np.uint8))], orders=[0])
    assert result.num_frames == 300 and result.audio_frames == 310
    rows = localizer.rankings.rows()
    assert rows[7] == [f"long:{start}" for start in range(0, 310, 5)]
    assert "long:300" in rows[8] and "long:305" in rows[8]
    # 12 audio frames stored beside 8 RGB frames (the video has min(8, 12) = 8 frames)
    localizer.localize([Video("audio", np.zeros((8, 1152), np.uint8), rgb_frames=8, audio_frames=12)],
                       orders=[1])
    assert localizer.rankings.rows()[7][-2:] == ["audio:0", "audio:5"]


def test_fallback_fills_short_rankings_from_video_scores(tiny_artifacts, tiny_dataset, classes):
    videos = list(read_videos(split(tiny_dataset, "test")))
    config = PipelineConfig(fusion=FusionConfig(top_n=2, k=400))
    with Localizer.from_artifacts(tiny_artifacts, config=config, class_ids=classes) as plain, \
            Localizer.from_artifacts(tiny_artifacts, config=config, class_ids=classes, fallback=True) as filled:
        plain.localize(videos)
        filled.localize(videos)
        before, after = plain.rankings.rows(), filled.rankings.rows()
    full_segments = sum(v.audio_frames // 5 for v in videos)  # uncapped, as the reference
    for class_id in classes:
        assert after[class_id][: len(before[class_id])] == before[class_id]  # fused first, untouched
        assert len(after[class_id]) == min(400, full_segments)
        assert len(set(after[class_id])) == len(after[class_id])
    assert any(len(before[c]) < len(after[c]) for c in classes)


def test_artifact_paths_name_what_is_missing(tiny_artifacts, tmp_path):
    video, segment = artifact_paths(tiny_artifacts, "ensemble-fp32")
    assert video.name == "ensemble-fp32" and segment.name == "distill-fp32"
    with pytest.raises(FileNotFoundError, match="holds: distill-fp32, ensemble-fp32"):
        artifact_paths(tiny_artifacts, "distill-int8")
    with pytest.raises(FileNotFoundError, match="from modloc export"):
        artifact_paths(tmp_path)
    with pytest.raises(ValueError, match="video-level model where a segment-level"):
        Localizer.from_artifacts(tiny_artifacts, segment=str(tiny_artifacts / "video" / "distill-fp32"))


def test_show_draws_a_timeline_png_with_the_ratings(tiny_artifacts, tiny_dataset, tmp_path, capsys):
    video = next(read_videos(split(tiny_dataset, "test")))
    out = tmp_path / "timeline.png"
    assert main(["show", video.id, str(tiny_artifacts), "--data", split(tiny_dataset, "test"),
                 "--truth", split(tiny_dataset, "test_truth"), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["ratings"] > 0 and len(summary["candidates"]) == 18  # the tiny video model's classes
    assert main(["show", "no-such-video", str(tiny_artifacts), "--data", split(tiny_dataset, "test")]) == 1
    assert "no video 'no-such-video'" in capsys.readouterr().err


def test_the_timeline_labels_its_numbers_and_keeps_the_legend_off_the_cells(tiny_artifacts, tiny_dataset):
    from modloc.engine.runtime.timeline import ratings_of, timeline_figure

    video = next(read_videos(split(tiny_dataset, "test")))
    with Localizer.from_artifacts(tiny_artifacts) as localizer:
        result = localizer.localize([video], rank=False)[0]
    figure = timeline_figure(result, ratings_of(video.id, read_videos(split(tiny_dataset, "test_truth"))))
    figure.canvas.draw()
    axes = figure.axes[0]
    assert axes.get_ylabel() == "candidate class (id), video score P_vid"
    first = axes.get_yticklabels()[0].get_text()
    assert first.endswith(f"({result.candidate_ids[0]}) P_vid {result.candidate_scores[0]:.2f}")
    legend = axes.get_legend().get_window_extent()
    cells = axes.get_window_extent()
    assert legend.y1 <= cells.y0  # wholly below the plot


def test_engine_localize_returns_candidates_and_fused_windows(tiny_artifacts, tiny_dataset, classes):
    """Every value of a localization recomputed from the two artifacts directly, one video
    and one window at a time: candidates = the video model's classes by score (top 20 of
    18), fused = P_vid^0.05 · P_seg^0.95, NaN where the segment model has no such class."""
    from modloc.engine.runtime.backends import open_backend

    videos = list(read_videos(split(tiny_dataset, "test")))[:3]
    with Localizer.from_artifacts(tiny_artifacts, class_ids=classes) as engine:
        results = engine.localize(videos)
    with open_backend(tiny_artifacts / "video" / "distill-fp32") as video_model, \
            open_backend(tiny_artifacts / "segment" / "distill-fp32") as segment_model:
        for video, result in zip(videos, results, strict=True):
            frames = video.features[:300]
            scores = video_model.run(frames[None], num_frames=np.array([len(frames)], np.int32))[0]
            order = np.argsort(-scores, kind="stable")[:20]
            assert result.video_id == video.id and result.num_frames == len(frames)
            assert len(order) == len(result.video_class_ids) == 18  # top 20 of 18 classes
            np.testing.assert_array_equal(result.candidate_ids, np.asarray(video_model.class_ids)[order])
            np.testing.assert_allclose(result.candidate_scores, scores[order], rtol=1e-5, atol=1e-7)
            starts = np.arange(0, len(frames), 5)
            np.testing.assert_array_equal(result.window_starts, starts)
            np.testing.assert_array_equal(result.partial, [len(frames) - s < 5 for s in starts])
            column = {int(c): j for j, c in enumerate(segment_model.class_ids)}
            for row, start in enumerate(starts):
                window = np.zeros((1, 5, 1152), np.uint8)
                length = min(5, len(frames) - start)
                window[0, :length] = frames[start:start + length]
                segment = segment_model.run(window, num_frames=np.array([length], np.int32))[0]
                expected = [scores[order[j]] ** 0.05 * segment[column[c]] ** 0.95
                            if c in column else np.nan
                            for j, c in enumerate(result.candidate_ids.tolist())]
                np.testing.assert_allclose(result.fused[row], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("variant", ["distill-fp32", "ensemble-fp32"])
def test_the_same_artifacts_rank_the_same_on_pytorch_and_onnx_runtime(tiny_artifacts, tiny_dataset,
                                                                    classes, variant):
    videos = list(read_videos(split(tiny_dataset, "test")))
    rankings = {}
    for backend in ("onnxruntime", "torch"):
        with Localizer.from_artifacts(tiny_artifacts, variant, variant, backend, class_ids=classes) as engine:
            engine.localize(videos)
            rankings[backend] = {c: engine.rankings.ranking(c) for c in classes}
    for class_id in classes:
        onnx_rows, torch_rows = rankings["onnxruntime"][class_id], rankings["torch"][class_id]
        assert [(v, s) for v, s, _ in onnx_rows] == [(v, s) for v, s, _ in torch_rows], class_id
        np.testing.assert_allclose([x for *_, x in onnx_rows], [x for *_, x in torch_rows], rtol=1e-5)


def test_onnxruntime_refuses_to_run_without_a_provider_it_was_asked_for(tiny_artifacts):
    import onnxruntime

    from modloc.engine.runtime.artifacts import ArtifactError
    from modloc.engine.runtime.backends import open_backend

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this ONNX Runtime has the CUDA provider")
    cuda = (("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider")
    with pytest.raises(ArtifactError, match="has no CUDAExecutionProvider here .* onnxruntime-gpu"):
        open_backend(tiny_artifacts / "segment" / "distill-fp32", "onnxruntime", providers=cuda)


def test_a_bare_cuda_device_is_the_ranks_own_gpu_under_torchrun(monkeypatch):
    from modloc.engine.runtime.distributed import rank_device

    assert rank_device("cuda") == "cuda" and rank_device("cuda:1") == "cuda:1"
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert (rank_device("cuda"), rank_device("cuda:1"), rank_device("cpu")) == ("cuda:3", "cuda:1", "cpu")


@pytest.mark.parametrize("flags, message", [
    (["--compile"], "options of the torch backend"),
    (["--cuda-graphs"], "options of the torch backend"),
    (["--device", "tpu"], "not an option of the onnxruntime backend"),
    (["--backend", "tensorrt", "--device", "cuda"], "not an option of the tensorrt backend"),
])
def test_backend_flags_that_do_not_fit_are_refused(tmp_path, capsys, flags, message):
    assert main(["infer", str(tmp_path), "--data", str(tmp_path / "x.tfrecord"), "--out",
                 str(tmp_path / "s.csv"), *flags]) == 1
    assert message in capsys.readouterr().err


# --- infer's reading, over an engine of constant models (no artifacts) -----------------


def constant_engine(*args, **options) -> Localizer:
    """Stands in for Localizer.from_artifacts: two models that score every class 0.5."""
    model = ScoringModel(lambda features, num_frames: np.full((len(features), 3), 0.5, np.float32),
                         (3, 4, 5))
    return Localizer(Pipeline(model, model), Rankings([3, 4, 5]))


def reader_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "modloc-reader"]


def write_videos(path: Path, ids: list[str], frames: int = 10) -> str:
    write_records(path, [encode_video(Video(i, np.full((frames, 1152), 7, np.uint8))) for i in ids])
    return str(path)


def test_infer_stops_and_joins_its_reader_when_the_engine_fails(tmp_path, monkeypatch):
    data = write_videos(tmp_path / "test.tfrecord", [f"v{i}" for i in range(12)])
    calls = []

    def failing_engine(*args, **options):
        engine = constant_engine()

        def localize(videos, orders=None):
            calls.append(len(videos))
            if len(calls) == 2:
                raise RuntimeError("device lost")
            return Localizer.localize(engine, videos, orders)

        engine.localize = localize
        return engine

    monkeypatch.setattr(Localizer, "from_artifacts", failing_engine)
    with pytest.raises(RuntimeError, match="device lost"):
        infer("unused", data, tmp_path / "s.csv", chunk_videos=1, progress=False)
    # the reader, with chunks still to read, was stopped and joined, not left running
    # (a reader inside the native decoder at interpreter exit aborts the process)
    assert calls == [1, 1] and reader_threads() == []
    assert not (tmp_path / "s.csv").exists()


def test_infer_over_a_file_that_fails_midway_names_the_record(tmp_path, monkeypatch):
    path = tmp_path / "test.tfrecord"
    good = [encode_video(Video(f"v{i}", np.full((10, 1152), 7, np.uint8))) for i in range(3)]
    write_records(path, [*good, encode_truth(Video("t0", np.zeros((10, 1152), np.uint8))), *good])
    monkeypatch.setattr(Localizer, "from_artifacts", constant_engine)
    with pytest.raises(RecordKindError, match=rf"{path}: record 3 at byte offset \d+: video 't0' "
                       "has no frames"):
        infer("unused", str(path), tmp_path / "s.csv", chunk_videos=1, progress=False)
    assert reader_threads() == []
    assert main(["infer", "unused", "--data", str(path), "--out", str(tmp_path / "s.csv")]) == 1


def test_infer_refuses_a_video_id_a_segment_id_cannot_carry_when_it_is_read(tmp_path, monkeypatch):
    data = write_videos(tmp_path / "test.tfrecord", ["a", "b", "D:/videos/v2.mp4", "c"])
    monkeypatch.setattr(Localizer, "from_artifacts", constant_engine)
    with pytest.raises(ValueError, match=rf"{data}: record 2: video id 'D:/videos/v2.mp4' cannot "
                       "be ranked: a Kaggle segment id '<video id>:<start>' needs"):
        infer("unused", data, tmp_path / "s.csv", chunk_videos=8, progress=False)
    assert not (tmp_path / "s.csv").exists() and reader_threads() == []
    good = write_videos(tmp_path / "good.tfrecord", ["a", "b", "c"])
    report = infer("unused", good, tmp_path / "s.csv", chunk_videos=2, progress=False)
    assert report["videos"] == 3 and read_submission(str(tmp_path / "s.csv"))[3][:2] == ["a:0", "a:5"]


def test_prefetcher_overlaps_and_stops_its_reader_when_the_consumer_stops_early():
    closed = threading.Event()

    def chunks():
        try:
            yield from range(100)
        finally:
            closed.set()

    with Prefetcher(chunks(), depth=2) as prefetcher:
        assert next(iter(prefetcher)) == 0
    assert not prefetcher.thread.is_alive() and closed.is_set()
    with Prefetcher(iter(range(5)), depth=2) as prefetcher:
        assert list(prefetcher) == [0, 1, 2, 3, 4]
    assert not prefetcher.thread.is_alive()
