"""modloc.engine: everything needed to run, in three layers that import one way.

- :mod:`modloc.engine.base`: YouTube-8M formats and data (TFRecord IO, features,
  vocabularies and class spaces, test-time windows, metrics, submission files, synthetic
  data);
- :mod:`modloc.engine.runtime`: artifacts, backends, the localization pipeline, ranking,
  batcher, localizer, offline and distributed inference (imports ``base``);
- :mod:`modloc.engine.service`: the gRPC server and client (imports ``runtime`` and
  ``base``).

Nothing here imports ``modloc.training`` or ``modloc.export``: a serving install needs no
training code, and torch only inside the torch backend.
"""
