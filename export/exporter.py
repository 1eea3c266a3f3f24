"""``modloc export``: a checkpoint → artifact directories, one per graph and precision.

Each step is a function of its own (the CLI verb only strings them together):

1. :func:`load_model`: the checkpoint, on the CPU, in eval mode.
2. :func:`select_leaf`: the NeXtVLAD_distill leaf, by index or the one with the best
   segment MAP@K on the validation split (every leaf scored in one pass of the tree).
3. :func:`stage_graph`: the folded graph (:mod:`modloc.export.graph`) in fp32, fp16 or bf16 →
   one ``torch.export`` program (:func:`modloc.export.onnx_export.export_program`), saved as
   ``model.pt2`` and translated to ONNX (:func:`modloc.export.onnx_export.export_onnx`) →
   manifest → loaded back through the engine's own checks → parity with PyTorch
   (:func:`modloc.export.onnx_export.check_parity`) of the ONNX graph on ONNX Runtime and of the
   reloaded program on the torch backend (fp32 must pass both, the others are measured). A
   video model's fp32 graph is also written as the live encoder and head
   (:mod:`modloc.export.live`), gated on parity with ``model.onnx``.
4. :func:`stage_int8`: the INT8 QDQ graph quantized from the staged fp32 one, calibrated
   on TFRecord batches, then measured the same way (ONNX only: no model.pt2).
5. :func:`measure_precisions`: fp32 and every variant on the validation split in one pass:
   each variant's quality gate (:func:`modloc.export.precision.quality_gate`: agreement with
   fp32's probabilities, and segment MAP@K with every class a candidate), recorded in its
   manifest as ``quality_gate``.
6. :func:`modloc.engine.base.atomic.replace_directory`: each finished directory moves into place.

Artifacts go to ``<out>/<graph>-<precision>`` (``distill-fp32``, ``ensemble-int8``,
``single-fp16``). A graph whose fp32 export fails its parity check publishes nothing; a
variant that fails its quality gate is not published (an earlier export's directory of
that name is removed: it belongs to another fp32), the others are, and its summary names
the failed measures and a remedy (``published`` False).

Each step says on stderr what it is about to do (:func:`modloc.engine.base.progress.announce`),
unless ``ExportSettings.progress`` is False.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from modloc.engine.base.atomic import replace_directory
from modloc.engine.base.io.tfrecord import Patterns, count_records
from modloc.engine.base.metrics import MAX_SEGMENTS_PER_CLASS
from modloc.engine.base.progress import Progress, announce
from modloc.engine.runtime.artifacts import (
    ONNX_FILE,
    PT2_FILE,
    PT2_METADATA,
    Artifact,
    load_artifact,
)
from modloc.engine.runtime.backends import Backend
from modloc.engine.runtime.backends.torch_backend import TorchBackend
from modloc.engine.runtime.live import LiveVideoModel
from modloc.engine.runtime.pipeline import Scorer, backend_scorer
from modloc.export.gate import Agreement, GateThresholds, failed_measures, quality_gate, remedy
from modloc.export.graph import export_module
from modloc.export.live import check_live_parity, export_live_graphs
from modloc.export.manifest import (
    frames_record,
    new_manifest,
    onnx_record,
    staging_directory,
    write_manifest,
)
from modloc.export.onnx_export import (
    DEFAULT_OPSET,
    PARITY_SHAPES,
    PARITY_TOLERANCE,
    ParityError,
    check_parity,
    export_onnx,
    export_program,
    io_specs,
)
from modloc.export.precision import calibration_batches, open_runner, quantize_int8
from modloc.export.validation import validation_map, validation_results
from modloc.training.checkpoint import Checkpoint, load_checkpoint
from modloc.training.models import MODTree, NeXtVLADModel, TreeOutput, leaf_paths
from modloc.training.models.registry import count_parameters

log = logging.getLogger(__name__)

PRECISION_COMPUTE = {
    "fp32": "float32 throughout",
    "fp16": "float16 weights and linear layers; softmaxes, L2 normalizations, long reductions "
            "(VLAD aggregation, frame means, mixtures) and the outputs in float32",
    "bf16": "bfloat16 weights and linear layers; softmaxes, L2 normalizations, long reductions "
            "(VLAD aggregation, frame means, mixtures) and the outputs in float32",
    "int8": "int8 QDQ weight layers (per-channel symmetric weights, per-tensor symmetric "
            "activations); everything else float32",
}
INT8_PT2_REASON = ("the INT8 graph is ONNX Runtime's QDQ quantization of model.onnx; it has no "
                   "PyTorch program: run it with the onnxruntime or tensorrt backend")


@dataclass(frozen=True)
class ExportSettings:
    """What :func:`export_checkpoint` produces and how it checks it.

    Attributes:
        graphs: ``"distill"`` and/or ``"ensemble"`` for a MOD tree, ``"single"`` for a plain
            NeXtVLAD; None exports every graph the checkpoint has.
        leaf: the distill leaf's index, or ``"best"`` (best validation MAP@K).
        precisions: any of ``"fp32"`` (always made: the others are measured against it),
            ``"fp16"``, ``"bf16"``, ``"int8"``.
        opset: 18, or 17 for TensorRT 8.6.
        split_streams: ``rgb`` and ``audio`` inputs instead of ``features``.
        validation: a rated split (frame-level TFRecords with segment ratings): picks the
            best leaf and measures the precision variants.
        calibration: the INT8 calibration split (default: ``validation``).
        calibration_batches, calibration_batch_size: how much of it calibrates.
        int8_float_layers: weight layers INT8 keeps in float besides the classifiers (of
            :data:`modloc.export.precision.WEIGHT_LAYERS`).
        k: MAP@K's K.
        gate: the quality gate's thresholds for every variant
            (:class:`modloc.export.precision.GateThresholds`).
        parity_tolerance: the largest relative error of the fp32 probabilities vs PyTorch.
        parity_shapes: the ``(B, M)`` batches of the parity check.
        threads: ONNX Runtime intra-op threads for the checks (None: one per core).
        progress: say each step on stderr before it runs.
        live: also write a video model's fp32 graph as the live encoder and head.
    """

    graphs: tuple[str, ...] | None = None
    leaf: int | str = "best"
    precisions: tuple[str, ...] = ("fp32",)
    opset: int = DEFAULT_OPSET
    split_streams: bool = False
    validation: Patterns | None = None
    calibration: Patterns | None = None
    calibration_batches: int = 8
    calibration_batch_size: int = 16
    int8_float_layers: tuple[str, ...] = ()
    k: int = MAX_SEGMENTS_PER_CLASS
    gate: GateThresholds = GateThresholds()
    parity_tolerance: float = PARITY_TOLERANCE
    parity_shapes: tuple[tuple[int, int], ...] = PARITY_SHAPES
    threads: int | None = None
    progress: bool = True
    live: bool = True

    def __post_init__(self):
        unknown = set(self.precisions) - set(PRECISION_COMPUTE)
        if unknown:
            raise ValueError(f"unknown precision(s) {sorted(unknown)}; choose from {list(PRECISION_COMPUTE)}")
        if set(self.precisions) - {"fp32"} and self.validation is None:
            raise ValueError("precision variants are measured against fp32 on a rated split: "
                             "give the validation data")
        if self.leaf != "best" and not isinstance(self.leaf, int):
            raise ValueError(f"leaf must be an index or 'best', got {self.leaf!r}")


@dataclass(frozen=True)
class LeafChoice:
    """The distill leaf: its index (depth-first), tree path, and why it was chosen."""

    index: int
    path: tuple[int, ...]
    selection: str
    scores: tuple[float, ...] | None = None
    split: str | None = None

    def to_json(self) -> dict:
        return {"index": self.index, "path": list(self.path), "selection": self.selection,
                "scores": None if self.scores is None else list(self.scores),
                "metric": None if self.scores is None else "segment MAP@K", "split": self.split}


@dataclass(eq=False)
class _Staged:
    """An artifact being built: its directory, manifest and runner (for the checks)."""

    precision: str
    directory: Path
    manifest: dict
    artifact: Artifact
    runner: Backend


def load_model(checkpoint: str | os.PathLike) -> Checkpoint:
    """The checkpoint's model on the CPU, in eval mode (sha256 verified)."""
    loaded = load_checkpoint(checkpoint, "cpu")
    if not isinstance(loaded.model, MODTree | NeXtVLADModel):
        raise ValueError(f"{checkpoint}: export handles NeXtVLAD models and MOD trees, not "
                         f"{type(loaded.model).__name__}")
    return loaded


def model_kind(checkpoint: Checkpoint) -> str:
    """``"video"`` or ``"segment"``: the mask mode the model was trained in."""
    model = checkpoint.model
    return (model.config.leaf if isinstance(model, MODTree) else model.config).mode


def available_graphs(checkpoint: Checkpoint) -> tuple[str, ...]:
    return ("distill", "ensemble") if isinstance(checkpoint.model, MODTree) else ("single",)


def torch_scorer(module: nn.Module) -> Scorer:
    """PyTorch's probabilities (a tree's root) for uint8 batches: the parity reference."""
    def score(features: np.ndarray, num_frames: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            output = module(torch.from_numpy(features), torch.from_numpy(num_frames))
        logits = output.root if isinstance(output, TreeOutput) else output
        return torch.sigmoid(logits).numpy()
    return score


def select_leaf(checkpoint: Checkpoint, leaf: int | str = "best", validation: Patterns | None = None,
                k: int = MAX_SEGMENTS_PER_CLASS, progress: bool = False) -> LeafChoice:
    """The NeXtVLAD_distill leaf of a tree checkpoint.

    ``leaf="best"`` scores every leaf (its own probabilities, in one pass of the tree) with
    :func:`modloc.export.validation.validation_map` on ``validation`` (reporting its
    progress with ``progress``) and takes the best; ties go to the lower index.
    """
    tree = checkpoint.model
    if not isinstance(tree, MODTree):
        raise ValueError("only a MOD tree has leaves to choose from")
    paths = leaf_paths(tree.config.branching)
    if leaf != "best":
        if not 0 <= int(leaf) < len(paths):
            raise ValueError(f"leaf {leaf} is not in [0, {len(paths)}) for a "
                             f"{tree.config.branching} tree")
        return LeafChoice(int(leaf), paths[int(leaf)], "given")
    if validation is None:
        raise ValueError("choosing the best leaf needs validation data (or give the leaf index)")

    def leaf_probabilities(features: np.ndarray, num_frames: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            output = tree(torch.from_numpy(features), torch.from_numpy(num_frames))
        return {str(i): torch.sigmoid(output.logits[path]).numpy() for i, path in enumerate(paths)}

    maps = validation_map(leaf_probabilities, model_kind(checkpoint), checkpoint.class_ids,
                          validation, k=k, progress=progress)
    scores = tuple(maps[str(i)] for i in range(len(paths)))
    best = int(np.argmax(scores))
    log.info("leaf validation MAP@K: %s; best leaf %d", np.round(scores, 4).tolist(), best)
    return LeafChoice(best, paths[best], "best validation segment MAP@K", scores, _describe(validation))


def reference_module(checkpoint: Checkpoint, graph: str, leaf: LeafChoice | None) -> nn.Module:
    """The PyTorch module a graph must agree with: the tree, a copy of a leaf, or the model."""
    if graph == "distill":
        return checkpoint.model.leaf(leaf.index)
    return checkpoint.model


def stage_graph(checkpoint: Checkpoint, directory: Path, graph: str, leaf: LeafChoice | None,
                precision: str, settings: ExportSettings) -> _Staged:
    """Export the fp32/fp16/bf16 graph into ``directory`` (model.onnx and model.pt2 from one
    ``torch.export`` program) and check both against PyTorch.

    Raises:
        ParityError: the fp32 graph or program misses the parity tolerance.
    """
    module = export_module(checkpoint.model, graph, None if leaf is None else leaf.index, precision,
                           settings.split_streams)
    kind = model_kind(checkpoint)
    metadata = {"modloc.kind": kind, "modloc.graph": graph,
                "modloc.leaf": "" if leaf is None else str(leaf.index)}
    program = export_program(module)
    # an ExportedProgram keeps its input names but not its output names: the file says what
    # it is, so that the torch backend can refuse a program that does not fit the manifest
    description = {"kind": kind, "graph": graph, "leaf": None if leaf is None else leaf.index,
                   "precision": precision, "inputs": list(module.input_names),
                   "outputs": list(module.output_names)}
    torch.export.save(program, directory / PT2_FILE,
                      extra_files={PT2_METADATA: json.dumps(description)})
    onnx_model = export_onnx(module, program, directory / ONNX_FILE, settings.opset, metadata)
    live = None
    if settings.live and kind == "video" and precision == "fp32":
        live = export_live_graphs(module, directory, len(checkpoint.class_ids), settings.opset, metadata)
    inputs, outputs = io_specs(module, len(checkpoint.class_ids))
    manifest = new_manifest(
        checkpoint=checkpoint, kind=kind, graph=graph, leaf=None if leaf is None else leaf.to_json(),
        precision={"name": precision, "compute": PRECISION_COMPUTE[precision]},
        inputs=inputs, outputs=outputs, use_mask=module.use_mask,
        frames=frames_record(checkpoint, module.pad_to, module.gate_frames, module.needs_frame_mean),
        onnx_model=onnx_model, live=live)
    return _check_staged(checkpoint, directory, manifest, graph, leaf, settings)


def stage_int8(checkpoint: Checkpoint, directory: Path, fp32: _Staged, graph: str,
               leaf: LeafChoice | None, settings: ExportSettings) -> _Staged:
    """Quantize the staged fp32 graph to INT8 QDQ into ``directory`` and measure it."""
    kind = model_kind(checkpoint)
    patterns = settings.calibration if settings.calibration is not None else settings.validation
    batches = calibration_batches(patterns, kind, settings.calibration_batch_size,
                                  settings.calibration_batches)
    quantization = quantize_int8(fp32.artifact, directory / ONNX_FILE, batches,
                                 settings.int8_float_layers)
    quantization["split"] = _describe(patterns)
    manifest = copy.deepcopy(fp32.manifest)
    manifest.update(precision={"name": "int8", "compute": PRECISION_COMPUTE["int8"],
                               "quantization": quantization},
                    onnx=onnx_record(onnx.load(directory / ONNX_FILE, load_external_data=False)),
                    pt2={"file": None, "reason": INT8_PT2_REASON}, parity=None, live=None)
    return _check_staged(checkpoint, directory, manifest, graph, leaf, settings)


def _check_staged(checkpoint: Checkpoint, directory: Path, manifest: dict, graph: str,
                  leaf: LeafChoice | None, settings: ExportSettings) -> _Staged:
    """Write the manifest, load the directory as the engine would, run the parity checks
    (the ONNX graph, and model.pt2 where there is one)."""
    write_manifest(directory, manifest)
    artifact = load_artifact(directory)
    runner = open_runner(artifact, settings.threads)
    reference = torch_scorer(reference_module(checkpoint, graph, leaf))
    tolerance = settings.parity_tolerance if manifest["precision"]["name"] == "fp32" else None
    manifest["parity"] = check_parity(backend_scorer(runner), reference, settings.parity_shapes,
                                      tolerance)
    manifest["parity"]["evaluated_with"] = runner.name
    if artifact.pt2_path is not None:
        # the saved file, loaded back as the engine loads it: catches what a save and load
        # could lose, which checking the program in memory would not
        with TorchBackend(artifact) as program:
            try:
                manifest["pt2"]["parity"] = check_parity(backend_scorer(program), reference,
                                                         settings.parity_shapes, tolerance)
            except ParityError as error:
                raise ParityError(f"{PT2_FILE}, loaded back on the torch backend: {error}") from None
    if manifest.get("live"):
        live = LiveVideoModel(artifact, settings.threads)
        try:
            manifest["live"]["parity"] = check_live_parity(live, runner)
        finally:
            live.close()
    write_manifest(directory, manifest)
    return _Staged(manifest["precision"]["name"], directory, manifest, artifact, runner)


def measure_precisions(staged: list[_Staged], kind: str, class_ids, settings: ExportSettings) -> None:
    """Every staged precision on the validation split, in one pass: segment MAP@K with every
    class a candidate (``precision.map_at_k``) and, for each variant, its agreement with
    fp32 and the verdict of its quality gate (``quality_gate``; None for fp32, the
    reference). Each manifest is rewritten."""
    runners = {item.precision: item.runner for item in staged}
    agreements = {name: Agreement() for name in runners if name != "fp32"}

    def score(features: np.ndarray, num_frames: np.ndarray) -> dict[str, np.ndarray]:
        outputs = {name: runner.run(features, num_frames=num_frames) for name, runner in runners.items()}
        for name, agreement in agreements.items():
            agreement.add(outputs["fp32"], outputs[name])
        return outputs

    # every class a candidate: a video model's dummy prediction ranks all its classes, so
    # the measure does not hang on which classes make a video's top 20
    results = validation_results(score, kind, class_ids, settings.validation, k=settings.k,
                                 top_n=len(class_ids), progress=settings.progress)
    reference = results["fp32"]
    split = _describe(settings.validation)
    for item in staged:
        result = results[item.precision]
        record = {"k": settings.k, "split": split, "candidates": "every class", "value": result.map,
                  "ceiling": result.ceiling, "evaluated_with": item.runner.name}
        gate = None
        if item.precision != "fp32":
            record.update(fp32=reference.map, difference=result.map - reference.map)
            agreement = agreements[item.precision]
            gate = quality_gate(agreement.measures(), (reference.map, reference.ceiling),
                                (result.map, result.ceiling), settings.gate)
            gate.update(split=split, examples=agreement.examples,
                        example="5-frame window" if kind == "segment" else "video",
                        evaluated_with=item.runner.name)
            if not gate["passed"]:
                gate["remedy"] = remedy(item.precision, settings.calibration_batches,
                                        settings.int8_float_layers)
        item.manifest["precision"]["map_at_k"] = record
        item.manifest["quality_gate"] = gate
        write_manifest(item.directory, item.manifest)


def export_graph(checkpoint: Checkpoint, out: Path, graph: str, leaf: LeafChoice | None,
                 settings: ExportSettings) -> list[dict]:
    """Every precision of one graph: staged, checked, measured, then fp32 and the variants
    that pass their quality gate published (module doc)."""
    precisions = ["fp32", *(p for p in settings.precisions if p != "fp32")]
    destinations = {p: out / f"{graph}-{p}" for p in precisions}
    name = f"{model_kind(checkpoint)} {graph}"
    staged: list[_Staged] = []
    # the graph's stages (each precision, then the measurement) as the count: a stage is
    # one long call (torch.export, quantization), so the timer's lines carry the news
    bar = Progress(name, len(precisions) + (settings.validation is not None), "stage",
                   enabled=settings.progress)
    try:
        for precision in precisions:
            bar.set_postfix(now=precision)
            directory = staging_directory(destinations[precision])
            if precision == "int8":
                patterns = settings.calibration if settings.calibration is not None else settings.validation
                _say(settings, f"{name}-int8: quantizing the fp32 graph, calibrated on "
                               f"{settings.calibration_batches} batches of {settings.calibration_batch_size} "
                               f"from {_describe(patterns)}; parity measured against PyTorch")
                staged.append(stage_int8(checkpoint, directory, staged[0], graph, leaf, settings))
            else:
                _say(settings, f"{name}-{precision}: torch.export, ONNX opset {settings.opset}, "
                               f"parity against PyTorch ({len(settings.parity_shapes)} shapes"
                               f"{', gated' if precision == 'fp32' else ', measured'})")
                staged.append(stage_graph(checkpoint, directory, graph, leaf, precision, settings))
            parity = staged[-1].manifest["parity"]
            log.info("%s-%s: against PyTorch, max relative error %.3g, max absolute error %.3g",
                     graph, precision, parity["max_rel_error"], parity["max_abs_error"])
            bar.update()
        if settings.validation is not None:
            bar.set_postfix(now="measuring")
            _say(settings, f"{name}: measuring {', '.join(precisions)} on {_describe(settings.validation)} "
                           f"({count_records(settings.validation)} videos): MAP@K with every class a "
                           "candidate, and each variant's agreement with fp32")
            measure_precisions(staged, model_kind(checkpoint), checkpoint.class_ids, settings)
            bar.update()
        bar.close()
        for item in staged:
            item.runner.close()
            gate = item.manifest.get("quality_gate")
            if gate is None or gate["passed"]:
                replace_directory(item.directory, destinations[item.precision])
            else:  # not published; an earlier export's variant of this name belongs to another fp32
                shutil.rmtree(destinations[item.precision], ignore_errors=True)
                _say(settings, f"{name}-{item.precision}: failed its quality gate, not published: "
                               f"{failed_measures(gate)}")
    finally:
        bar.close("stopped")  # a no-op after a finished export
        for item in staged:
            shutil.rmtree(item.directory, ignore_errors=True)
    return [_summary(destinations[item.precision], item.manifest) for item in staged]


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike,
                      settings: ExportSettings = ExportSettings()) -> list[dict]:
    """Export a checkpoint's graphs and precisions as artifact directories under ``out``.

    Returns one summary per artifact: path, kind, graph, leaf, precision, parity error,
    validation MAP@K and its difference from fp32.
    """
    loaded = load_model(checkpoint)
    graphs = settings.graphs or available_graphs(loaded)
    unsupported = set(graphs) - set(available_graphs(loaded))
    if unsupported:
        raise ValueError(f"{checkpoint}: a {type(loaded.model).__name__} exports as "
                         f"{available_graphs(loaded)}, not {sorted(unsupported)}")
    _announce_plan(loaded, graphs, settings, out)
    if "distill" in graphs and settings.leaf == "best" and settings.validation is not None:
        _say(settings, f"choosing the distill leaf: every leaf's segment MAP@K on "
                       f"{_describe(settings.validation)}")
    leaf = (select_leaf(loaded, settings.leaf, settings.validation, settings.k, settings.progress)
            if "distill" in graphs else None)
    out = Path(out)
    created = not out.exists()
    summaries = []
    try:
        for graph in graphs:
            summaries.extend(export_graph(loaded, out, graph, leaf if graph == "distill" else None,
                                          settings))
    finally:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a failed export leaves no empty directory behind
    return summaries


def _announce_plan(checkpoint: Checkpoint, graphs, settings: ExportSettings, out) -> None:
    """What the export is about to do: model, graphs, precisions, data, threads."""
    model = checkpoint.model
    shape = (f"{'x'.join(map(str, model.config.branching))} MOD tree" if isinstance(model, MODTree)
             else type(model).__name__)
    precisions = ["fp32", *(p for p in settings.precisions if p != "fp32")]
    _say(settings, f"export: {checkpoint.path}: {model_kind(checkpoint)} model, {shape}, "
                   f"{count_parameters(model):,} parameters, {len(checkpoint.class_ids)} classes -> {out}")
    validation = ("no validation split (nothing measured)" if settings.validation is None
                  else f"validation {_describe(settings.validation)} "
                       f"({count_records(settings.validation)} videos)")
    threads = settings.threads or os.cpu_count()
    _say(settings, f"export: graphs {', '.join(graphs)}; precisions {', '.join(precisions)}; "
                   f"{validation}; ONNX Runtime {threads} thread(s), torch {torch.get_num_threads()}")


def _say(settings: ExportSettings, message: str) -> None:
    announce(message, settings.progress)


def _summary(path: Path, manifest: dict) -> dict:
    precision = manifest["precision"]
    measured = precision.get("map_at_k") or {}
    leaf = manifest["model"]["leaf"]
    gate = manifest.get("quality_gate")
    summary = {"path": str(path), "kind": manifest["model"]["kind"], "graph": manifest["model"]["graph"],
               "leaf": None if leaf is None else leaf["index"], "precision": precision["name"],
               "opset": manifest["onnx"]["opset"],
               "parity_max_rel_error": manifest["parity"]["max_rel_error"],
               "parity_max_abs_error": manifest["parity"]["max_abs_error"],
               "map": measured.get("value"), "map_difference": measured.get("difference"),
               "quality_gate": gate, "published": gate is None or gate["passed"]}
    if not summary["published"]:
        summary["failure"] = (f"{summary['kind']} {summary['graph']}-{summary['precision']} failed "
                              f"its quality gate: {failed_measures(gate)}; try: {gate['remedy']}")
    return summary


def _describe(patterns: Patterns) -> str:
    return str(patterns) if isinstance(patterns, str | os.PathLike) else ", ".join(map(str, patterns))


__all__ = ["ExportSettings", "LeafChoice", "available_graphs", "export_checkpoint", "export_graph",
           "load_model", "measure_precisions", "model_kind", "reference_module", "select_leaf",
           "stage_graph", "stage_int8", "torch_scorer"]
