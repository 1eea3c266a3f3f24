"""``modloc build``: an artifact's model.onnx → model.plan, with the TensorRT Python API.

Steps, each a function:

1. :func:`build_mode`: how the network is typed for this TensorRT and this precision.
   TensorRT ≥ 10 builds a **strongly typed** network: the precision is the graph's own
   (fp16/bf16 weights and casts, INT8 Q/DQ), no builder flag (TensorRT 11 builds nothing
   else and has removed the flags). TensorRT 8.6, the last release for Pascal GPUs
   (1080 Ti class), has no strong typing: explicit batch, plus the FP16 or INT8 builder
   flag that lets it run the graph's fp16 tensors or Q/DQ layers; it has no bf16.
2. :func:`check_device`: TensorRT ≥ 10 needs compute capability ≥ 7.5 (Turing); older
   GPUs build with 8.6; bf16 needs compute capability ≥ 8.0 (Ampere).
3. :func:`optimization_profile`: min/opt/max of every input from the batch and frame
   ranges (a segment model sees 5-frame windows; a video model up to 300 frames).
4. :func:`build_plan`: parse, configure (workspace limit, profile, timing cache loaded and
   saved back, so later builds on this GPU and TensorRT reuse its measurements), build,
   write model.plan and record the plan in the manifest (TensorRT version, device name and
   compute capability, profiles, the ONNX sha256 it came from).

TensorRT is imported inside the steps that need it (the ``trt`` extra); the rest of this
module, and its tests, run anywhere. No torch: a build machine needs TensorRT only (the
device is identified through torch when present, else cuda-python).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from modloc.engine.base.atomic import write_atomically
from modloc.engine.runtime.artifacts import (
    PLAN_FILE,
    Artifact,
    ArtifactError,
    TensorSpec,
    load_artifact,
    read_manifest,
)
from modloc.engine.runtime.backends.tensorrt_backend import device_info, import_tensorrt
from modloc.export.manifest import write_manifest

log = logging.getLogger(__name__)

# TensorRT 10 dropped Pascal and Volta: from 10 on it builds for compute capability 7.5 up
MIN_COMPUTE_CAPABILITY_TRT10 = (7, 5)
DEFAULT_WORKSPACE_MIB = 4096


@dataclass(frozen=True)
class ShapeRange:
    """min ≤ opt ≤ max of one dynamic axis."""

    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"need 1 <= min <= opt <= max, got {self.min}, {self.opt}, {self.max}")

    @classmethod
    def parse(cls, text: str) -> ShapeRange:
        """``"1,64,256"`` (min,opt,max) or ``"5"`` (fixed)."""
        values = [int(part) for part in text.split(",")]
        if len(values) == 1:
            values *= 3
        if len(values) != 3:
            raise ValueError(f"expected MIN,OPT,MAX or one value, got {text!r}")
        return cls(*values)

    def to_json(self) -> dict:
        return {"min": self.min, "opt": self.opt, "max": self.max}


# 5-frame windows (a partial last window is zero-padded to 5); videos up to 300 frames
DEFAULT_FRAMES = {"segment": ShapeRange(5, 5, 5), "video": ShapeRange(1, 300, 300)}
DEFAULT_BATCH = {"segment": ShapeRange(1, 256, 1024), "video": ShapeRange(1, 32, 128)}


@dataclass(frozen=True)
class BuildSettings:
    """What :func:`build_plan` builds.

    Attributes:
        batch, frames: the optimization profile (None: the kind's default,
            :data:`DEFAULT_BATCH`, :data:`DEFAULT_FRAMES`).
        workspace_mib: the builder's workspace limit.
        timing_cache: where the timing cache is read and written (None: beside the
            artifact, one file per TensorRT version and compute capability).
        device: the CUDA device to build for.
    """

    batch: ShapeRange | None = None
    frames: ShapeRange | None = None
    workspace_mib: int = DEFAULT_WORKSPACE_MIB
    timing_cache: Path | None = None
    device: int = 0


@dataclass(frozen=True)
class BuildMode:
    """How a network is typed: strongly (precision from the graph) or by builder flags."""

    strongly_typed: bool
    builder_flags: tuple[str, ...]


def version_tuple(version: str) -> tuple[int, int]:
    """``"10.4.0.26"`` → ``(10, 4)``; ``"7.5"`` → ``(7, 5)``."""
    parts = version.split(".")
    return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0


def build_mode(tensorrt_version: str, precision: str) -> BuildMode:
    """The network typing for ``precision`` on this TensorRT (module doc, step 1)."""
    if version_tuple(tensorrt_version) >= (10, 0):
        return BuildMode(strongly_typed=True, builder_flags=())
    if version_tuple(tensorrt_version) < (8, 6):
        raise ArtifactError(f"TensorRT {tensorrt_version} is too old: the engine needs 8.6 or later "
                            "(name-based I/O, ONNX opset 17)")
    if precision == "bf16":
        raise ArtifactError(f"TensorRT {tensorrt_version} has no bf16: export fp16 or int8 for it")
    flags = {"fp32": (), "fp16": ("FP16",), "int8": ("INT8", "FP16")}[precision]
    return BuildMode(strongly_typed=False, builder_flags=flags)


def check_device(tensorrt_version: str, compute_capability: str, precision: str) -> None:
    """Refuse a TensorRT/GPU/precision combination that cannot build (module doc, step 2)."""
    capability = version_tuple(compute_capability)
    if version_tuple(tensorrt_version) >= (10, 0) and capability < MIN_COMPUTE_CAPABILITY_TRT10:
        raise ArtifactError(f"TensorRT {tensorrt_version} builds for compute capability >= 7.5, "
                            f"this GPU has {compute_capability}: use TensorRT 8.6 "
                            "(pip install 'tensorrt==8.6.*') with an opset-17 export")
    if precision == "bf16" and capability < (8, 0):
        raise ArtifactError(f"bf16 needs compute capability >= 8.0, this GPU has {compute_capability}")


def optimization_profile(inputs: tuple[TensorSpec, ...], batch: ShapeRange,
                         frames: ShapeRange) -> dict[str, dict[str, list[int]]]:
    """``{input: {"min", "opt", "max"}}`` shapes: named axes from the ranges, ints fixed."""
    ranges = {"batch": batch, "frames": frames}
    profile = {}
    for spec in inputs:
        axes = [ranges[dim] if isinstance(dim, str) else ShapeRange(dim, dim, dim) for dim in spec.shape]
        profile[spec.name] = {point: [getattr(axis, point) for axis in axes]
                              for point in ("min", "opt", "max")}
    return profile


def default_timing_cache(artifact: Artifact, tensorrt_version: str, compute_capability: str) -> Path:
    """``<artifact's parent>/tensorrt-<version>-sm<cc>.timing-cache``: shared by the
    artifacts exported together, valid for one TensorRT version and one GPU architecture."""
    return artifact.path.parent / (f"tensorrt-{tensorrt_version}-sm"
                                   f"{compute_capability.replace('.', '')}.timing-cache")


def build_plan(artifact_dir: str | os.PathLike, settings: BuildSettings = BuildSettings()) -> Artifact:
    """Build model.plan for an artifact and record it in its manifest.

    Returns:
        The artifact, reloaded (verified) with its plan.

    Raises:
        ArtifactError: TensorRT, the GPU or the precision cannot build it, or the build failed
            (with the parser's errors).
    """
    stale = Path(artifact_dir) / PLAN_FILE
    if stale.is_file() and read_manifest(artifact_dir).get("plan") is None:
        # a plan the manifest does not describe is what an interrupted build leaves behind
        log.warning("removing %s: the manifest does not describe it", stale)
        stale.unlink()
    artifact = load_artifact(artifact_dir)
    trt = import_tensorrt()
    device = device_info(settings.device)
    check_device(trt.__version__, device["compute_capability"], artifact.precision)
    mode = build_mode(trt.__version__, artifact.precision)
    batch = settings.batch or DEFAULT_BATCH[artifact.kind]
    frames = settings.frames or DEFAULT_FRAMES[artifact.kind]
    profile = optimization_profile(artifact.inputs, batch, frames)
    cache_path = settings.timing_cache or default_timing_cache(
        artifact, trt.__version__, device["compute_capability"])
    started = time.perf_counter()
    plan, cache = _build(trt, artifact, mode, profile, settings.workspace_mib << 20,
                         cache_path.read_bytes() if cache_path.is_file() else b"")
    write_atomically(artifact.path / PLAN_FILE, plan)
    write_atomically(cache_path, cache)
    manifest = artifact.manifest
    manifest["plan"] = {
        "file": PLAN_FILE, "tensorrt_version": trt.__version__, "device": device,
        "onnx_sha256": manifest["onnx"]["sha256"], "strongly_typed": mode.strongly_typed,
        "builder_flags": list(mode.builder_flags), "tf32": artifact.precision != "fp32",
        "profiles": [profile],
        "ranges": {"batch": batch.to_json(), "frames": frames.to_json()},
        "workspace_mib": settings.workspace_mib, "timing_cache": str(cache_path),
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    write_manifest(artifact.path, manifest)
    log.info("built %s in %.1f s", artifact.path / PLAN_FILE, manifest["plan"]["build_seconds"])
    return load_artifact(artifact.path)


def rebuild_plan(artifact: Artifact) -> Artifact:
    """Rebuild an artifact's plan for this machine with the ranges it was built with.

    The ``rebuild`` hook of :class:`modloc.engine.runtime.backends.tensorrt_backend.TensorRTBackend`.
    """
    ranges = (artifact.plan or {}).get("ranges", {})
    settings = BuildSettings(
        batch=ShapeRange(**ranges["batch"]) if "batch" in ranges else None,
        frames=ShapeRange(**ranges["frames"]) if "frames" in ranges else None,
        workspace_mib=(artifact.plan or {}).get("workspace_mib", DEFAULT_WORKSPACE_MIB))
    return build_plan(artifact.path, settings)


def _build(trt, artifact: Artifact, mode: BuildMode, profile: dict, workspace: int,
           cache: bytes) -> tuple[bytes, bytes]:
    """TensorRT's part: ``(plan, timing cache)`` bytes."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag = (trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED if mode.strongly_typed
            else trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    # by path: the parser finds model.onnx.data beside it
    if not parser.parse_from_file(str(artifact.onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ArtifactError(f"{artifact.onnx_path}: TensorRT {trt.__version__} cannot parse it: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    for name in mode.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    if artifact.precision == "fp32":
        # fp32 means fp32: by default TensorRT runs fp32 matmuls as TF32 (10-bit mantissa)
        # on Ampere and later, which would miss the graph's parity by orders of magnitude
        config.clear_flag(trt.BuilderFlag.TF32)
    shapes = builder.create_optimization_profile()
    for name, points in profile.items():
        shapes.set_shape(name, points["min"], points["opt"], points["max"])
    config.add_optimization_profile(shapes)
    timing_cache = config.create_timing_cache(cache)
    config.set_timing_cache(timing_cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ArtifactError(f"{artifact.path}: TensorRT {trt.__version__} failed to build the "
                            "engine (see its log above)")
    return bytes(plan), bytes(config.get_timing_cache().serialize())


__all__ = ["DEFAULT_BATCH", "DEFAULT_FRAMES", "BuildMode", "BuildSettings", "ShapeRange",
           "build_mode", "build_plan", "check_device", "default_timing_cache",
           "optimization_profile", "rebuild_plan", "version_tuple"]
