"""TensorRT: ``modloc build`` and the TensorRT backend, against ONNX Runtime on the same inputs.

Runs where TensorRT and an NVIDIA GPU are (``pip install 'modloc[trt]'``); everywhere else
every test skips with the reason. What the build consumes (graphs, profiles, manifests,
calibration data) is tested for real in test_export.py.

Tiny trees as in test_export.py: a video-level checkpoint and a segment-level one.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.tensorrt

trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed: pip install 'modloc[trt]' "
                                             "on a machine with an NVIDIA GPU")

from tiny import TINY_MODEL, split  # noqa: E402

from modloc.cli import main  # noqa: E402
from modloc.engine.runtime.artifacts import MANIFEST_FILE, ArtifactError, load_artifact  # noqa: E402
from modloc.engine.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend  # noqa: E402
from modloc.engine.runtime.backends.tensorrt_backend import TensorRTBackend, device_info  # noqa: E402
from modloc.export.exporter import ExportSettings, export_checkpoint  # noqa: E402
from modloc.export.onnx_export import parity_batches  # noqa: E402
from modloc.export.trt import BuildSettings, ShapeRange, build_plan, rebuild_plan  # noqa: E402
from modloc.training.config import load_config  # noqa: E402
from modloc.training.trainer import train  # noqa: E402

# probabilities: TensorRT against ONNX Runtime's CPU kernels on the same graph
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 3e-2, "int8": 3e-2}


def _gpu() -> dict | None:
    try:
        return device_info(0)
    except Exception:  # no CUDA bindings, no driver, no device: all mean "no GPU here"
        return None


if _gpu() is None:
    pytest.skip("no NVIDIA GPU visible (torch.cuda or cuda-python)", allow_module_level=True)


@pytest.fixture(scope="module")
def artifacts(tiny_dataset, tmp_path_factory) -> Path:
    """Distill and ensemble artifacts of both models in every precision the GPU can run."""
    out = tmp_path_factory.mktemp("trt")
    classes = json.loads((tiny_dataset / "synth.json").read_text())
    pretrained = train(load_config("pretrain", None, {
        "model.overrides": TINY_MODEL, "data.train": [split(tiny_dataset, "train")],
        "data.classes": classes["segment_class_ids"] + classes["extra_class_ids"],
        "data.pad_to": "longest", "batch_size": 8, "optimizer.learning_rate": 1e-3,
        "max_steps": 6, "progress": False, "device": "cpu", "out": str(out / "pretrain")}))
    finetuned = train(load_config("finetune", None, {
        "init_from": pretrained.checkpoint, "data.train": [split(tiny_dataset, "validate")],
        "data.classes": ",".join(map(str, classes["segment_class_ids"])), "batch_size": 8,
        "max_steps": 3, "epochs": None, "progress": False, "device": "cpu",
        "out": str(out / "finetune")}))
    precisions = ("fp32", "fp16", "int8", *(("bf16",) if _bf16_capable() else ()))
    settings = ExportSettings(precisions=precisions, validation=split(tiny_dataset, "validate"))
    export_checkpoint(pretrained.checkpoint, out / "video", settings)
    export_checkpoint(finetuned.checkpoint, out / "segment", settings)
    return out


def _bf16_capable() -> bool:
    major, minor = (int(part) for part in _gpu()["compute_capability"].split("."))
    return int(trt.__version__.split(".")[0]) >= 10 and (major, minor) >= (8, 0)


def _batches(kind: str) -> list[tuple[np.ndarray, np.ndarray]]:
    shapes = [(1, 5), (7, 5), (13, 5)] if kind == "segment" else [(1, 1), (3, 40), (2, 300)]
    return parity_batches(shapes, seed=11)


def _settings(kind: str) -> BuildSettings:
    frames = ShapeRange(1, 5, 5) if kind == "segment" else ShapeRange(1, 64, 300)
    return BuildSettings(batch=ShapeRange(1, 8, 16), frames=frames, workspace_mib=512)


@pytest.mark.parametrize("kind", ["video", "segment"])
@pytest.mark.parametrize("graph", ["distill", "ensemble"])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16", "int8"])
def test_engine_matches_onnxruntime(artifacts, kind, graph, precision):
    directory = artifacts / kind / f"{graph}-{precision}"
    if not directory.is_dir():
        pytest.skip(f"{precision} needs TensorRT >= 10 and compute capability >= 8.0")
    artifact = build_plan(directory, _settings(kind))
    plan = artifact.plan
    assert plan["tensorrt_version"] == trt.__version__ and plan["onnx_sha256"] == artifact.manifest["onnx"]["sha256"]
    assert plan["device"] == device_info(0)
    assert plan["strongly_typed"] == (int(trt.__version__.split(".")[0]) >= 10)
    # ONNX Runtime's CPU provider has no bf16 kernels: bf16 is compared with the fp32 graph
    reference = OnnxRuntimeBackend(load_artifact(artifacts / kind / f"{graph}-"
                                                 f"{'fp32' if precision == 'bf16' else precision}"))
    with TensorRTBackend(artifact) as engine:
        for features, num_frames in _batches(kind):
            np.testing.assert_allclose(engine.run(features, num_frames=num_frames),
                                       reference.run(features, num_frames=num_frames),
                                       atol=TOLERANCE[precision], rtol=TOLERANCE[precision])


def test_timing_cache_is_written_and_reused(artifacts):
    directory = artifacts / "segment" / "distill-fp32"
    first = build_plan(directory, _settings("segment"))
    cache = Path(first.plan["timing_cache"])
    assert cache.is_file() and cache.stat().st_size > 0
    first_cache = cache.read_bytes()
    second = build_plan(directory, _settings("segment"))
    assert second.plan["timing_cache"] == str(cache)
    # the second build starts from the first's cache (no timing assertion: a unit test cannot
    # promise build times): what it writes back holds at least what it read
    assert len(cache.read_bytes()) >= len(first_cache)


def test_streams_run_concurrently_and_large_batches_in_chunks(artifacts):
    artifact = build_plan(artifacts / "segment" / "ensemble-fp32", _settings("segment"))
    reference = OnnxRuntimeBackend(artifact)
    features, num_frames = parity_batches([(40, 5)], seed=2)[0]  # 40 rows, profile max 16
    expected = reference.run(features, num_frames=num_frames)
    with TensorRTBackend(artifact, streams=3) as engine:
        results: dict[int, np.ndarray] = {}

        def work(index: int) -> None:
            results[index] = engine.run(features, num_frames=num_frames)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(results) == 6
    for result in results.values():
        np.testing.assert_allclose(result, expected, atol=1e-4, rtol=1e-4)


def test_cuda_python_buffers_match_torch_buffers(artifacts):
    pytest.importorskip("cuda", reason="cuda-python is not installed")
    artifact = build_plan(artifacts / "video" / "distill-fp32", _settings("video"))
    features, num_frames = _batches("video")[1]
    with TensorRTBackend(artifact, memory="cuda-python") as plain:
        expected = plain.run(features, num_frames=num_frames)
    with TensorRTBackend(artifact) as default:
        np.testing.assert_allclose(default.run(features, num_frames=num_frames), expected, rtol=1e-6)


def test_a_plan_from_elsewhere_is_refused_or_rebuilt(artifacts):
    directory = artifacts / "video" / "ensemble-fp32"
    build_plan(directory, _settings("video"))
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    manifest["plan"]["tensorrt_version"] = "0.0.0"
    manifest["plan"]["device"]["compute_capability"] = "6.1"
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="built with TensorRT 0.0.0.*compute capability 6.1"):
        TensorRTBackend(load_artifact(directory))
    with TensorRTBackend(load_artifact(directory), rebuild=rebuild_plan) as engine:
        assert engine.artifact.plan["tensorrt_version"] == trt.__version__
        assert engine.artifact.plan["ranges"]["frames"] == {"min": 1, "opt": 64, "max": 300}
        features, num_frames = _batches("video")[2]
        assert engine.run(features, num_frames=num_frames).shape == (2, len(engine.class_ids))


def test_cli_build(artifacts, capsys):
    directory = artifacts / "segment" / "distill-int8"
    assert main(["build", str(directory), "--batch", "1,4,8", "--frames", "5", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)[str(directory)]
    assert plan["ranges"] == {"batch": {"min": 1, "opt": 4, "max": 8}, "frames": {"min": 5, "opt": 5, "max": 5}}
    assert load_artifact(directory).plan_path.is_file()
