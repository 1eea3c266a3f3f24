"""The base layer: YouTube-8M formats and data, with no model and no runtime.

TFRecord and ``SequenceExample`` IO (:mod:`~modloc.engine.base.io`), feature
(de)quantization (:mod:`~modloc.engine.base.features`), vocabularies and class spaces
(:mod:`~modloc.engine.base.vocab`), test-time 5-frame windows
(:mod:`~modloc.engine.base.windows`), metrics, submission files, scoring of prediction
files, synthetic data, file inspection. Imports nothing above it.
"""
