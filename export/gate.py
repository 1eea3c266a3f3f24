"""The quality gate of reduced-precision variants: what they must keep of fp32's answers.

Every variant (fp16, bf16, INT8; :mod:`modloc.export.precision`) is measured against fp32
on the rated validation split, on what its model serves (the 5-frame windows of a segment
model, the videos of a video model), by five measures; :func:`quality_gate` records each
in the manifest's ``quality_gate`` as ``{metric, reference_value, value, ceiling,
threshold, passed, rule}`` (``reference_value``: fp32's own value; ``ceiling``: the best
value there is):

================================  ============================================  ==================
measure                           what                                          passes when
================================  ============================================  ==================
``mean_abs_probability_error``    mean |p − p_fp32| over every (example, class)  ≤ 0.01
``p99_abs_probability_error``     its 99th percentile                            ≤ 0.05
``top20_candidate_overlap``       mean share of fp32's top-20 classes an         ≥ 0.95
                                  example keeps (the pipeline's candidates)
``score_rank_correlation``        Spearman correlation of the examples' scores   ≥ 0.99
                                  per class, mean over the classes (the order
                                  segments are ranked in)
``map_at_k_every_class``          segment MAP@K with every class a candidate     ≥ fp32's − 0.005
================================  ============================================  ==================

The agreement measures have headroom where the MAP has none: a segment model fine-tuned
on the validation split ranks its windows perfectly in fp32 and INT8 alike (MAP@K 1.0,
its ceiling), while its probabilities may still move. The bounds (:class:`GateThresholds`)
leave room around what the demo's INT8 variants measure (``make demo``, 2026-12: mean error
at most 0.0007, p99 at most 0.007, top-20 overlap at least 0.990, rank correlation at least
0.9997, MAP@K within 0.0012 of fp32's), and fp16 and bf16 sit far inside them; an INT8
graph calibrated on a single window falls to a rank correlation of 0.974 and fails
(``tests/test_export.py``). ``modloc export --gate MEASURE=BOUND`` changes them. A
variant that fails one is not published, and its failure names the measure, both values,
the bound and a remedy (:func:`remedy`).

Pure numpy: ``modloc export``'s flags read this module without torch or ONNX.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

MAP_TOLERANCE = 0.005
FLOAT_LAYERS = ("classifier",)
# the weight layers of the folded graph (modloc.export.graph), by the name their weights carry
WEIGHT_LAYERS = ("expand", "attention", "cluster_logits", "hidden", "squeeze", "excite",
                 "classifier", "gate")
TOP_CLASSES = 20  # the pipeline's candidates per video
RANK_ROWS = 20_000  # examples kept for the rank correlation (the rest streams)
_ERROR_BINS = 100_000  # the absolute-error histogram over [0, 1]: percentiles to 1e-5


@dataclass(frozen=True)
class GateThresholds:
    """The bounds of the quality gate (module doc): errors at most, agreement at least, and
    the MAP@K at most ``map_drop`` below fp32's."""

    mean_abs_error: float = 0.01
    p99_abs_error: float = 0.05
    top_overlap: float = 0.95
    rank_correlation: float = 0.99
    map_drop: float = MAP_TOLERANCE

    def __post_init__(self):
        for item in dataclasses.fields(self):
            low = -1 if item.name == "rank_correlation" else 0
            if not low <= getattr(self, item.name) <= 1:
                raise ValueError(f"quality gate {item.name} must be in [{low}, 1], got "
                                 f"{getattr(self, item.name)}")

    @classmethod
    def measure_only(cls) -> GateThresholds:
        """Bounds every variant meets: the measures are recorded, nothing is refused (for
        benchmarks, which time the variants rather than judge them)."""
        return cls(mean_abs_error=1, p99_abs_error=1, top_overlap=0, rank_correlation=-1, map_drop=1)


class Agreement:
    """A variant's probabilities against fp32's on the same examples, accumulated batch by
    batch (module doc): absolute errors (sum and a histogram for the percentile), the top-20
    overlap per example, and the first :data:`RANK_ROWS` examples for the rank correlation.
    """

    def __init__(self, rank_rows: int = RANK_ROWS):
        self.rank_rows = rank_rows
        self.examples = 0
        self.error_sum = 0.0
        self.errors = 0
        self.histogram = np.zeros(_ERROR_BINS, np.int64)
        self.overlap_sum = 0.0
        self.kept: list[tuple[np.ndarray, np.ndarray]] = []
        self.kept_rows = 0

    def add(self, reference: np.ndarray, variant: np.ndarray) -> None:
        """``(B, C)`` fp32 and variant probabilities of the same ``B`` examples."""
        reference = np.asarray(reference, np.float64)
        variant = np.asarray(variant, np.float64)
        error = np.abs(variant - reference)
        self.error_sum += float(error.sum())
        self.errors += error.size
        self.histogram += np.histogram(error, bins=_ERROR_BINS, range=(0.0, 1.0))[0]
        top = min(TOP_CLASSES, reference.shape[1])
        chosen = np.zeros(reference.shape, bool)
        np.put_along_axis(chosen, np.argpartition(-reference, top - 1, axis=1)[:, :top], True, axis=1)
        kept = np.take_along_axis(chosen, np.argpartition(-variant, top - 1, axis=1)[:, :top], axis=1)
        self.overlap_sum += float(kept.sum(axis=1).sum()) / top
        self.examples += len(reference)
        if self.kept_rows < self.rank_rows:
            rows = self.rank_rows - self.kept_rows
            self.kept.append((reference[:rows], variant[:rows]))
            self.kept_rows += len(reference[:rows])

    def measures(self) -> dict[str, float]:
        if not self.examples:
            raise ValueError("no example was measured")
        cumulative = np.cumsum(self.histogram)
        p99_bin = int(np.searchsorted(cumulative, 0.99 * self.errors))
        reference = np.concatenate([pair[0] for pair in self.kept])
        variant = np.concatenate([pair[1] for pair in self.kept])
        return {"mean_abs_probability_error": self.error_sum / self.errors,
                "p99_abs_probability_error": (p99_bin + 1) / _ERROR_BINS,
                "top20_candidate_overlap": self.overlap_sum / self.examples,
                "score_rank_correlation": rank_correlation(reference, variant)}


def rank_correlation(reference: np.ndarray, variant: np.ndarray) -> float:
    """Spearman's correlation of two ``(N, C)`` score tables, column by column (ties get
    their average rank), averaged over the columns; a column constant in both counts as
    1, constant in one only as 0."""
    values = []
    for column in range(reference.shape[1]):
        a, b = _average_ranks(reference[:, column]), _average_ranks(variant[:, column])
        a, b = a - a.mean(), b - b.mean()
        scale = np.sqrt((a * a).sum() * (b * b).sum())
        if scale == 0:
            values.append(1.0 if not a.any() and not b.any() else 0.0)
        else:
            values.append(float((a * b).sum() / scale))
    return float(np.mean(values))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - (counts - 1) / 2.0)[inverse]).astype(np.float64)


def quality_gate(agreement: dict[str, float], reference_map: tuple[float, float],
                 variant_map: tuple[float, float], thresholds: GateThresholds) -> dict:
    """The gate of one variant: every measure with its values and verdict, and the verdict.

    Args:
        agreement: :meth:`Agreement.measures` of the variant.
        reference_map, variant_map: ``(MAP@K, its ceiling)`` with every class a candidate,
            of fp32 and of the variant.
    """
    t = thresholds
    measures = [
        _measure("mean_abs_probability_error", 0.0, agreement["mean_abs_probability_error"], 0.0,
                 t.mean_abs_error, error=True),
        _measure("p99_abs_probability_error", 0.0, agreement["p99_abs_probability_error"], 0.0,
                 t.p99_abs_error, error=True),
        _measure("top20_candidate_overlap", 1.0, agreement["top20_candidate_overlap"], 1.0,
                 t.top_overlap),
        _measure("score_rank_correlation", 1.0, agreement["score_rank_correlation"], 1.0,
                 t.rank_correlation),
        _measure("map_at_k_every_class", reference_map[0], variant_map[0], variant_map[1],
                 reference_map[0] - t.map_drop),
    ]
    return {"passed": all(m["passed"] for m in measures), "reference": "fp32", "measures": measures}


def _measure(metric: str, reference: float, value: float, ceiling: float, threshold: float,
             error: bool = False) -> dict:
    """One measure; an ``error`` passes at most ``threshold``, the others at least."""
    lower_is_better = error
    passed = value <= threshold if lower_is_better else value >= threshold
    return {"metric": metric, "reference_value": reference, "value": value, "ceiling": ceiling,
            "threshold": threshold, "passed": bool(passed),
            "rule": "value <= threshold" if lower_is_better else "value >= threshold"}


def failed_measures(gate: dict) -> str:
    """``metric value vs threshold (fp32 reference)`` for each failed measure."""
    return "; ".join(f"{m['metric']} {m['value']:.4g} (fp32 {m['reference_value']:.4g}), wanted "
                     f"{m['rule'].replace('value ', '').replace('threshold', format(m['threshold'], '.4g'))}"
                     for m in gate["measures"] if not m["passed"])


def remedy(precision: str, calibration_batches: int, float_layers: tuple[str, ...]) -> str:
    """What to try when a ``precision`` variant fails its gate."""
    if precision == "int8":
        kept = ", ".join((*FLOAT_LAYERS, *float_layers))
        layers = [layer for layer in WEIGHT_LAYERS if layer not in (*FLOAT_LAYERS, *float_layers)]
        return (f"calibrate on more data (--calibration-batches, {calibration_batches} now; "
                f"--calibration-batch-size), keep more layers in float (--int8-float-layers, "
                f"{kept} now; e.g. {' '.join(layers[-3:])}), or export fp16 instead")
    if precision == "fp16":
        return "fp16's range or precision does not suffice here: export bf16 (fp32's range) or fp32"
    return "bf16 keeps 8 bits of mantissa: export fp16 (more precision) or fp32"


__all__ = ["FLOAT_LAYERS", "MAP_TOLERANCE", "WEIGHT_LAYERS", "Agreement", "GateThresholds",
           "failed_measures", "quality_gate", "rank_correlation", "remedy"]
