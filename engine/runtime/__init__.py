"""The runtime layer: exported models turned into localizations and rankings.

Artifacts and backends, the pipeline (stages 1–3), fusion, the rankings (stage 4), the
batcher, the localizer, offline and distributed inference, the timeline. Imports only
:mod:`modloc.engine.base`.
"""
