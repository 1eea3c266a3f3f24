"""YouTube-8M metrics: the AP core, Kaggle segment MAP@K and G's video-level metrics."""

from modloc.engine.base.metrics.average_precision import (
    average_precision,
    ranked_average_precision,
    ranking_order,
    top_k_ranking,
)
from modloc.engine.base.metrics.segment import (
    MAX_SEGMENTS_PER_CLASS,
    RatedVideo,
    SegmentMAPResult,
    SegmentTruth,
    rank_segments,
    segment_id,
    segment_map,
)
from modloc.engine.base.metrics.video import (
    VideoMetrics,
    VideoMetricsResult,
    gap,
    hit_at_one,
    precision_at_equal_recall_rate,
)

__all__ = [
    "MAX_SEGMENTS_PER_CLASS",
    "RatedVideo",
    "SegmentMAPResult",
    "SegmentTruth",
    "VideoMetrics",
    "VideoMetricsResult",
    "average_precision",
    "gap",
    "hit_at_one",
    "precision_at_equal_recall_rate",
    "rank_segments",
    "ranked_average_precision",
    "ranking_order",
    "segment_id",
    "segment_map",
    "top_k_ranking",
]
