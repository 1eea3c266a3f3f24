"""The ``modloc`` command line: JSON contracts, errors, help, and the demo."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from modloc.cli import main
from modloc.engine.base.baselines import oracle_rankings, random_rankings, video_segment_ids
from modloc.engine.base.io import read_videos
from modloc.engine.base.submission import write_submission

INSPECT_KEYS = {"records", "videos", "frames", "labels", "rated_segments", "positive_segments",
                "corrupt_records"}


def run_json(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_json_contract(capsys, tiny_dataset):
    summary = run_json(capsys, ["inspect", "--json", str(tiny_dataset / "validate" / "*.tfrecord")])
    assert INSPECT_KEYS <= summary.keys()
    manifest = json.loads((tiny_dataset / "synth.json").read_text())["splits"]["validate"]
    assert summary["videos"] == summary["records"] == manifest["videos"]
    assert summary["frames"] == manifest["frames"]
    assert summary["rated_segments"] == manifest["rated_segments"]
    assert summary["positive_segments"] == manifest["positive_segments"]
    assert summary["corrupt_records"] == 0


def test_inspect_counts_corrupt_records(capsys, tiny_dataset, tmp_path):
    source = sorted((tiny_dataset / "train").glob("*.tfrecord"))[0]
    damaged = tmp_path / "damaged.tfrecord"
    raw = bytearray(source.read_bytes())
    raw[100] ^= 0xFF  # inside record 0's data
    damaged.write_bytes(bytes(raw))
    summary = run_json(capsys, ["inspect", "--json", str(damaged)])
    assert summary["corrupt_records"] == 1
    assert summary["videos"] == summary["records"] == 15
    assert "record 0 at byte offset 0: data CRC mismatch" in summary["errors"][0]
    assert main(["inspect", "--strict", str(damaged)]) == 1
    assert "data CRC mismatch" in capsys.readouterr().err


def test_eval_perfect_and_random_submissions(capsys, tiny_dataset, tmp_path):
    truth_glob = str(tiny_dataset / "test_truth" / "*.tfrecord")
    perfect = tmp_path / "perfect.csv"
    write_submission(perfect, oracle_rankings(read_videos(truth_glob)))
    result = run_json(capsys, ["eval", "--json", "--submission", str(perfect), "--labels", truth_glob])
    assert {"map", "classes"} <= result.keys()
    assert result["map"] == 1.0 and result["classes"] > 0

    segments = video_segment_ids(read_videos(str(tiny_dataset / "test" / "*.tfrecord")))
    classes = json.loads((tiny_dataset / "synth.json").read_text())["segment_class_ids"]
    shuffled = tmp_path / "random.csv"
    write_submission(shuffled, random_rankings(segments, classes))
    result = run_json(capsys, ["eval", "--json", "--submission", str(shuffled), "--labels", truth_glob])
    assert 0.0 < result["map"] < 1.0
    # Only k entries of a row count: with k=1 a random row rarely starts with a rated positive.
    short = run_json(capsys, ["eval", "--json", "--submission", str(shuffled), "--labels", truth_glob,
                              "--k", "1"])
    assert short["map"] < result["map"]


def test_eval_video_predictions(capsys, tiny_dataset, tmp_path):
    from modloc.engine.base.submission import write_video_predictions

    videos = list(read_videos(str(tiny_dataset / "validate" / "*.tfrecord")))
    predictions = tmp_path / "pred.csv"
    write_video_predictions(predictions, {v.id: [(int(c), 1.0) for c in v.labels] for v in videos})
    result = run_json(capsys, ["eval", "--json", "--predictions", str(predictions), "--labels",
                               str(tiny_dataset / "validate" / "*.tfrecord")])
    assert result["gap"] == 1.0 and result["hit_at_one"] == 1.0 and result["perr"] == 1.0
    assert result["videos"] == len([v for v in videos if len(v.labels)])


@pytest.mark.parametrize("argv, message", [
    (["inspect", "/nonexistent/*.tfrecord"], "no TFRecord file matches '/nonexistent/*.tfrecord'"),
    (["eval", "--submission", "/nonexistent.csv", "--labels", "/nonexistent/x"], "/nonexistent.csv"),
    (["synth", "--out", "/tmp/x", "--preset", "tiny", "--min-frames", "50", "--max-frames", "10"],
     "min_frames"),
])
def test_errors_are_one_line(capsys, argv, message):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"modloc {argv[0]}: error: ") and message in err[0]


def test_bad_submission_is_refused_with_its_line(capsys, tiny_dataset, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("Class,Segments\n3,abc:7\n")
    assert main(["eval", "--submission", str(bad), "--labels",
                 str(tiny_dataset / "test_truth" / "*.tfrecord")]) == 1
    assert "line 2" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["synth", "inspect", "eval", "demo"])
def test_every_verb_has_help(capsys, verb):
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0
    assert "usage: modloc " + verb in capsys.readouterr().out


def test_console_script_synth_and_inspect(tmp_path):
    modloc = shutil.which("modloc", path=str(Path(sys.executable).parent))
    assert modloc, "the modloc console script is installed beside the interpreter"
    out = tmp_path / "data"
    subprocess.run([modloc, "synth", "--out", str(out), "--preset", "tiny", "--splits", "validate",
                    "--validate-videos", "5"], check=True, capture_output=True)
    done = subprocess.run([modloc, "inspect", "--json", str(out / "validate" / "*.tfrecord")],
                          check=True, capture_output=True, text=True)
    assert json.loads(done.stdout)["videos"] == 5


def test_demo_writes_report(capsys, tmp_path):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--preset", "tiny", "--workers", "1"]) == 0
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert {"data", "inspect", "systems", "stages"} <= report.keys()
    assert report["systems"]["perfect"]["map"] == 1.0
    assert 0.0 < report["systems"]["random"]["map"] < 1.0
    assert report["inspect"]["test"]["videos"] == report["data"]["splits"]["test"]["videos"]
    assert report["inspect"]["test_truth"]["frames"] == 0
    assert Path(report["systems"]["random"]["submission"]).is_file()
    assert {"pretrain", "finetune", "evaluate"} <= report.keys() & report["stages"].keys()
    for phase in ("pretrain", "finetune"):
        assert report[phase]["steps"] > 0 and report[phase]["final_loss"] < report[phase]["first_loss"]
        assert (Path(report[phase]["checkpoint"]) / "model.safetensors").is_file()
    assert report["finetune"]["temperatures"] == [20.0] and report["finetune"]["final_terms"]["kl"] > 0
    for system in ("mod", "dummy"):
        assert 0.0 < report["systems"][system]["map"] <= report["systems"][system]["ceiling"] <= 1.0
        assert Path(report["systems"][system]["submission"]).is_file()
    # the perfect submission holds every positive; mod and dummy rank the same candidates
    assert report["systems"]["perfect"]["ceiling"] == 1.0
    assert report["systems"]["mod"]["ceiling"] == report["systems"]["dummy"]["ceiling"]
    # The export stage: ONNX Runtime scores the test split exactly as PyTorch did.
    export = report["export"]
    assert "export" in report["stages"] and export["max_difference"] <= 1e-4
    assert {(a["kind"], a["graph"], a["precision"]) for a in export["artifacts"]} == {
        (kind, graph, precision) for kind in ("video", "segment")
        for graph in ("distill", "ensemble") for precision in ("fp32", "int8")}
    assert all((Path(a["path"]) / "manifest.json").is_file() for a in export["artifacts"])
    # infer and serve: the exported models rank the test split offline and through the
    # service, and both submissions score what the export stage measured
    assert {"infer", "serve"} <= report.keys() & report["stages"].keys()
    infer, serve = report["infer"], report["serve"]
    assert infer["map"] == pytest.approx(export["onnxruntime"]["fp32"]["fused"], abs=1e-4)
    # the systems' MAPs, from the PyTorch models in training's evaluation, are what the
    # exported graphs give through the engine's own code: one number, two paths
    assert report["systems"]["mod"]["map"] == pytest.approx(infer["map"], abs=1e-4)
    assert report["systems"]["dummy"]["map"] == pytest.approx(export["onnxruntime"]["fp32"]["dummy"],
                                                              abs=1e-4)
    assert serve["map"] == pytest.approx(infer["map"], abs=1e-4)
    assert serve["exit_status"] == 0
    assert serve["localized"] == serve["ingested"] == infer["videos"] == report["data"]["splits"]["test"]["videos"]
    assert Path(infer["submission"]).is_file() and Path(serve["submission"]).is_file()
    # live: a test video through LocalizeLive, one event per window, the same final answer
    live = report["live"]
    assert live["final_equals_localize"] and live["window_events"] == -(-live["frames"] // 5)
    assert "live" in report["stages"]
    assert f"LocalizeLive: {live['video']} ({live['frames']} frames" in capsys.readouterr().out


# --- failures a user meets: one line each ---------------------------------------------


def one_error_line(capsys, argv: list[str]) -> str:
    """Run a verb expected to fail; its stderr must be one ``modloc VERB: error: …`` line."""
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"modloc {argv[0]}: error: "), err
    return err[0]


@pytest.mark.parametrize("action", [["stats"], ["top", "3", "--k", "5"]])
def test_client_names_an_unreachable_server(capsys, action):
    line = one_error_line(capsys, ["client", action[0], "127.0.0.1:1", *action[1:], "--timeout", "10"])
    assert "UNAVAILABLE: the server at 127.0.0.1:1 could not be reached" in line


@pytest.fixture
def refusing_server():
    """A real gRPC server at a port of its own whose TopSegments aborts with INVALID_ARGUMENT
    for k=0 and, for any other k, does not answer until the test ends (a deadline passes)."""
    import threading
    from concurrent import futures

    from modloc.engine._proto.modloc.v1 import localization_pb2 as pb

    released = threading.Event()

    def top_segments(request, context):
        if request.k == 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "k=0 is outside 1..10000")
        released.wait(60)
        return iter(())

    handler = grpc.method_handlers_generic_handler("modloc.v1.Localization", {
        "TopSegments": grpc.unary_stream_rpc_method_handler(
            top_segments, request_deserializer=pb.TopSegmentsRequest.FromString,
            response_serializer=pb.RankedSegment.SerializeToString)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    released.set()
    server.stop(None).wait()


@pytest.mark.parametrize("k, expected", [
    ("0", "INVALID_ARGUMENT: k=0 is outside 1..10000"),
    ("5", "DEADLINE_EXCEEDED: the server at {address} did not answer within --timeout 0.5 s"),
])
def test_client_refusals_are_one_line(capsys, refusing_server, k, expected):
    line = one_error_line(capsys, ["client", "top", refusing_server, "3", "--k", k,
                                   "--timeout", "0.5"])
    assert line.endswith(f"error: {expected.format(address=refusing_server)}")


def test_serve_names_an_address_in_use(capsys, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        # the bind comes before the artifacts are read: an empty directory does
        line = one_error_line(capsys, ["serve", str(tmp_path), "--address", address])
    assert f"--address {address}: cannot listen there" in line


def _backend_failure(backend: str) -> Exception:
    """What opening ``backend`` raises on this machine; skips where it would work."""
    if backend == "tensorrt":
        from modloc.engine.runtime.backends.tensorrt_backend import import_tensorrt

        try:
            import_tensorrt()
        except ImportError as error:
            return error
        pytest.skip("TensorRT is installed")
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    from modloc.engine.runtime.backends.torch_backend import _device

    with pytest.raises(RuntimeError) as raised:
        _device(torch, "cuda")
    return raised.value


@pytest.mark.parametrize("backend", ["tensorrt", "torch on cuda"])
def test_backend_failures_are_one_line(capsys, monkeypatch, backend):
    """The ImportError (no TensorRT) and RuntimeError (no CUDA) the backends raise from inside
    ``infer`` reach the user as one line."""
    failure = _backend_failure(backend)

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr("modloc.engine.runtime.infer.infer", fail)
    line = one_error_line(capsys, ["infer", "artifacts", "--data", "x.tfrecord", "--out", "s.csv"])
    assert line.endswith(str(failure))


def test_traceback_on_request(monkeypatch):
    monkeypatch.setenv("MODLOC_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError, match="no TFRecord file matches"):
        main(["inspect", "/nonexistent/*.tfrecord"])


@pytest.mark.parametrize("verb", ["train", "evaluate"])
@pytest.mark.parametrize("device", ["tpu", "cuda:64"])
def test_unusable_device_is_refused_up_front(capsys, tmp_path, verb, device):
    pytest.importorskip("torch")
    argv = (["train", "--data", "x.tfrecord", "--out", str(tmp_path / "run")] if verb == "train"
            else ["evaluate", "--checkpoint", str(tmp_path), "--labels", "x.tfrecord"])
    line = one_error_line(capsys, [*argv, "--device", device])
    assert f"device '{device}' is not usable here" in line and "runs on auto, cpu" in line


def test_synth_refuses_no_workers(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["synth", "--out", str(tmp_path), "--workers", "0"])
    assert "--workers: expected an integer >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("classes", ["-5", "0"])
def test_models_refuses_a_class_count_below_one(capsys, classes):
    pytest.importorskip("torch")
    with pytest.raises(SystemExit) as exit_info:
        main(["models", "--classes", classes])
    assert exit_info.value.code == 2
    assert f"argument --classes: expected an integer >= 1, got {classes}" in capsys.readouterr().err


def test_demo_help_names_every_stage(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for stage in ("inspect", "pre-train", "fine-tune", "export", "infer", "serve"):
        assert stage in shown, stage


def test_rebuild_plans_hands_the_tensorrt_backend_the_export_rebuild_hook(capsys):
    from modloc.cli import build_parser
    from modloc.cli.runtime import pipeline_settings
    from modloc.export.trt import rebuild_plan

    parser = build_parser()
    _, options = pipeline_settings(parser.parse_args(
        ["infer", "artifacts", "--data", "x", "--out", "y", "--backend", "tensorrt", "--rebuild-plans"]))
    assert options == {"rebuild": rebuild_plan}
    assert main(["infer", "artifacts", "--data", "x", "--out", "y", "--rebuild-plans"]) == 1
    assert "--rebuild-plans is an option of the tensorrt backend" in capsys.readouterr().err
