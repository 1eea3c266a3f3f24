"""modloc: video temporal concept localization on YouTube-8M features (the MOD system).

The public Python API, importable without torch (each name is imported on first use)::

    import modloc

    videos = list(modloc.read_videos("runs/demo/data/test/*.tfrecord"))
    with modloc.Localizer.from_artifacts("runs/demo/export") as localizer:
        results = localizer.localize(videos)   # per video: top-20 candidates, fused windows
        best = int(results[0].candidate_ids[0])
        print(best, results[0].segments(best)[:3])  # its best windows: (start second, score)
        localizer.rankings.write_submission("submission.csv")  # the rankings as Kaggle CSV

The packages behind it: :mod:`modloc.engine` (formats, runtime, service),
:mod:`modloc.training`, :mod:`modloc.export`; the ``modloc`` command is :mod:`modloc.cli`.
"""

from __future__ import annotations

import importlib

from modloc._version import __version__

# public name → the module that defines it
_EXPORTS = {
    "Video": "modloc.engine.base.io.examples",
    "read_videos": "modloc.engine.base.io.readers",
    "SegmentTruth": "modloc.engine.base.metrics.segment",
    "segment_map": "modloc.engine.base.metrics.segment",
    "read_submission": "modloc.engine.base.submission",
    "write_submission": "modloc.engine.base.submission",
    "open_backend": "modloc.engine.runtime.backends",
    "FusionConfig": "modloc.engine.runtime.fusion",
    "PipelineConfig": "modloc.engine.runtime.pipeline",
    "VideoLocalization": "modloc.engine.runtime.pipeline",
    "Rankings": "modloc.engine.runtime.rankings",
    "Localizer": "modloc.engine.runtime.localizer",
    "infer": "modloc.engine.runtime.infer",
    "LocalizationClient": "modloc.engine.service.client",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'modloc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = ["__version__", *_EXPORTS]
