"""Mistakes a user makes, met as a script meets them (stdout and stderr piped): one line, no
traceback, a non-zero status, nothing left behind; and wrong inputs refused rather than
answered with a number that means nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import TINY_MODEL, split, synth_manifest

from modloc.cli import main
from modloc.engine.base.baselines import oracle_rankings
from modloc.engine.base.io import read_videos
from modloc.engine.base.submission import write_submission

TINY_OVERRIDES = [f"--model-override={key}={json.dumps(value)}".replace(" ", "")
                  for key, value in TINY_MODEL.items()]


def modloc(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modloc", *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def error_line(done: subprocess.CompletedProcess, verb: str) -> str:
    """The one error line of a failed verb; progress lines (time-stamped) may come before it."""
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if not line.startswith("[")]
    assert len(lines) == 1 and lines[0].startswith(f"modloc {verb}: error: "), done.stderr
    return lines[0]


def test_a_mistyped_preset_or_setting_is_one_line_and_leaves_no_run_directory(tmp_path):
    line = error_line(modloc("train", "--data", "x.tfrecord", "--out", "run", "--model", "mod4x3",
                             cwd=tmp_path), "train")
    assert "unknown model 'mod4x3' (did you mean 'mod_4x3'?); known: nextvlad," in line
    line = error_line(modloc("train", "--data", "x.tfrecord", "--out", "run", "--model-override",
                             "hidden=64", "--print-config", cwd=tmp_path), "train")
    assert "model mod_4x3: no setting 'hidden' to override (did you mean 'hidden_size'?)" in line
    assert not (tmp_path / "run").exists()


def test_inspect_refuses_a_text_file_and_suggests_the_glob_for_a_folder(tmp_path):
    (tmp_path / "notes.tfrecord").write_text("notes\n")
    line = error_line(modloc("inspect", "notes.tfrecord", cwd=tmp_path), "inspect")
    assert line.endswith("notes.tfrecord: not a TFRecord file (record 0 at byte offset 0: "
                         "truncated header: 6 of 12 bytes)")
    (tmp_path / "validate").mkdir()
    line = error_line(modloc("inspect", "validate", cwd=tmp_path), "inspect")
    assert line.endswith("'validate' is a directory: name its files, e.g. 'validate/*.tfrecord' "
                         "(quoted)")


def test_a_closed_pipe_ends_quietly():
    process = subprocess.Popen([sys.executable, "-m", "modloc", "models", "--classes", "1000"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before the verb writes (`| head -0`)
    assert process.wait(timeout=120) == 141
    assert process.stderr.read() == b""


def test_training_on_unlabelled_videos_is_refused(tiny_dataset, tmp_path):
    line = error_line(modloc("train", "--data", split(tiny_dataset, "test"), "--out", "run",
                             *TINY_OVERRIDES, "--classes", "segment", cwd=tmp_path), "train")
    assert line.endswith(f"the training data {split(tiny_dataset, 'test')} (--data) holds no video "
                         "label in its first 64 videos: an unlabelled split (test) cannot train a "
                         "model; give labelled videos (train or validate)")
    assert not (tmp_path / "run").exists()


def test_fine_tuning_without_ratings_is_refused(tiny_checkpoints, tiny_dataset, tmp_path):
    line = error_line(modloc("finetune", "--from", tiny_checkpoints["video"], "--data",
                             split(tiny_dataset, "train"), cwd=tmp_path), "finetune")
    assert line.endswith(f"the training data {split(tiny_dataset, 'train')} (--data) holds no rated "
                         "segment in its first 64 videos: fine-tuning learns from segment ratings "
                         "(a validate split), not from video labels")
    # its own run directory by default, not pre-training's
    assert not (tmp_path / "runs").exists()


def test_fine_tuning_defaults_to_its_own_run_directory(capsys, tiny_checkpoints):
    assert main(["finetune", "--from", tiny_checkpoints["video"], "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == "runs/finetune"
    assert main(["train", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == "runs/pretrain"


def test_a_batch_larger_than_the_data_suggests_the_batch_size(tiny_dataset, tmp_path):
    classes = ",".join(map(str, synth_manifest(tiny_dataset)["segment_class_ids"]))
    line = error_line(modloc("train", "--data", split(tiny_dataset, "train"), "--out", "run",
                             *TINY_OVERRIDES, "--classes", classes, "--batch-size", "800",
                             "--pad-to", "longest", "--max-frames", "10", cwd=tmp_path), "train")
    assert line.endswith(f"epoch 0 of {split(tiny_dataset, 'train')} holds no full batch of 800 "
                         "examples (it gave 48): give a smaller --batch-size (batch_size)")
    assert not (tmp_path / "run").exists()


def test_evaluate_refuses_another_splits_truth(tiny_checkpoints, tiny_dataset, tmp_path):
    argv = ["evaluate", "--checkpoint", tiny_checkpoints["video"], "--test",
            split(tiny_dataset, "test"), "--truth", split(tiny_dataset, "validate"), "--classes",
            str(tiny_dataset / "synth.json")]
    line = error_line(modloc(*argv), "evaluate")
    assert f"the test split {split(tiny_dataset, 'test')} covers 0 of the " in line
    assert f"labelled videos of {split(tiny_dataset, 'validate')}" in line
    assert "are they of the same split? (at least 50% must be covered; --allow-low-overlap" in line
    done = modloc(*argv, "--allow-low-overlap", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["segments"]["fused"]["map"] == 0
    assert "WARNING" in done.stderr and "Scoring it anyway (--allow-low-overlap)" in done.stderr


def test_eval_scores_a_submission_over_the_labels_class_space(tiny_dataset, tmp_path):
    """The synthetic classes' rows only (as modloc infer writes them for the demo): scored;
    the Kaggle 1,000-row rule on request; another split's labels refused."""
    truth = split(tiny_dataset, "test_truth")
    classes = synth_manifest(tiny_dataset)["segment_class_ids"]
    submission = tmp_path / "submission.csv"
    write_submission(submission, oracle_rankings(read_videos(truth)), class_ids=classes)
    done = modloc("eval", "--submission", str(submission), "--labels", truth, "--json")
    assert done.returncode == 0, done.stderr
    scores = json.loads(done.stdout)
    assert scores["map"] == 1.0 and scores["class_space"] == "the labels' rated classes"
    assert scores["rated_videos"] >= scores["rated_videos_submitted"] >= scores["rated_videos"] / 2
    line = error_line(modloc("eval", "--submission", str(submission), "--labels", truth,
                             "--kaggle-rows"), "eval")
    assert "invalid submission:" in line and "missing class: class " in line
    line = error_line(modloc("eval", "--submission", str(submission), "--labels",
                             split(tiny_dataset, "validate")), "eval")
    assert f"{submission} covers 0 of the " in line and "are they of the same split?" in line


def test_infer_writes_the_video_predictions_that_eval_scores(tiny_artifacts, tiny_dataset,
                                                             tmp_path, capsys):
    predictions = tmp_path / "videos.csv"
    assert main(["infer", str(tiny_artifacts), "--data", split(tiny_dataset, "test"), "--out",
                 str(tmp_path / "submission.csv"), "--video-predictions", str(predictions),
                 "--top-n", "5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["video_predictions"] == str(predictions)
    lines = predictions.read_text().splitlines()
    assert lines[0] == "VideoId,LabelConfidencePairs" and len(lines) == 1 + report["videos"]
    first = lines[1].split(",")[1].split()
    assert len(first) == 10 and float(first[1]) >= float(first[3])  # 5 pairs, by score
    done = modloc("eval", "--predictions", str(predictions), "--labels",
                  split(tiny_dataset, "test_truth"), "--json")
    assert done.returncode == 0, done.stderr
    scored = json.loads(done.stdout)
    assert scored["videos"] == report["videos"] and scored["videos_without_predictions"] == 0
    assert 0 < scored["hit_at_one"] <= 1 and 0 < scored["gap"] <= 1
    # the same file against the train split's labels: not one of its videos
    line = error_line(modloc("eval", "--predictions", str(predictions), "--labels",
                             split(tiny_dataset, "train")), "eval")
    assert f"{predictions} covers 0 of the " in line


@pytest.mark.parametrize("verb", ["train", "finetune", "export", "infer", "eval", "evaluate"])
def test_help_cites_only_files_in_the_repository(capsys, verb):
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    shown = capsys.readouterr().out
    assert "../shared" not in shown and "REFERENCE §" not in shown.replace("docs/REFERENCE.md §", "")
    assert "section 7" not in shown


def test_the_readme_cites_only_files_in_the_repository():
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    assert "../shared" not in readme and "section 7" not in readme
    assert "REFERENCE §" not in readme.replace("docs/REFERENCE.md §", "")
    assert (root / "docs" / "REFERENCE.md").is_file()
    # every repository path the README names in backquotes exists
    import re

    for path in set(re.findall(r"`((?:docs|engine|training|export|modloc|benchmarks|tests|proto|native)"
                               r"/[\w./-]+\.\w+)`", readme)):
        assert (root / path).exists(), path
    assert os.path.exists(root / "tests" / "data" / "yt8m" / "SOURCES.md")
