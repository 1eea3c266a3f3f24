"""benchmarks/synthetic_tables.py: the smoke scale end to end, resuming, and its statistics."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
from conftest import REPO

pytest.importorskip("torch")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def tables():
    """The benchmark script as a module (benchmarks/ is not a package: scripts import _common)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        yield importlib.import_module("synthetic_tables")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


ROWS = ("dummy", "dbof", "mix_t20")


def _result_files(work: Path) -> dict[str, bytes]:
    return {str(path.relative_to(work)): path.read_bytes()
            for path in sorted((work / "results").rglob("*.json"))}


def test_smoke_run_writes_the_table_and_resumes(tables, tmp_path):
    out, work = tmp_path / "out" / "tables.md", tmp_path / "work"
    argv = ["--scale", "smoke", "--rows", ",".join(ROWS), "--out", str(out), "--work", str(work),
            "--workers", "1", "--device", "cpu"]

    assert tables.main(argv) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    # the video model, DBoF from scratch, the mixture's pre-training and its fine-tuning
    assert (report["trained"], report["evaluated"], report["cached"]) == (4, 3, 0)
    assert list(report["rows"]) == list(ROWS)
    for key, row in report["rows"].items():
        assert 0.0 <= row["mean"] <= 1.0 and row["n"] == 1 and row["seeds"] == [0], key
        assert row["scaled_parameters"] > 0 and row["paper_parameters"] > row["scaled_parameters"]
    # the dummy row is the dummy prediction of the shared video model, as every row's is
    dummy = report["results"]["dummy"][0]["map"]
    assert all(r[0]["dummy_map"] == pytest.approx(dummy) for r in report["results"].values())
    # ... and every row ranks the windows of the same candidates: one ceiling, above each MAP
    ceiling = report["ceilings"]["0"]
    for results in report["results"].values():
        assert results[0]["ceiling"] == pytest.approx(ceiling) and results[0]["map"] <= ceiling
        assert 0.0 < results[0]["all_classes_map"] <= 1.0
        assert results[0]["all_classes_top_n"] == 18  # the smoke data's 12 + 6 classes
    # the paper-scale column is the paper's (REFERENCE §9: 83M, 16M, 250M)
    paper = {key: row["paper_parameters"] / 1e6 for key, row in report["rows"].items()}
    assert paper == pytest.approx({"dummy": 83.0, "dbof": 15.7, "mix_t20": 249.1}, abs=0.1)

    text = out.read_text()
    for key, row in report["rows"].items():
        line = next(line for line in text.splitlines() if f"(`{key}`)" in line)
        assert f"{row['mean']:.4f}" in line
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    before = _result_files(work)
    assert len(before) == len(ROWS)
    assert tables.main(argv) == 0  # resumed: nothing trained or evaluated again
    again = json.loads(out.with_suffix(".json").read_text())
    assert (again["trained"], again["evaluated"], again["cached"]) == (0, 0, 3)
    assert _result_files(work) == before
    assert again["rows"] == report["rows"]


def test_changed_settings_retrain_only_what_they_touch(tables, tmp_path, monkeypatch):
    out, work = tmp_path / "tables.md", tmp_path / "work"
    argv = ["--scale", "smoke", "--rows", "dummy,dbof", "--out", str(out), "--work", str(work),
            "--workers", "1", "--device", "cpu"]
    assert tables.main(argv) == 0
    smoke = tables.SCALES["smoke"]
    changed = tables.dataclasses.replace(smoke, dbof={**smoke.dbof, "hidden_size": 4})
    monkeypatch.setitem(tables.SCALES, "smoke", changed)
    assert tables.main(argv) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    # only DBoF's run and result changed hash; the video model and the dummy are reused
    assert (report["trained"], report["evaluated"], report["cached"]) == (1, 1, 1)


def test_an_unrecorded_run_is_resumed_and_a_torn_result_rescored(tables, tmp_path):
    out, work = tmp_path / "tables.md", tmp_path / "work"
    argv = ["--scale", "smoke", "--rows", "dummy", "--out", str(out), "--work", str(work),
            "--workers", "1", "--device", "cpu"]
    assert tables.main(argv) == 0
    (run_json,) = (work / "runs").rglob("run.json")
    run_json.unlink()  # as if killed after its last checkpoint, before the run was recorded
    (result,) = (work / "results").rglob("*.json")
    result.write_text('{"row": "dum')  # as if torn mid-write
    assert tables.main(argv) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert (report["trained"], report["evaluated"]) == (1, 1)


class _Killed(Exception):
    """Stands for the process being killed mid-run."""


def test_a_run_killed_midway_resumes_from_its_checkpoint(tables, tmp_path, monkeypatch):
    from modloc.training.trainer import Trainer

    def argv(work: Path) -> list[str]:
        return ["--scale", "smoke", "--rows", "dummy", "--out", str(work / "tables.md"),
                "--work", str(work), "--workers", "1", "--device", "cpu"]

    monkeypatch.setattr(tables, "CHECKPOINT_EVERY", 2)
    assert tables.main(argv(tmp_path / "whole")) == 0
    whole = json.loads((tmp_path / "whole" / "tables.json").read_text())

    step = Trainer._step

    def dies_after_step_5(self, batch):
        if self.state.step == 5:  # past the checkpoint of step 4, before step 6's
            raise _Killed
        return step(self, batch)

    killed = tmp_path / "killed"
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_step", dies_after_step_5)
        with pytest.raises(_Killed):
            tables.main(argv(killed))
    (run_dir,) = [path for path in (killed / "runs" / "seed-0").iterdir() if path.is_dir()]
    assert [path.name for path in run_dir.glob("step-*")] == ["step-00000004"]
    assert not (run_dir / "run.json").exists()

    assert tables.main(argv(killed)) == 0
    record = json.loads((run_dir / "run.json").read_text())
    assert record["resumed_at_step"] == 4 and record["steps"] == 6 and record["seconds"] > 0
    resumed = json.loads((killed / "tables.json").read_text())
    # the trainer's resume is exact: the same weights, so the same score
    assert resumed["results"]["dummy"][0]["map"] == whole["results"]["dummy"][0]["map"]


def test_two_jobs_share_a_seed_without_doing_anything_twice(tables, tmp_path):
    def argv(work: Path, *extra: str) -> list[str]:
        return ["--scale", "smoke", "--rows", "dummy,dbof", "--seeds", "1", "--out",
                str(work / "tables.md"), "--work", str(work), "--workers", "1", "--device", "cpu", *extra]

    # one seed, two processes at once: one from the first row, one from the last; both rows
    # start with the video model, so one process waits on the other's lock
    assert tables.main(argv(tmp_path / "parallel", "--jobs", "2")) == 0
    parallel = json.loads((tmp_path / "parallel" / "tables.json").read_text())
    # the video model and DBoF trained once each, each row scored once, and the main
    # process found everything done
    assert (parallel["trained"], parallel["evaluated"], parallel["cached"]) == (2, 2, 2)
    assert tables.main(argv(tmp_path / "serial")) == 0
    serial = json.loads((tmp_path / "serial" / "tables.json").read_text())
    assert ({row: [r["map"] for r in results] for row, results in parallel["results"].items()}
            == {row: [r["map"] for r in results] for row, results in serial["results"].items()})


def test_unknown_rows_are_refused(tables, capsys):
    with pytest.raises(SystemExit):
        tables.main(["--scale", "smoke", "--rows", "dummy,nonsense"])
    assert "unknown row(s) ['nonsense']" in capsys.readouterr().err


@pytest.mark.parametrize(("dof", "expected"), [(1, 12.7062), (2, 4.3027), (3, 3.1824),
                                               (4, 2.7764), (9, 2.2622), (30, 2.0423)])
def test_t_quantile_matches_the_tables(tables, dof, expected):
    assert tables.t_quantile(0.95, dof) == pytest.approx(expected, abs=1e-4)


def test_mean_interval(tables):
    stats = tables.mean_interval([0.5, 0.6, 0.7])
    assert stats["mean"] == pytest.approx(0.6) and stats["std"] == pytest.approx(0.1)
    half = 4.302653 * 0.1 / math.sqrt(3)
    assert stats["ci"] == pytest.approx([0.6 - half, 0.6 + half], abs=1e-6)
    assert tables.mean_interval([0.4]) == {"n": 1, "mean": 0.4, "std": None, "ci": None}


def test_seeds_to_resolve_is_the_first_interval_clear_of_zero(tables):
    # mean 1, std 1: t(0.975, 5)/√6 = 1.050 still reaches 0, t(0.975, 6)/√7 = 0.925 does not
    assert tables.seeds_to_resolve({"mean": 1.0, "std": 1.0}) == 7
    assert tables.seeds_to_resolve({"mean": -1.0, "std": 1.0}) == 7  # either direction
    for ratio in (0.5, 2.0, 5.0, 12.0):  # std / mean: the answer is where the interval first clears 0
        found = tables.seeds_to_resolve({"mean": 0.01, "std": 0.01 * ratio})
        assert tables.t_quantile(0.95, found - 1) * ratio / math.sqrt(found) < 1
        assert found == 2 or tables.t_quantile(0.95, found - 2) * ratio / math.sqrt(found - 1) >= 1
    assert tables.seeds_to_resolve({"mean": 0.0, "std": 1.0}) is None
    assert tables.seeds_to_resolve({"mean": 0.5, "std": None}) is None
    assert tables.seeds_to_resolve({"mean": 0.5, "std": 0.0}) == 2
    assert tables.seeds_to_resolve({"mean": 0.001, "std": 1.0}) is None  # beyond 1,000 seeds
    # another confidence: mean 1, std 1 at 90% needs 5 (t(0.95, 4)/√5 = 0.953 < 1)
    assert tables.seeds_to_resolve({"mean": 1.0, "std": 1.0}, confidence=0.90) == 5


def test_claims_are_paired_by_seed(tables):
    rows = [row for row in tables.ROWS if row.key in ("nextvlad", "nextvlad_scratch")]
    results = {
        "nextvlad": [{"seed": s, "map": m, "ceiling": c, "all_classes_map": a, "scaled_parameters": 10,
                      "device": "cpu", "train_seconds": {"pretrain": 1.0, "finetune": 1.0}}
                     for s, m, c, a in ((0, 0.80, 0.85, 0.9), (1, 0.70, 0.75, 0.8), (2, 0.90, 0.95, 0.7))],
        "nextvlad_scratch": [{"seed": s, "map": m, "ceiling": c, "all_classes_map": a,
                              "scaled_parameters": 10, "device": "cpu",
                              "train_seconds": {"pretrain": 0.0, "finetune": 1.0}}
                             for s, m, c, a in ((2, 0.89, 0.95, 0.8), (0, 0.79, 0.85, 0.8),
                                                (1, 0.69, 0.75, 0.7))],
    }
    summary = tables.summarize(rows, results, pre_registered_seeds=3)
    (claim,) = summary["claims"]
    # the seeds' differences are all +0.01: a paired interval of zero width, though the rows'
    # own spreads overlap completely
    assert claim["difference"]["mean"] == pytest.approx(0.01)
    assert claim["difference"]["ci"] == pytest.approx([0.01, 0.01], abs=1e-9)
    # the scratch row sits 0.06 below the seeds' ceilings: all the better row could gain
    assert claim["headroom"] == pytest.approx(0.06)
    assert summary["ceilings"] == pytest.approx({0: 0.85, 1: 0.75, 2: 0.95})
    # every class a candidate: seed differences +0.1, +0.1, -0.1, paired by seed too
    assert claim["all_classes_difference"]["mean"] == pytest.approx(0.1 / 3)
    assert claim["all_classes_difference"]["n"] == 3
    # a zero-width interval needs 2 seeds; +0.1, +0.1, -0.1 (std / mean = 2√3) needs 49
    assert claim["seeds_to_resolve"] == [2, tables.seeds_to_resolve(claim["all_classes_difference"])]
    assert claim["seeds_to_resolve"][1] == 49
    assert summary["rows"]["nextvlad"]["of_ceiling"] == pytest.approx((0.8 / 0.85 + 0.7 / 0.75 + 0.9 / 0.95) / 3)


def test_paired_p_value_from_the_t_distribution(tables):
    # t = 4.302653 with 2 degrees of freedom is the 97.5% quantile: p = 0.05, two-sided
    std = 0.03
    mean = 4.302653 * std / math.sqrt(3)
    assert tables.paired_p_value({"n": 3, "mean": mean, "std": std}) == pytest.approx(0.05, abs=1e-6)
    assert tables.paired_p_value({"n": 3, "mean": -mean, "std": std}) == pytest.approx(0.05, abs=1e-6)
    # t = 2.570582 with 5 degrees of freedom: p = 0.05 as well
    assert tables.paired_p_value({"n": 6, "mean": 2.570582 * 0.01 / math.sqrt(6), "std": 0.01}) \
        == pytest.approx(0.05, abs=1e-6)
    assert tables.paired_p_value({"n": 1, "mean": 0.1, "std": None}) is None
    assert tables.paired_p_value({"n": 3, "mean": 0.1, "std": 0.0}) == 0.0


def test_holm_adjusts_step_down_and_keeps_the_order(tables):
    # sorted p 0.01, 0.03, 0.04 of 3 tests: × 3, × 2, × 1, then made non-decreasing
    assert tables.holm([0.01, 0.04, 0.03, None]) == pytest.approx([0.03, 0.06, 0.06, None])
    assert tables.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert tables.holm([]) == []


def test_only_the_pre_registered_seed_count_gives_verdicts(tables):
    rows = [row for row in tables.ROWS if row.key in ("nextvlad", "nextvlad_scratch")]

    def results(differences):
        made = {}
        for key, shift in (("nextvlad", 1.0), ("nextvlad_scratch", 0.0)):
            made[key] = [{"seed": seed, "map": 0.5 + shift * d, "ceiling": 0.9,
                          "all_classes_map": 0.5 + shift * d, "scaled_parameters": 10,
                          "device": "cpu", "train_seconds": {"pretrain": 1.0, "finetune": 1.0}}
                         for seed, d in enumerate(differences)]
        return made

    strong = [0.010, 0.011, 0.012]  # p ≈ 0.0033 per test; × 2 (Holm over 2 tests) still < 0.05
    confirmed = tables.summarize(rows, results(strong), pre_registered_seeds=3)
    assert confirmed["design"]["confirmatory"] and confirmed["design"]["family"] == 2
    (claim,) = confirmed["claims"]
    assert claim["holm_p"][0] == pytest.approx(2 * claim["p"][0])
    assert "| yes |" in tables.render_claims(confirmed)
    # the same numbers from more seeds than fixed in advance: exploratory, no verdict
    explored = tables.summarize(rows, results(strong + [0.011, 0.012, 0.010]), pre_registered_seeds=3)
    assert not explored["design"]["confirmatory"]
    text = tables.render_claims(explored)
    assert "**Exploratory.**" in text and "| yes |" not in text and "| exploratory: yes |" in text
    # a lower bound of +0.0000 is no verdict either: Holm's p decides, not the rounded interval
    weak = tables.summarize(rows, results([0.0, 0.004, 0.009]), pre_registered_seeds=3)
    assert weak["claims"][0]["holm_p"][0] > 0.05 and "not resolved" in tables.render_claims(weak)


def test_a_synth_variant_gets_its_own_dataset_work_and_table(tables, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the variant's default work directory is relative
    argv = ["--scale", "smoke", "--rows", "dummy", "--workers", "1", "--device", "cpu",
            "--synth", "signal=0.3", "--synth", "verticals=2"]
    assert tables.main(argv) == 0
    (work,) = (tmp_path / "runs").glob("tables-synth-*")
    report = json.loads((work / "tables.json").read_text())
    assert report["results"]["dummy"][0]["map"] > 0
    (data,) = work.glob("data-*")
    config = json.loads((data / "synth.json").read_text())["config"]
    assert (config["signal"], config["verticals"], config["test_videos"]) == (0.3, 2, 24)
    assert "\"signal\": 0.3" in (work / "tables.md").read_text()
    assert not (tmp_path / "runs" / "tables").exists()


@pytest.mark.parametrize(("change", "message"), [
    ("signal", "expected KEY=VALUE"), ("signal=abc", "not a number or JSON"),
    ("bogus=1", "unknown synth parameters"), ("signal=-1", "signal must be >= 0")])
def test_bad_synth_changes_are_refused(tables, capsys, change, message):
    with pytest.raises(SystemExit):
        tables.main(["--scale", "smoke", "--synth", change])
    assert message in capsys.readouterr().err


def test_the_chart_names_every_bar_apart_and_keeps_its_legend_off_the_bars(tables):
    stats = {"mean": 0.5, "std": 0.01}
    rows = {key: {"label": label, "group": group, **stats, "all_classes": stats}
            for key, label, group in (("nextvlad_scratch", "NeXtVLAD", "no pretrain"),
                                      ("nextvlad", "NeXtVLAD", "pretrain + fine-tune"),
                                      ("nextvlad_distill", "NeXtVLAD_distill (leaf 0 of MOD 4×3)",
                                       "pretrain + fine-tune"))}
    figure = tables.chart({"rows": rows, "ceilings": {"0": 0.9}}, "test")
    figure.canvas.draw()
    names = [label.get_text() for label in figure.axes[0].get_xticklabels()]
    assert names == ["NeXtVLAD (no pretrain)", "NeXtVLAD (pretrain + fine-tune)", "NeXtVLAD_distill"]
    legend = figure.legends[0].get_window_extent()
    assert all(legend.y1 <= axes.get_window_extent().y0 for axes in figure.axes)
