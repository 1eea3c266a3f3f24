"""Export: checkpoints → ONNX artifacts (distill leaf, ensemble; video, segment), the parity
gate, precision variants, the artifact contract the engine enforces, the ONNX Runtime
backend, the demo's export stage and the TensorRT build settings (TensorRT itself runs in
test_trt.py, on machines that have it).

Every model is a tiny tree (branching (2, 2), K=4, G=2, λ=2, H=16) trained for a few steps
on the ``tiny`` synthetic dataset: a video-level checkpoint and a segment-level one
fine-tuned from it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from tiny import split, synth_manifest

from modloc.cli import main
from modloc.demo.export_stage import run_export_stage
from modloc.engine.runtime.artifacts import (
    MANIFEST_FILE,
    ONNX_FILE,
    PLAN_FILE,
    PT2_FILE,
    ArtifactError,
    TensorSpec,
    describe_manifest,
    file_sha256,
    load_artifact,
)
from modloc.engine.runtime.backends import graph_inputs, open_backend
from modloc.engine.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend, uint8_activations
from modloc.engine.runtime.backends.tensorrt_backend import plan_mismatches
from modloc.engine.runtime.offline_eval import video_batches
from modloc.export.exporter import ExportSettings, export_checkpoint
from modloc.export.gate import (
    MAP_TOLERANCE,
    Agreement,
    GateThresholds,
    quality_gate,
    rank_correlation,
)
from modloc.export.graph import export_module
from modloc.export.onnx_export import (
    ParityError,
    check_parity,
    downgrade_to_opset_17,
    parity_batches,
)
from modloc.export.precision import calibration_batches
from modloc.export.trt import (
    ShapeRange,
    build_mode,
    check_device,
    default_timing_cache,
    optimization_profile,
)
from modloc.export.validation import validation_map
from modloc.training.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def stage(tiny_checkpoints, tiny_dataset, tmp_path_factory) -> tuple[Path, dict]:
    """The demo's export stage: distill and ensemble, fp32 and INT8, for both models."""
    out = tmp_path_factory.mktemp("demo")
    report = run_export_stage(out, tiny_checkpoints["video"], tiny_checkpoints["segment"],
                              split(tiny_dataset, "validate"), split(tiny_dataset, "test"),
                              split(tiny_dataset, "test_truth"),
                              class_ids=synth_manifest(tiny_dataset)["segment_class_ids"])
    return out / "export", report


def torch_probabilities(model, features: np.ndarray, num_frames: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        output = model(torch.from_numpy(features), torch.from_numpy(num_frames))
    return torch.sigmoid(getattr(output, "root", output)).numpy()


def onnx_types(path: Path) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The model and the element type of every tensor (shape inference included)."""
    model = onnx.shape_inference.infer_shapes(onnx.load(path))
    types = {value.name: value.type.tensor_type.elem_type
             for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]}
    types.update({tensor.name: tensor.data_type for tensor in model.graph.initializer})
    return model, types


# --- the bars: modloc export, parity, the demo stage ---------------------------------


def test_demo_stage_scores_the_test_split_with_pytorchs_map(stage):
    root, report = stage
    assert report["max_difference"] <= 1e-4
    assert report["onnxruntime"]["fp32"]["fused"] == pytest.approx(report["pytorch"]["fused"], abs=1e-4)
    assert report["onnxruntime"]["fp32"]["dummy"] == pytest.approx(report["pytorch"]["dummy"], abs=1e-4)
    # INT8 passed the export's quality gate (its every-class MAP@K within 0.005 of fp32's on the
    # validation split, and agreement with fp32); on the test split it must stay as close
    int8, fp32 = report["onnxruntime"]["int8"]["fused"], report["onnxruntime"]["fp32"]["fused"]
    assert int8 == pytest.approx(fp32, abs=MAP_TOLERANCE)
    names = sorted(str(Path(item["path"]).relative_to(root)) for item in report["artifacts"])
    assert names == [f"{kind}/{graph}-{precision}" for kind in ("segment", "video")
                     for graph in ("distill", "ensemble") for precision in ("fp32", "int8")]


@pytest.mark.parametrize("kind", ["video", "segment"])
@pytest.mark.parametrize("graph", ["distill", "ensemble"])
def test_artifacts_pass_the_parity_gate_and_describe_themselves(stage, tiny_checkpoints, kind, graph):
    root, _ = stage
    checkpoint = load_checkpoint(tiny_checkpoints[kind])
    artifact = load_artifact(root / kind / f"{graph}-fp32")
    manifest = artifact.manifest
    assert (artifact.kind, artifact.graph, artifact.precision) == (kind, graph, "fp32")
    assert artifact.class_ids == checkpoint.class_ids
    assert manifest["model"]["tree"] == {"branching": [2, 2], "leaves": 4}
    assert artifact.use_mask == (kind == "video")
    # what the graph needs per example, apart from the training crop
    assert manifest["frames"] == {
        "pad_to": None if kind == "video" else 5,
        "gate_input": "reference" if graph == "ensemble" else None,
        "gate_frames": {"video": 300, "segment": 5}[kind] if graph == "ensemble" else None,
        "training_max_frames": checkpoint.preprocessing["max_frames"]}
    assert artifact.pad_to == manifest["frames"]["pad_to"]
    assert [spec.describe() for spec in artifact.inputs] == [
        "features uint8[batch, frames, 1152]", "mask float32[batch, frames]"]
    assert [spec.describe() for spec in artifact.outputs] == [
        f"probabilities float32[batch, {len(checkpoint.class_ids)}]",
        f"logits float32[batch, {len(checkpoint.class_ids)}]"]
    parity = manifest["parity"]
    assert parity["passed"] and parity["max_rel_error"] <= 1e-4 and parity["tolerance"] == 1e-4
    shapes = {(row["batch"], row["frames"]) for row in parity["shapes"]}
    assert (1, 1) in shapes and any(min(row["num_frames"]) < row["frames"] for row in parity["shapes"])
    assert manifest["onnx"]["opset"] == 18
    assert manifest["onnx"]["sha256"] == file_sha256(artifact.onnx_path)
    # model.pt2: the program model.onnx came from, loaded back on the torch backend
    assert artifact.pt2_path == artifact.path / PT2_FILE
    assert manifest["files"][PT2_FILE]["sha256"] == file_sha256(artifact.pt2_path)
    assert manifest["pt2"]["parity"]["passed"] and manifest["pt2"]["parity"]["max_rel_error"] <= 1e-4
    assert manifest["source"]["weights_sha256"] == json.loads(
        (Path(tiny_checkpoints[kind]) / "config.json").read_text())["weights"]["sha256"]
    assert set(manifest["versions"]) == {"modloc", "torch", "onnx", "onnxscript", "onnxruntime"}
    assert (artifact.path / "README").read_text() == describe_manifest(manifest) + "\n"
    leaf = manifest["model"]["leaf"]
    if graph == "distill":
        assert leaf["selection"] == "best validation segment MAP@K" and len(leaf["scores"]) == 4
        assert leaf["index"] == int(np.argmax(leaf["scores"]))
    else:
        assert leaf is None
    int8_artifact = load_artifact(root / kind / f"{graph}-int8")
    int8 = int8_artifact.manifest["precision"]
    assert int8["map_at_k"]["difference"] >= -0.005 and int8["map_at_k"]["candidates"] == "every class"
    assert int8["map_at_k"]["fp32"] == manifest["precision"]["map_at_k"]["value"]
    # the quality gate, measure by measure, with fp32's value, the bound and the verdict
    assert manifest["quality_gate"] is None  # fp32 is the reference
    gate = int8_artifact.manifest["quality_gate"]
    assert gate["passed"] and gate["reference"] == "fp32"
    assert gate["example"] == ("video" if kind == "video" else "5-frame window") and gate["examples"] > 0
    assert [m["metric"] for m in gate["measures"]] == [
        "mean_abs_probability_error", "p99_abs_probability_error", "top20_candidate_overlap",
        "score_rank_correlation", "map_at_k_every_class"]
    for measure in gate["measures"]:
        assert {"metric", "reference_value", "value", "ceiling", "threshold", "passed", "rule"} <= measure.keys()
    errors = {m["metric"]: m for m in gate["measures"]}
    assert 0 < errors["mean_abs_probability_error"]["value"] <= errors["p99_abs_probability_error"]["value"]
    assert errors["map_at_k_every_class"]["reference_value"] == int8["map_at_k"]["fp32"]
    # the QDQ graph exists only in ONNX, and the manifest says so
    assert int8_artifact.pt2_path is None and not (int8_artifact.path / PT2_FILE).exists()
    assert int8_artifact.manifest["pt2"]["file"] is None
    with pytest.raises(ArtifactError, match="no model.pt2.*QDQ quantization.*onnxruntime or tensorrt"):
        open_backend(int8_artifact, "torch")


def test_cli_export_at_opset_17_with_split_streams(tiny_checkpoints, tmp_path, capsys):
    assert main(["export", tiny_checkpoints["segment"], "--out", str(tmp_path), "--graph", "distill",
                 "ensemble", "--leaf", "1", "--opset", "17", "--split-streams", "--json"]) == 0
    summaries = json.loads(capsys.readouterr().out)["artifacts"]
    assert [(s["graph"], s["leaf"], s["opset"]) for s in summaries] == [("distill", 1, 17),
                                                                      ("ensemble", None, 17)]
    tree = load_checkpoint(tiny_checkpoints["segment"]).model
    features, num_frames = parity_batches([(3, 5)], seed=5)[0]
    for summary, reference in zip(summaries, (tree.leaf(1), tree), strict=True):
        assert summary["parity_max_rel_error"] <= 1e-4
        artifact = load_artifact(summary["path"])
        assert [spec.name for spec in artifact.inputs] == ["rgb", "audio", "mask"]
        reductions = [node for node in onnx.load(artifact.onnx_path).graph.node
                      if node.op_type in ("ReduceL2", "ReduceMean")]
        assert reductions and all(len(node.input) == 1 for node in reductions)  # axes: attributes
        with open_backend(artifact) as backend:
            np.testing.assert_allclose(backend.run(features, num_frames=num_frames),
                                       torch_probabilities(reference, features, num_frames), rtol=1e-4)


# --- the graph ------------------------------------------------------------------------


def test_the_graph_takes_raw_bytes_with_preprocessing_and_batchnorm_folded(
        stage, tiny_checkpoints, tiny_dataset):
    root, _ = stage
    artifact = load_artifact(root / "video" / "ensemble-fp32")
    model = onnx.load(artifact.onnx_path)
    operators = {node.op_type for node in model.graph.node}
    assert "BatchNormalization" not in operators
    assert all(any(a.name == "axis" for a in node.attribute)
               for node in model.graph.node if node.op_type == "Softmax")
    tree = load_checkpoint(tiny_checkpoints["video"]).model
    backend = OnnxRuntimeBackend(artifact)
    # whole videos, padded to 300 frames as the reference's reader pads them
    _, features, num_frames = next(video_batches(split(tiny_dataset, "validate"), 6))
    expected = torch_probabilities(tree, features, num_frames)
    np.testing.assert_allclose(backend.run(features, num_frames=num_frames), expected, rtol=1e-4)
    mask = (np.arange(features.shape[1]) < num_frames[:, None]).astype(np.float32)
    garbage = features.copy()
    garbage[mask == 0] = 255  # the bytes of padded frames must not matter
    np.testing.assert_array_equal(backend.run(garbage, mask=mask), backend.run(features, mask=mask))
    outputs = backend.run_outputs(features, mask=mask)
    np.testing.assert_allclose(outputs["probabilities"], 1 / (1 + np.exp(-outputs["logits"])), rtol=1e-5)


def test_a_video_ensemble_scores_a_video_alike_however_far_it_is_padded(
        stage, tiny_checkpoints, tiny_dataset):
    """PyTorch, the ONNX graph and the served pipeline agree on batches padded to each video's
    length, to 60 frames, to the batch's longest and to 300."""
    from modloc.engine.runtime.pipeline import Pipeline, PipelineConfig, ScoringModel

    root, _ = stage
    tree = load_checkpoint(tiny_checkpoints["video"]).model
    videos, features, num_frames = next(video_batches(split(tiny_dataset, "validate"), 6))
    longest = int(num_frames.max())
    rng = np.random.default_rng(0)

    def padded_to(frames: int) -> np.ndarray:
        batch = rng.integers(0, 256, (len(features), frames, features.shape[2]), dtype=np.uint8)
        kept = min(frames, features.shape[1])
        batch[:, :kept] = features[:, :kept]
        return batch

    with OnnxRuntimeBackend(load_artifact(root / "video" / "ensemble-fp32")) as backend:
        expected = torch_probabilities(tree, padded_to(300), num_frames)
        assert longest < 60  # the tiny videos are 8-40 frames: 60 fits them all
        for frames in (longest, 60, 300):
            np.testing.assert_allclose(backend.run(padded_to(frames), num_frames=num_frames), expected,
                                       rtol=1e-4)
            np.testing.assert_allclose(torch_probabilities(tree, padded_to(frames), num_frames), expected,
                                       rtol=1e-5)
        for row, count in enumerate(num_frames.tolist()):
            np.testing.assert_allclose(backend.run(features[row:row + 1, :count], num_frames=[count])[0],
                                       expected[row], rtol=1e-4)
        # served: padded to the longest video of each batch (rounded up to 30 frames)
        video_model = ScoringModel.from_backend(backend)
        assert video_model.fixed_frames is None
        calls = []
        recorded = ScoringModel(lambda f, n: (calls.append(f.shape[1]), video_model.score(f, n))[1],
                                video_model.class_ids)
        segment = ScoringModel(lambda f, n: np.zeros((len(f), 3), np.float32), (1, 2, 3))
        results = Pipeline(recorded, segment, PipelineConfig(video_batch_size=2)).localize(videos)
    assert calls and all(frames < 300 for frames in calls)
    np.testing.assert_allclose(np.stack([r.video_scores for r in results]), expected, rtol=1e-4)


def test_an_older_checkpoints_ensemble_is_fed_300_frames(stage, tiny_checkpoints, tmp_path):
    """A checkpoint made before the gate input was recorded keeps its gates (a mean over
    every input frame): its ensemble says it needs 300 frames, and the engine pads to them;
    artifacts exported before ``frames`` existed get the rule of that time."""
    from modloc.engine.runtime.pipeline import ScoringModel
    from modloc.training.checkpoint import CONFIG_FILE

    old = Path(shutil.copytree(tiny_checkpoints["video"], tmp_path / "old"))
    config = json.loads((old / CONFIG_FILE).read_text())
    del config["model"]["config"]["gate_input"]
    (old / CONFIG_FILE).write_text(json.dumps(config))
    [summary] = export_checkpoint(old, tmp_path / "out", ExportSettings(graphs=("ensemble",)))
    artifact = load_artifact(summary["path"])
    assert artifact.manifest["frames"]["gate_input"] == "padded_mean"
    assert artifact.pad_to == 300 and artifact.manifest["frames"]["gate_frames"] is None
    tree = load_checkpoint(old).model
    features, num_frames = parity_batches([(3, 300)], seed=4)[0]
    with open_backend(artifact) as backend:
        assert ScoringModel.from_backend(backend).fixed_frames == 300
        np.testing.assert_allclose(backend.run(features, num_frames=num_frames),
                                   torch_probabilities(tree, features, num_frames), rtol=1e-4)
    root, _ = stage
    for name, pad_to in (("ensemble-fp32", 300), ("distill-fp32", None)):
        legacy = Path(shutil.copytree(root / "video" / name, tmp_path / "legacy" / name))
        _edit(legacy, lambda manifest: manifest.pop("frames"))
        assert load_artifact(legacy).pad_to == pad_to


def test_export_module_matches_the_model_in_pytorch(tiny_checkpoints):
    tree = load_checkpoint(tiny_checkpoints["segment"]).model
    features, num_frames = parity_batches([(4, 5)], seed=3)[0]
    mask = torch.from_numpy((np.arange(5) < num_frames[:, None]).astype(np.float32))
    with torch.inference_mode():
        folded, _ = export_module(tree, "ensemble")(torch.from_numpy(features), mask)
    np.testing.assert_allclose(folded.numpy(), torch_probabilities(tree, features, num_frames), rtol=1e-5)
    with pytest.raises(ValueError, match="leaf must be in"):
        export_module(tree, "distill", 4)
    with pytest.raises(ValueError, match="'distill' or 'ensemble'"):
        export_module(tree, "single")


def test_small_probabilities_keep_their_relative_accuracy(tiny_checkpoints, tmp_path):
    """Probabilities near 1e-7 (logits near -16) still pass the 1e-4 relative gate: the graph
    spells out 1 / (1 + exp(-x)), where ONNX Runtime's CPU Sigmoid would be off by 100%."""
    loaded = load_checkpoint(tiny_checkpoints["segment"])
    with torch.no_grad():
        for leaf in loaded.model.leaves():
            leaf.classifier.bias -= 16.0
    unlikely = save_checkpoint(tmp_path / "unlikely", loaded.model, class_ids=loaded.class_ids)
    [summary] = export_checkpoint(unlikely, tmp_path / "out", ExportSettings(graphs=("distill",), leaf=0))
    assert summary["parity_max_rel_error"] <= 1e-4
    features, num_frames = parity_batches([(4, 5)], seed=9)[0]
    with open_backend(summary["path"]) as backend:
        probabilities = backend.run(features, num_frames=num_frames)
    assert probabilities.max() < 1e-5


# --- precision variants ---------------------------------------------------------------


def test_fp16_and_bf16_graphs_keep_the_sensitive_operations_in_fp32(tiny_checkpoints, tiny_dataset, tmp_path):
    summaries = export_checkpoint(tiny_checkpoints["segment"], tmp_path, ExportSettings(
        graphs=("distill",), leaf=0, precisions=("fp16", "bf16"),
        validation=split(tiny_dataset, "validate")))
    assert [item["precision"] for item in summaries] == ["fp32", "fp16", "bf16"]
    low = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}
    for precision, elem_type in low.items():
        artifact = load_artifact(tmp_path / f"distill-{precision}")
        model, types = onnx_types(artifact.onnx_path)
        weights = [node.input[1] for node in model.graph.node
                   if node.op_type in ("MatMul", "Gemm") and node.input[1] in
                   {tensor.name for tensor in model.graph.initializer}]
        assert weights and all(types[name] == elem_type for name in weights)
        sensitive = [node for node in model.graph.node
                     if node.op_type in ("Softmax", "ReduceL2", "ReduceSum", "ReduceMean")]
        assert sensitive and all(types[node.input[0]] == onnx.TensorProto.FLOAT for node in sensitive)
        assert all(types[output.name] == onnx.TensorProto.FLOAT for output in model.graph.output)
        measured = artifact.manifest["precision"]["map_at_k"]
        assert abs(measured["difference"]) <= 0.005 and artifact.manifest["quality_gate"]["passed"]
        assert measured["evaluated_with"] == ("onnx-reference" if precision == "bf16" else "onnxruntime")
    with pytest.raises(ArtifactError, match="no bf16 kernels"):
        OnnxRuntimeBackend(load_artifact(tmp_path / "distill-bf16"))
    # PyTorch has CPU kernels for both: the torch backend runs the programs here
    features, num_frames = parity_batches([(3, 5)], seed=2)[0]
    with open_backend(tmp_path / "distill-fp32", "torch") as backend:
        fp32 = backend.run(features, num_frames=num_frames)
    for precision, tolerance in (("fp16", 5e-3), ("bf16", 3e-2)):
        artifact = load_artifact(tmp_path / f"distill-{precision}")
        assert artifact.manifest["pt2"]["parity"]["tolerance"] is None  # measured, not gated
        with open_backend(artifact, "torch") as backend:
            probabilities = backend.run(features, num_frames=num_frames)
        assert probabilities.dtype == np.float32
        np.testing.assert_allclose(probabilities, fp32, rtol=tolerance, atol=tolerance)


def test_int8_graph_is_symmetric_qdq_and_runs_on_uint8_kernels(stage):
    root, _ = stage
    artifact = load_artifact(root / "segment" / "distill-int8")
    model = onnx.load(artifact.onnx_path)
    initializers = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    quantizers = [node for node in model.graph.node if node.op_type == "QuantizeLinear"]
    assert quantizers
    # TensorRT's explicit quantization: int8, zero point 0
    assert all(initializers[node.input[2]].dtype == np.int8 and not initializers[node.input[2]].any()
               for node in quantizers)
    weight_scales = [initializers[node.input[1]] for node in model.graph.node
                     if node.op_type == "DequantizeLinear" and node.input[0] in initializers]
    assert weight_scales and all(scale.ndim == 1 for scale in weight_scales)  # per channel
    quantization = artifact.manifest["precision"]["quantization"]
    assert quantization["calibration_batches"] >= 1 and quantization["quantized_layers"] == 9

    shifted = onnx.ModelProto.FromString(uint8_activations(artifact.onnx_path))
    points = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in shifted.graph.initializer}
    for node in shifted.graph.node:
        if node.op_type == "QuantizeLinear":
            assert points[node.input[2]].dtype == np.uint8 and (points[node.input[2]] == 128).all()
    import onnxruntime

    plain = onnxruntime.InferenceSession(str(artifact.onnx_path), providers=["CPUExecutionProvider"])
    features, num_frames = parity_batches([(6, 5)], seed=1)[0]
    inputs = graph_inputs(artifact, features, num_frames=num_frames)
    with OnnxRuntimeBackend(artifact) as backend:
        assert backend.uint8_activations
        np.testing.assert_allclose(backend.run(features, num_frames=num_frames),
                                   plain.run(["probabilities"], inputs)[0], atol=2e-3)


def test_opset_17_rewrites_only_the_reductions(stage):
    root, _ = stage
    artifact = load_artifact(root / "video" / "ensemble-fp32")
    original = onnx.load(artifact.onnx_path)
    downgraded = downgrade_to_opset_17(original)
    onnx.checker.check_model(downgraded, full_check=True)
    assert downgraded.opset_import[0].version == 17
    assert [n.op_type for n in downgraded.graph.node] == [n.op_type for n in original.graph.node]
    import onnxruntime

    features, num_frames = parity_batches([(2, 7)])[0]
    inputs = graph_inputs(artifact, features, num_frames=num_frames)
    results = [onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
               .run(["logits"], inputs)[0] for model in (original, downgraded)]
    np.testing.assert_array_equal(*results)


# --- the gates ------------------------------------------------------------------------


def test_parity_gate_fails_loudly():
    def reference(features, num_frames):
        return np.full((len(features), 3), 0.25, np.float32)

    assert check_parity(reference, reference)["max_rel_error"] == 0
    with pytest.raises(ParityError, match=r"max relative error .* > 0.0001 at batch"):
        check_parity(lambda f, n: reference(f, n) * 1.001, reference)
    measured = check_parity(lambda f, n: reference(f, n) * 1.001, reference, tolerance=None)
    assert measured["passed"] and measured["max_rel_error"] == pytest.approx(1e-3, rel=1e-3)


def test_agreement_measures_what_it_says():
    rng = np.random.default_rng(0)
    reference = rng.random((500, 30))
    agreement = Agreement()
    agreement.add(reference[:200], reference[:200])
    agreement.add(reference[200:], reference[200:])
    assert agreement.measures() == {"mean_abs_probability_error": 0.0, "p99_abs_probability_error": 1e-5,
                                    "top20_candidate_overlap": 1.0, "score_rank_correlation": 1.0}
    shifted = np.clip(reference + 0.02, 0, 1)  # a constant shift keeps every order
    agreement = Agreement()
    agreement.add(reference, shifted)
    measures = agreement.measures()
    assert measures["mean_abs_probability_error"] == pytest.approx(np.abs(shifted - reference).mean())
    assert measures["p99_abs_probability_error"] == pytest.approx(0.02, abs=2e-5)
    assert measures["top20_candidate_overlap"] == 1.0 and measures["score_rank_correlation"] > 0.999
    # reversed columns: the opposite order, and the top 20 of 30 keep only 10 of fp32's
    assert rank_correlation(reference, 1 - reference) == pytest.approx(-1.0)
    agreement = Agreement()
    agreement.add(reference, 1 - reference)
    assert agreement.measures()["top20_candidate_overlap"] == pytest.approx(10 / 20)
    # ties take their average rank; a column constant in both agrees, in one only it does not
    assert rank_correlation(np.array([[1.0, 2.0], [1.0, 3.0]]), np.array([[1.0, 5.0], [1.0, 5.0]])) == 0.5


def test_the_quality_gate_fails_on_each_measure_and_says_why():
    good = {"mean_abs_probability_error": 0.001, "p99_abs_probability_error": 0.01,
            "top20_candidate_overlap": 0.99, "score_rank_correlation": 0.999}
    gate = quality_gate(good, (0.80, 1.0), (0.798, 1.0), GateThresholds())
    assert gate["passed"] and all(m["passed"] for m in gate["measures"])
    for metric, value in (("mean_abs_probability_error", 0.02), ("p99_abs_probability_error", 0.06),
                          ("top20_candidate_overlap", 0.9), ("score_rank_correlation", 0.98)):
        failed = quality_gate({**good, metric: value}, (0.80, 1.0), (0.80, 1.0), GateThresholds())
        assert not failed["passed"] and [m["metric"] for m in failed["measures"] if not m["passed"]] == [metric]
    fallen = quality_gate(good, (0.80, 1.0), (0.79, 0.95), GateThresholds())
    measure = fallen["measures"][-1]
    assert not fallen["passed"] and measure == {
        "metric": "map_at_k_every_class", "reference_value": 0.80, "value": 0.79, "ceiling": 0.95,
        "threshold": pytest.approx(0.795), "passed": False, "rule": "value >= threshold"}
    with pytest.raises(ValueError, match="quality gate top_overlap must be in"):
        GateThresholds(top_overlap=1.5)


def test_a_variant_that_fails_its_gate_is_not_published_and_the_command_says_why(
        tiny_checkpoints, tiny_dataset, tmp_path):
    """INT8 calibrated on a single window (its activation ranges that one window's) moves
    the window scores' order past the gate: the variant is left out (an earlier one of the
    same name removed), fp32 is published, and the command exits 1 naming the measures,
    their values and what to try."""
    import subprocess
    import sys

    out = tmp_path / "segment"
    (out / "distill-int8").mkdir(parents=True)  # an earlier export's variant: stale now
    done = subprocess.run(
        [sys.executable, "-m", "modloc", "export", tiny_checkpoints["segment"], "--out", str(out),
         "--graph", "distill", "--leaf", "0", "--precision", "int8", "--validation",
         split(tiny_dataset, "validate"), "--calibration-batches", "1", "--calibration-batch-size",
         "1", "--json"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr
    fp32, int8 = json.loads(done.stdout)["artifacts"]
    assert fp32["published"] and (out / "distill-fp32" / MANIFEST_FILE).is_file()
    assert not int8["published"] and not (out / "distill-int8").exists()
    failed = [m for m in int8["quality_gate"]["measures"] if not m["passed"]]
    assert any(m["metric"] == "score_rank_correlation" for m in failed)
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("modloc export: error: segment distill-int8 failed its quality gate: ")
    for measure in failed:
        assert f"{measure['metric']} {measure['value']:.4g} (fp32 {measure['reference_value']:.4g}), " \
               f"wanted {measure['rule'][6:8]} {measure['threshold']:.4g}" in error
    assert "try: calibrate on more data (--calibration-batches, 1 now; --calibration-batch-size), " \
           "keep more layers in float (--int8-float-layers, classifier now;" in error
    # each step said first, on stderr
    assert "segment distill-int8: quantizing the fp32 graph, calibrated on 1 batches of 1" in done.stderr
    assert "segment distill-int8: failed its quality gate, not published" in done.stderr


def test_export_refuses_what_it_cannot_measure_or_make(tiny_checkpoints, tmp_path):
    with pytest.raises(ValueError, match="measured against fp32 on a rated split"):
        ExportSettings(precisions=("int8",))
    with pytest.raises(ValueError, match="best leaf needs validation"):
        export_checkpoint(tiny_checkpoints["video"], tmp_path, ExportSettings(graphs=("distill",)))
    with pytest.raises(ValueError, match="exports as"):
        export_checkpoint(tiny_checkpoints["video"], tmp_path, ExportSettings(graphs=("single",)))
    with pytest.raises(ValueError, match=r"leaf 7 is not in \[0, 4\)"):
        export_checkpoint(tiny_checkpoints["video"], tmp_path, ExportSettings(graphs=("distill",), leaf=7))
    assert not any(tmp_path.iterdir())


def test_calibration_and_validation_read_what_the_models_serve(stage, tiny_dataset):
    validate = split(tiny_dataset, "validate")
    videos = list(calibration_batches(validate, "video", batch_size=5, max_batches=2))
    assert [features.shape for features, _ in videos] == [(5, 300, 1152)] * 2
    windows = list(calibration_batches(validate, "segment", batch_size=7, max_batches=3))
    assert len(windows) == 3 and all(f.shape[1:] == (5, 1152) and len(f) <= 7 for f, _ in windows)
    assert all(((n >= 1) & (n <= 5)).all() for _, n in windows)
    root, _ = stage
    backend = OnnxRuntimeBackend(load_artifact(root / "segment" / "ensemble-fp32"))
    maps = validation_map(lambda f, n: {"a": backend.run(f, num_frames=n),
                                        "b": 1 - backend.run(f, num_frames=n)},
                          "segment", backend.class_ids, validate)
    assert maps["a"] == backend.artifact.manifest["precision"]["map_at_k"]["value"]
    assert maps["b"] < maps["a"]  # ranking windows upside down is worse


# --- the contract the engine enforces -------------------------------------------------


def _copy(stage, tmp_path: Path, name: str = "distill-fp32") -> Path:
    root, _ = stage
    return Path(shutil.copytree(root / "segment" / name, tmp_path / name))


def _edit(directory: Path, edit) -> None:
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    edit(manifest)
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_engine_refuses_an_artifact_whose_manifest_does_not_match(stage, tmp_path):
    directory = _copy(stage, tmp_path)
    load_artifact(directory)

    data = bytearray((directory / ONNX_FILE).read_bytes())
    data[-1] ^= 1
    (directory / ONNX_FILE).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.onnx sha256 .* differs from the manifest's"):
        load_artifact(directory)
    load_artifact(directory, verify=False)  # sizes still agree: only hashing tells

    directory = _copy(stage, tmp_path / "classes")
    _edit(directory, lambda m: m["classes"].pop())
    with pytest.raises(ArtifactError, match=r"output probabilities float32\[batch, 12\] has 12 columns for 11"):
        load_artifact(directory)

    directory = _copy(stage, tmp_path / "plan")
    (directory / PLAN_FILE).write_bytes(b"engine")
    with pytest.raises(ArtifactError, match="model.plan is present but the manifest does not describe it"):
        load_artifact(directory)

    directory = _copy(stage, tmp_path / "stale-plan")
    (directory / PLAN_FILE).write_bytes(b"engine")

    def stale(manifest):
        manifest["plan"] = {"onnx_sha256": "0" * 64}
        manifest["files"][PLAN_FILE] = {"sha256": file_sha256(directory / PLAN_FILE), "bytes": 6}
    _edit(directory, stale)
    with pytest.raises(ArtifactError, match="rebuild it"):
        load_artifact(directory)

    directory = _copy(stage, tmp_path / "version")
    _edit(directory, lambda m: m.update(format_version=99))
    with pytest.raises(ArtifactError, match="format version 99"):
        load_artifact(directory)

    directory = _copy(stage, tmp_path / "io")
    _edit(directory, lambda m: m["inputs"][0].update(shape=["batch", "frames", 1024]))
    with pytest.raises(ArtifactError, match=r"ONNX Runtime session's inputs do not match the manifest: "
                                            r"features uint8\[batch, frames, 1152\] instead of"):
        OnnxRuntimeBackend(load_artifact(directory))

    with pytest.raises(ArtifactError, match="not an artifact directory"):
        load_artifact(tmp_path)


def test_backend_inputs_are_checked(stage):
    root, _ = stage
    artifact = load_artifact(root / "segment" / "distill-fp32")
    with pytest.raises(ValueError, match=r"features must be \(B, M, 1152\) uint8"):
        graph_inputs(artifact, np.zeros((2, 5, 1152), np.float32))
    with pytest.raises(ValueError, match="not both"):
        graph_inputs(artifact, np.zeros((2, 5, 1152), np.uint8), np.ones((2, 5)), np.array([5, 5]))
    inputs = graph_inputs(artifact, np.zeros((2, 5, 1152), np.uint8), num_frames=np.array([5, 2]))
    np.testing.assert_array_equal(inputs["mask"], [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    with pytest.raises(ValueError, match="unknown backend"):
        open_backend(artifact, "openvino")


# --- TensorRT settings (the build itself runs in test_trt.py) --------------------------


def test_tensorrt_build_mode_follows_the_version_and_the_graph():
    assert build_mode("10.3.0", "fp16").strongly_typed
    assert build_mode("11.4.1", "int8").builder_flags == ()
    assert build_mode("8.6.1", "fp16").builder_flags == ("FP16",)
    assert build_mode("8.6.1", "int8").builder_flags == ("INT8", "FP16")
    assert not build_mode("8.6.1", "fp32").strongly_typed
    with pytest.raises(ArtifactError, match="no bf16"):
        build_mode("8.6.1", "bf16")
    with pytest.raises(ArtifactError, match="too old"):
        build_mode("8.5.3", "fp32")
    check_device("8.6.1", "6.1", "fp16")  # a 1080 Ti on TensorRT 8.6
    with pytest.raises(ArtifactError, match="use TensorRT 8.6"):
        check_device("10.3.0", "6.1", "fp32")
    with pytest.raises(ArtifactError, match="bf16 needs compute capability >= 8.0"):
        check_device("10.3.0", "7.5", "bf16")
    check_device("11.4.1", "9.0", "bf16")


def test_tensorrt_profiles_and_plan_checks(stage):
    root, _ = stage
    artifact = load_artifact(root / "segment" / "distill-fp32")
    profile = optimization_profile(artifact.inputs, ShapeRange.parse("1,64,256"), ShapeRange.parse("5"))
    assert profile == {"features": {"min": [1, 5, 1152], "opt": [64, 5, 1152], "max": [256, 5, 1152]},
                       "mask": {"min": [1, 5], "opt": [64, 5], "max": [256, 5]}}
    with pytest.raises(ValueError, match="min <= opt <= max"):
        ShapeRange.parse("8,4,16")
    assert default_timing_cache(artifact, "10.3.0", "8.9").name == "tensorrt-10.3.0-sm89.timing-cache"
    plan = {"tensorrt_version": "10.3.0", "device": {"name": "NVIDIA H200", "compute_capability": "9.0"}}
    assert plan_mismatches(plan, "10.3.0", {"name": "NVIDIA H200", "compute_capability": "9.0"}) == []
    assert plan_mismatches(plan, "10.4.0", {"name": "NVIDIA L4", "compute_capability": "8.9"}) == [
        "built with TensorRT 10.3.0, this is 10.4.0", "built for compute capability 9.0, this is 8.9",
        "built for device NVIDIA H200, this is NVIDIA L4"]
    assert TensorSpec("mask", "float32", ("batch", "frames")).describe() == "mask float32[batch, frames]"


def test_build_without_tensorrt_says_how_to_get_it(stage, tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed here: test_trt.py builds for real")
    directory = _copy(stage, tmp_path)
    (directory / PLAN_FILE).write_bytes(b"left by an interrupted build")
    assert main(["build", str(directory)]) == 1
    assert "pip install 'modloc[trt]'" in capsys.readouterr().err
    assert not (directory / PLAN_FILE).exists()  # the stale plan no longer blocks the artifact
    load_artifact(directory)
