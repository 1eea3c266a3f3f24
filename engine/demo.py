"""``modloc demo``: the whole product end to end on the built-in synthetic data.

Stages (each adds one key to ``<out>/report.json``, rewritten after every stage so that a
failed run still shows how far it got):

- ``data``: generate the synthetic YouTube-8M-format dataset;
- ``inspect``: read every split back and count what is in it;
- ``systems``: write reference submissions for the test split and score them with the
  Kaggle MAP@K: ``random`` (a random ranking of all full test segments for each class)
  and ``perfect`` (the positives of the truth file, which must score exactly 1.0).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from engine.baselines import oracle_rankings, random_rankings, video_segment_ids
from engine.evaluation import evaluate_submission
from engine.inspection import inspect
from engine.io.readers import read_videos
from engine.metrics.segment import MAX_SEGMENTS_PER_CLASS
from engine.submission import write_submission
from engine.synth import SPLITS, config_from, generate

log = logging.getLogger(__name__)

INSPECT_KEYS = ("files", "records", "videos", "frames", "labels", "rated_segments",
                "positive_segments", "corrupt_records")


def write_report(path: Path, report: dict) -> None:
    """Write ``report`` as JSON atomically (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def run_demo(out_dir: str | os.PathLike = "runs/demo", preset: str = "demo", workers: int = 2,
             k: int = MAX_SEGMENTS_PER_CLASS) -> dict:
    """Run every stage under ``out_dir``; returns the report (also in ``report.json``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "report.json"
    report: dict = {"preset": preset, "stages": {}}

    def stage_done(name: str, started: float) -> None:
        report["stages"][name] = {"seconds": round(time.perf_counter() - started, 2)}
        write_report(report_path, report)
        log.info("demo stage %s done in %.1f s", name, report["stages"][name]["seconds"])

    started = time.perf_counter()
    data_dir = out / "data"
    config = config_from(preset)
    synth = generate(config, data_dir, workers=workers)
    manifest = json.loads((data_dir / "synth.json").read_text())
    report["data"] = {"path": str(data_dir), "seed": config.seed, "splits": synth.splits,
                      "segment_classes": len(manifest["segment_class_ids"])}
    stage_done("data", started)

    started = time.perf_counter()
    split_globs = {split: str(data_dir / pattern) for split, pattern in manifest["layout"].items()}
    report["inspect"] = {}
    for split in (*SPLITS, "test_truth"):
        counts = inspect(split_globs[split]).to_json()
        report["inspect"][split] = {key: counts[key] for key in INSPECT_KEYS}
    stage_done("inspect", started)

    started = time.perf_counter()
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
            "map": scores["map"], "classes": scores["classes"], "k": k, "submission": str(path),
        }
    report["systems"]["random"]["candidate_segments"] = len(test_segments)
    stage_done("systems", started)
    return report
