"""The torch backend: an artifact's ``model.pt2`` against ONNX Runtime on the same artifact,
the checks that refuse a program that does not fit, and the device and compile options.

Artifacts: ``conftest.tiny_artifacts`` (the tiny trees exported in fp32), of which the video
model's distill leaf 0 (masked) and the segment model's ensemble. fp16 and bf16 programs run in
test_export.py (where those variants are exported and measured anyway); INT8 artifacts,
which have no program, are refused there too. CUDA tests skip without a CUDA device.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modloc.engine.runtime.artifacts import (
    MANIFEST_FILE,
    PT2_FILE,
    ArtifactError,
    file_record,
    load_artifact,
)
from modloc.engine.runtime.backends import open_backend
from modloc.engine.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from modloc.engine.runtime.backends.torch_backend import TorchBackend
from modloc.export.onnx_export import max_relative_error, parity_batches

REPO = Path(__file__).resolve().parents[1]
# the same graph on two runtimes' float32 kernels: only the summation orders differ
AGREEMENT = 1e-5
SHAPES = ((1, 1), (2, 5), (3, 17), (5, 40))
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device visible to torch (this torch is "
                                       f"{torch.__version__})")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def artifacts(tiny_artifacts) -> dict[str, Path]:
    """The two artifacts these tests run (shared: tests that change one change a copy)."""
    return {"video": tiny_artifacts / "video" / "distill-fp32",
            "segment": tiny_artifacts / "segment" / "ensemble-fp32"}


def _copy(artifacts, tmp_path: Path, kind: str = "segment") -> Path:
    return Path(shutil.copytree(artifacts[kind], tmp_path / artifacts[kind].name))


def _edit(directory: Path, edit) -> None:
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    edit(manifest)
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize("kind", ["video", "segment"])
def test_torch_backend_agrees_with_onnxruntime_on_the_same_artifact(artifacts, kind):
    artifact = load_artifact(artifacts[kind])
    with open_backend(artifact, "torch") as torch_backend, OnnxRuntimeBackend(artifact) as ort:
        assert torch_backend.name == "torch" and torch_backend.class_ids == artifact.class_ids
        for features, num_frames in parity_batches(SHAPES, seed=4):  # 1-frame and cut rows
            expected = ort.run(features, num_frames=num_frames)
            probabilities = torch_backend.run(features, num_frames=num_frames)
            assert probabilities.dtype == np.float32 and probabilities.shape == expected.shape
            assert max_relative_error(probabilities, expected) <= AGREEMENT, (features.shape, num_frames)
        mask = (np.arange(features.shape[1]) < num_frames[:, None]).astype(np.float32)
        garbage = features.copy()
        garbage[mask == 0] = 255  # the bytes of padded frames must not matter
        np.testing.assert_array_equal(torch_backend.run(garbage, mask=mask),
                                      torch_backend.run(features, num_frames=num_frames))
        outputs = torch_backend.run_outputs(features, mask=mask)
        expected = ort.run_outputs(features, mask=mask)
        assert list(outputs) == ["probabilities", "logits"]
        np.testing.assert_allclose(outputs["logits"], expected["logits"], rtol=AGREEMENT, atol=1e-5)
        with pytest.raises(ValueError, match=r"features must be \(B, M, 1152\) uint8"):
            torch_backend.run(features.astype(np.float32))


def test_the_engine_loads_the_program_without_training_or_export_code(artifacts):
    script = f"""
import sys
import numpy as np
from modloc.engine.runtime.backends import open_backend
backend = open_backend({str(artifacts['segment'])!r}, "torch")
print(backend.run(np.zeros((2, 5, 1152), np.uint8), num_frames=np.array([5, 1])).shape)
print(sorted({{name.split(".")[0] for name in sys.modules}} & {{"training", "export"}}))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["(2, 12)", "[]"]


def test_an_artifact_without_model_pt2_still_loads_and_the_torch_backend_says_why_not(
        artifacts, tmp_path):
    # what an artifact exported before model.pt2 existed looks like
    directory = _copy(artifacts, tmp_path)
    (directory / PT2_FILE).unlink()

    def older(manifest):
        del manifest["pt2"]
        del manifest["files"][PT2_FILE]
    _edit(directory, older)
    artifact = load_artifact(directory)
    assert artifact.pt2_path is None
    features, num_frames = parity_batches([(2, 5)])[0]
    with OnnxRuntimeBackend(artifact) as ort:
        assert ort.run(features, num_frames=num_frames).shape == (2, 12)
    with pytest.raises(ArtifactError, match=r"no model\.pt2, which the torch backend runs: .*"
                                            r"re-export the checkpoint with this modloc"):
        TorchBackend(artifact)


def test_load_artifact_refuses_a_model_pt2_the_manifest_does_not_describe(artifacts, tmp_path):
    directory = _copy(artifacts, tmp_path / "tampered")
    data = bytearray((directory / PT2_FILE).read_bytes())
    data[len(data) // 2] ^= 1
    (directory / PT2_FILE).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.pt2 sha256 .* differs from the manifest's"):
        load_artifact(directory)

    directory = _copy(artifacts, tmp_path / "undescribed")
    _edit(directory, lambda manifest: manifest["files"].pop(PT2_FILE))
    with pytest.raises(ArtifactError, match=r"model\.pt2 is present but the manifest does not "
                                            r"describe it; model\.pt2: the manifest's pt2 record"):
        load_artifact(directory)

    directory = _copy(artifacts, tmp_path / "unrecorded")
    _edit(directory, lambda manifest: manifest["pt2"].update(file=None))
    with pytest.raises(ArtifactError, match="pt2 record and file list disagree"):
        load_artifact(directory)


def test_the_torch_backend_refuses_a_program_that_does_not_fit_the_manifest(artifacts, tmp_path):
    # the video model's leaf in the segment ensemble's directory, hashes updated to match
    directory = _copy(artifacts, tmp_path / "swapped")
    shutil.copyfile(artifacts["video"] / PT2_FILE, directory / PT2_FILE)
    _edit(directory, lambda manifest: manifest["files"].update(
        {PT2_FILE: file_record(directory / PT2_FILE)}))
    with pytest.raises(ArtifactError, match="exported as another model than the manifest describes: "
                                            "kind 'video' instead of 'segment'; graph 'distill' "
                                            "instead of 'ensemble'; leaf 0 instead of None"):
        TorchBackend(load_artifact(directory))

    # a program saved without modloc's description
    directory = _copy(artifacts, tmp_path / "anonymous")
    torch.export.save(torch.export.load(directory / PT2_FILE), directory / PT2_FILE)
    _edit(directory, lambda manifest: manifest["files"].update(
        {PT2_FILE: file_record(directory / PT2_FILE)}))
    with pytest.raises(ArtifactError, match="no readable modloc.json inside"):
        TorchBackend(load_artifact(directory))

    directory = _copy(artifacts, tmp_path / "io")
    _edit(directory, lambda manifest: manifest["inputs"][0].update(shape=["batch", "frames", 1024]))
    with pytest.raises(ArtifactError, match=r"torch.export program \(model.pt2\)'s inputs do not "
                                            r"match the manifest: features uint8\[None, None, 1152\]"):
        TorchBackend(load_artifact(directory))

    directory = _copy(artifacts, tmp_path / "garbage")
    (directory / PT2_FILE).write_bytes(b"not a zip archive")
    _edit(directory, lambda manifest: manifest["files"].update(
        {PT2_FILE: file_record(directory / PT2_FILE)}))
    with pytest.raises(ArtifactError, match=rf"torch {re.escape(torch.__version__)} cannot load the program"):
        TorchBackend(load_artifact(directory))


def test_options_that_cannot_run_here_are_refused(artifacts, monkeypatch):
    artifact = load_artifact(artifacts["segment"])
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device, not cpu"):
        TorchBackend(artifact, cuda_graphs=True)
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N', got 'meta'"):
        TorchBackend(artifact, device="meta")
    with pytest.raises(ValueError, match="threads must be >= 1"):
        TorchBackend(artifact, threads=0)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"device 'cuda:0' requested, but torch .* sees no CUDA"):
            TorchBackend(artifact, device="cuda:0")
    monkeypatch.setitem(sys.modules, "torch", None)  # what an engine without torch sees
    with pytest.raises(ImportError, match=r"pip install 'modloc\[train\]'"):
        TorchBackend(artifact)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile's CPU backend (Inductor) needs a C++ compiler; none found")
def test_compiled_program_matches_eager_on_the_cpu(artifacts):
    # one shape: each new shape compiles again (about 15 s here on one core)
    artifact = load_artifact(artifacts["video"])
    features, num_frames = parity_batches([(3, 6)], seed=8)[0]
    with TorchBackend(artifact) as eager, TorchBackend(artifact, compile=True) as compiled:
        assert compiled.compiled and not compiled.cuda_graphs
        np.testing.assert_allclose(compiled.run(features, num_frames=num_frames),
                                   eager.run(features, num_frames=num_frames), rtol=AGREEMENT)


@pytest.mark.cuda
@needs_cuda
def test_cuda_program_agrees_with_the_cpu(artifacts):
    artifact = load_artifact(artifacts["segment"])
    with TorchBackend(artifact) as cpu, TorchBackend(artifact, device="cuda") as cuda:
        for features, num_frames in parity_batches(SHAPES, seed=6):
            # TF32 is off by default in PyTorch, so float32 products stay float32 on the GPU
            assert max_relative_error(cuda.run(features, num_frames=num_frames),
                                      cpu.run(features, num_frames=num_frames)) <= 1e-4


@pytest.mark.cuda
@needs_cuda
def test_cuda_graphs_replay_each_shape(artifacts):
    artifact = load_artifact(artifacts["video"])
    batches = parity_batches([(4, 5), (4, 5), (2, 9)], seed=7)
    with TorchBackend(artifact) as cpu, TorchBackend(artifact, device="cuda", cuda_graphs=True) as graphs:
        for features, num_frames in [*batches, batches[0]]:  # recorded, replayed, new, replayed
            assert max_relative_error(graphs.run(features, num_frames=num_frames),
                                      cpu.run(features, num_frames=num_frames)) <= 1e-4
