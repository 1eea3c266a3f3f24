"""``modloc demo``: the whole product end to end on the built-in synthetic data.

Stages (each adds one key to ``<out>/report.json``, rewritten after every stage so that a
failed run still shows how far it got):

- ``data``: generate the synthetic YouTube-8M-format dataset;
- ``inspect``: read every split back and count what is in it;
- ``systems``: write reference submissions for the test split and score them with the
  Kaggle MAP@K: ``random`` (a random ranking of all full test segments for each class)
  and ``perfect`` (the positives of the truth file, which must score exactly 1.0);
- ``pretrain``: pre-train a small MOD tree (:data:`modloc.training.small_scale.SMALL_MODEL`) on the video labels of
  ``train/`` (the ``pretrain`` recipe, shortened);
- ``finetune``: fine-tune it on the rated segments of ``validate/`` (the ``finetune``
  recipe: T = 20, λ = 400, dropout 0.75, the Adam state restored);
- ``evaluate``: run the inference pipeline on ``test/`` (the pre-trained model's top-20
  candidates, the fine-tuned model's window scores, ``P_vid^0.05 · P_seg^0.95``) and score
  it, and the dummy prediction, with the Kaggle MAP@K: ``systems.mod`` and
  ``systems.dummy`` beside ``random`` and ``perfect``;
- ``export``: export both checkpoints to ONNX artifacts (distill leaf and ensemble, fp32
  and INT8) and score the test split through ONNX Runtime, which must give PyTorch's MAP@K
  to 1e-4 (:func:`modloc.demo.export_stage.run_export_stage`);
- ``infer``: the serving engine offline, as ``modloc infer`` runs it (:func:`modloc.engine.runtime.infer.infer`:
  the ensemble artifacts on ONNX Runtime, the native per-class top-K): writes
  ``<out>/submission.csv``, scores it, checks it against the export stage's MAP@K (1e-4)
  and the dummy prediction, and draws the timeline of the test video with the most
  positive ratings to ``<out>/timeline.png`` (:func:`modloc.engine.runtime.timeline.show`);
- ``serve``: ``modloc serve`` on the same artifacts (a subprocess on a loopback port), the
  test split streamed through ``Localize`` and ``Ingest`` with the Python client, the
  submission fetched from the service (``<out>/served_submission.csv``) and scored: its
  MAP@K must equal the ``infer`` stage's (1e-4); the server is stopped with SIGTERM and
  must drain and exit 0;
- ``live``: the test video of the timeline replayed through ``LocalizeLive`` at
  :data:`LIVE_SPEED` times real time, one frame a message: the events it got, each window's
  latency (from sending its last frame to receiving its event) and whether the final
  localization equals ``Localize``'s answer for the whole video (1e-5, else the demo fails).

The training and export stages need the ``training`` and ``export`` packages (torch, onnx);
they are imported inside them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from modloc.engine.base.atomic import write_atomically
from modloc.engine.base.baselines import oracle_rankings, random_rankings, video_segment_ids
from modloc.engine.base.inspection import inspect
from modloc.engine.base.io.readers import read_videos
from modloc.engine.base.metrics.segment import MAX_SEGMENTS_PER_CLASS
from modloc.engine.base.progress import Progress, announce
from modloc.engine.base.scoring import evaluate_submission
from modloc.engine.base.submission import write_submission
from modloc.engine.base.synth import SPLITS, config_from, generate

MAP_AGREEMENT = 1e-4  # two runs of the same artifacts may batch videos differently
LIVE_SPEED = 50.0  # the live stage's replay, times real time
LIVE_AGREEMENT = 1e-5  # the live stream's final scores against Localize's, relative

INSPECT_KEYS = ("files", "records", "videos", "frames", "labels", "rated_segments",
                "positive_segments", "corrupt_records")
STAGES = ("data", "inspect", "systems", "pretrain", "finetune", "evaluate", "export", "infer", "serve",
          "live")

def run_demo(out_dir: str | os.PathLike = "runs/demo", preset: str = "demo", workers: int = 2,
             k: int = MAX_SEGMENTS_PER_CLASS) -> dict:
    """Run every stage under ``out_dir``; returns the report (also in ``report.json``).

    Each stage says on stderr when it starts and ends, and the long ones report their
    progress (:mod:`modloc.engine.base.progress`) as they go.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "report.json"
    report: dict = {"preset": preset, "stages": {}}

    def stage_start(name: str) -> float:
        announce(f"demo: stage {STAGES.index(name) + 1}/{len(STAGES)} {name}: started")
        return time.perf_counter()

    def stage_done(name: str, started: float) -> None:
        report["stages"][name] = {"seconds": round(time.perf_counter() - started, 2)}
        write_atomically(report_path, json.dumps(report, indent=2) + "\n")
        announce(f"demo: stage {STAGES.index(name) + 1}/{len(STAGES)} {name}: done in "
                 f"{report['stages'][name]['seconds']:.1f} s")

    started = stage_start("data")
    data_dir = out / "data"
    config = config_from(preset)
    with Progress("synth", sum(config.videos(split) for split in SPLITS), "video") as bar:
        synth = generate(config, data_dir, workers=workers, progress=lambda shard: bar.update(shard.videos))
    manifest = json.loads((data_dir / "synth.json").read_text())
    report["data"] = {"path": str(data_dir), "seed": config.seed, "splits": synth.splits,
                      "segment_classes": len(manifest["segment_class_ids"])}
    stage_done("data", started)

    started = stage_start("inspect")
    split_globs = {split: str(data_dir / pattern) for split, pattern in manifest["layout"].items()}
    report["inspect"] = {}
    for split in (*SPLITS, "test_truth"):
        counts = inspect(split_globs[split]).to_json()
        report["inspect"][split] = {key: counts[key] for key in INSPECT_KEYS}
    stage_done("inspect", started)

    started = stage_start("systems")
    submissions = out / "submissions"
    submissions.mkdir(exist_ok=True)
    test_segments = video_segment_ids(read_videos(split_globs["test"]))
    systems = {
        "random": random_rankings(test_segments, manifest["segment_class_ids"], k=k, seed=config.seed),
        "perfect": oracle_rankings(read_videos(split_globs["test_truth"])),
    }
    report["systems"] = {}
    for name, rankings in systems.items():
        path = submissions / f"{name}.csv"
        write_submission(path, rankings)
        scores = evaluate_submission(str(path), split_globs["test_truth"], k=k)
        report["systems"][name] = {
            "map": scores["map"], "ceiling": scores["ceiling"], "classes": scores["classes"], "k": k,
            "submission": str(path),
        }
    report["systems"]["random"]["candidate_segments"] = len(test_segments)
    stage_done("systems", started)

    from modloc.training.small_scale import (
        SMALL_FINETUNE,
        SMALL_PRETRAIN,
        single_threaded,
        train_run,
    )

    classes = manifest["segment_class_ids"] + manifest["extra_class_ids"]
    with single_threaded():
        started = stage_start("pretrain")
        pretrained = train_run(out / "pretrain", "pretrain", {
            **SMALL_PRETRAIN, "data.train": [split_globs["train"]], "data.classes": classes,
            "seed": config.seed})
        report["pretrain"] = pretrained
        stage_done("pretrain", started)

        started = stage_start("finetune")
        report["finetune"] = train_run(out / "finetune", "finetune", {
            **SMALL_FINETUNE, "data.train": [split_globs["validate"]],
            "init_from": pretrained["checkpoint"], "seed": config.seed})
        stage_done("finetune", started)

        started = stage_start("evaluate")
        report["evaluate"] = _evaluate_stage(report, split_globs, manifest["segment_class_ids"],
                                             submissions, k)
        stage_done("evaluate", started)

        from modloc.demo.export_stage import run_export_stage

        started = stage_start("export")
        report["export"] = run_export_stage(
            out, report["pretrain"]["checkpoint"], report["finetune"]["checkpoint"],
            validation=split_globs["validate"], test=split_globs["test"],
            truth=split_globs["test_truth"], class_ids=manifest["segment_class_ids"], k=k,
            pytorch={"fused": report["systems"]["mod"]["map"],
                     "dummy": report["systems"]["dummy"]["map"]})
        stage_done("export", started)

    started = stage_start("infer")
    report["infer"] = _infer_stage(out, report, split_globs, manifest["segment_class_ids"], k)
    stage_done("infer", started)

    started = stage_start("serve")
    report["serve"] = _serve_stage(out, report, split_globs, k)
    stage_done("serve", started)

    started = time.perf_counter()
    report["live"] = _live_stage(out, report, split_globs)
    stage_done("live", started)
    return report


def _live_stage(out: Path, report: dict, split_globs: dict) -> dict:
    """One test video through LocalizeLive; its final localization must equal Localize's."""
    import numpy as np

    from modloc.engine.service.client import LiveTimer, LocalizationClient, replay
    from modloc.engine.service.process import ServerProcess

    variants = report["infer"]["variants"]
    video_id = report["infer"]["timeline"]["video"]
    video = next(v for v in read_videos(split_globs["test"]) if v.id == video_id)
    server = ServerProcess.start(out / "export", "--video", variants["video"], "--segment",
                                 variants["segment"])
    try:
        with LocalizationClient(server.address, timeout=300) as client:
            [whole] = list(client.localize([video]))
            timer = LiveTimer()
            counts = {"window": 0, "candidates": 0, "final": 0}
            latencies, final = [], None
            for event in client.localize_live(video.id, replay(video.features, 1, LIVE_SPEED),
                                              timer=timer):
                kind = event.WhichOneof("event")
                counts[kind] += 1
                if kind == "window":
                    latencies.append(timer.latency(event.window))
                elif kind == "final":
                    final = event.final.localization
    finally:
        status = server.stop()
    if status != 0:
        raise RuntimeError(f"modloc serve exited with status {status} after SIGTERM:\n{server.log()}")
    difference = _localization_difference(final, whole)
    if difference > LIVE_AGREEMENT:
        raise ValueError(f"the live stream's final localization of {video_id!r} differs from "
                         f"Localize's by a relative {difference:.3g} (> {LIVE_AGREEMENT:g})")
    return {"video": video_id, "frames": len(video.features), "speed": LIVE_SPEED,
            "window_events": counts["window"], "candidate_updates": counts["candidates"],
            "latency_ms": {"p50": round(float(np.percentile(latencies, 50)) * 1000, 2),
                           "p99": round(float(np.percentile(latencies, 99)) * 1000, 2)},
            "final_equals_localize": True, "max_relative_difference": difference}


def _localization_difference(live, whole) -> float:
    """The largest relative difference between two LocalizeResponses' scores; inf when their
    frames, candidates or segments differ."""
    if live.num_frames != whole.num_frames or \
            [c.class_id for c in live.candidates] != [c.class_id for c in whole.candidates]:
        return float("inf")
    worst = 0.0
    for a, b in zip(live.candidates, whole.candidates, strict=True):
        mine = {s.start_seconds: s.score for s in a.segments}
        theirs = {s.start_seconds: s.score for s in b.segments}
        if mine.keys() != theirs.keys():
            return float("inf")
        pairs = [(a.video_score, b.video_score), *((mine[s], theirs[s]) for s in mine)]
        worst = max([worst, *(abs(x - y) / max(abs(y), 1e-30) for x, y in pairs)])
    return worst


def _serve_stage(out: Path, report: dict, split_globs: dict, k: int) -> dict:
    """The test split through the gRPC service; its submission must score as ``infer``'s."""
    import shutil

    from modloc.engine.service.client import LocalizationClient
    from modloc.engine.service.process import ServerProcess

    state = out / "serve-state"
    shutil.rmtree(state, ignore_errors=True)  # a rerun starts from empty rankings
    variants = report["infer"]["variants"]
    server = ServerProcess.start(out / "export", "--video", variants["video"], "--segment",
                                 variants["segment"], "--k", str(k), "--state-dir", str(state))
    try:
        videos = list(read_videos(split_globs["test"]))
        with LocalizationClient(server.address, timeout=300) as client:
            started = time.perf_counter()
            with Progress("localize over gRPC", len(videos), "video") as bar:
                localized = sum(1 for _ in bar.each(client.localize(videos)))
            localize_seconds = time.perf_counter() - started
            started = time.perf_counter()
            acks = client.ingest(videos, progress=True)
            ingest_seconds = time.perf_counter() - started
            path = out / "served_submission.csv"
            client.submission(path)
            stats = client.stats()
    finally:
        status = server.stop()
    if status != 0:
        raise RuntimeError(f"modloc serve exited with status {status} after SIGTERM:\n{server.log()}")
    scores = evaluate_submission(str(path), split_globs["test_truth"], k=k)
    if abs(scores["map"] - report["infer"]["map"]) > MAP_AGREEMENT:
        raise ValueError(f"the service's submission scores {scores['map']:.6f}, modloc infer's "
                         f"{report['infer']['map']:.6f}")
    return {"address": server.address, "submission": str(path), "map": scores["map"],
            "classes": scores["classes"], "localized": localized, "ingested": len(acks),
            "localize_videos_per_second": round(localized / localize_seconds, 1),
            "ingest_videos_per_second": round(len(acks) / ingest_seconds, 1),
            "windows_scored": stats.windows_scored, "exit_status": status}


def _infer_stage(out: Path, report: dict, split_globs: dict, class_ids: list[int], k: int) -> dict:
    """``modloc infer`` on the test split with the exported ensembles, and one timeline."""
    from modloc.engine.runtime.fusion import FusionConfig
    from modloc.engine.runtime.infer import infer
    from modloc.engine.runtime.pipeline import PipelineConfig
    from modloc.engine.runtime.timeline import show

    variants = {"video": "ensemble-fp32", "segment": "ensemble-fp32"}
    result = infer(out / "export", split_globs["test"], out / "submission.csv",
                   truth=split_globs["test_truth"], **variants,
                   config=PipelineConfig(fusion=FusionConfig(k=k)), class_ids=class_ids)
    exported = report["export"]["onnxruntime"]["fp32"]["fused"]
    if abs(result["map"] - exported) > MAP_AGREEMENT:
        raise ValueError(f"modloc infer's MAP@K {result['map']:.6f} differs from the export stage's "
                         f"{exported:.6f} for the same artifacts")
    busiest = max(read_videos(split_globs["test_truth"]),
                  key=lambda video: (int((video.segment_scores > 0).sum()), video.id))
    timeline = show(busiest.id, out / "export", split_globs["test"], out / "timeline.png",
                    truth=split_globs["test_truth"], **variants)
    return {**{key: result[key] for key in ("submission", "map", "classes", "videos", "windows",
                                            "videos_per_second", "segments_per_second", "seconds")},
            "variants": variants, "dummy_map": report["systems"]["dummy"]["map"],
            "beats_dummy": result["map"] > report["systems"]["dummy"]["map"],
            "timeline": {"video": busiest.id, "png": timeline["png"]}}


def _evaluate_stage(report: dict, split_globs: dict, class_ids: list[int], submissions: Path,
                    k: int) -> dict:
    """Score the fine-tuned system and the dummy prediction into ``report["systems"]``."""
    from modloc.engine.runtime.fusion import FusionConfig
    from modloc.training.checkpoint import load_checkpoint
    from modloc.training.evaluate import evaluate_segments, evaluate_videos

    video = load_checkpoint(report["pretrain"]["checkpoint"])
    segment = load_checkpoint(report["finetune"]["checkpoint"])
    fusion = FusionConfig(k=k)
    result = evaluate_segments(video, segment, split_globs["test"], split_globs["test_truth"],
                               class_ids, fusion, submissions=submissions)
    for system, name in (("mod", "fused"), ("dummy", "dummy")):
        report["systems"][system] = {"map": result[name]["map"], "ceiling": result[name]["ceiling"],
                                     "classes": result[name]["classes"], "k": k,
                                     "submission": result[name]["submission"]}
    videos = evaluate_videos(video, split_globs["validate"])
    return {
        "videos": result["videos"], "windows": result["windows"], "top_n": fusion.top_n,
        "exponents": [fusion.video_exponent, fusion.segment_exponent],
        "pretrained_video_metrics": {key: videos[key] for key in ("gap", "hit_at_one", "perr", "map")},
    }
