"""modloc export: checkpoints → ONNX artifact directories → TensorRT engines.

- :mod:`export.graph`: the trained model rewritten for inference (uint8 in, constants and
  BatchNorm folded, precision carried in the graph);
- :mod:`export.onnx_export`: ONNX export with dynamic axes, checks, the parity gate;
- :mod:`export.precision`: fp16 / bf16 / INT8 variants, calibration, MAP@K gate;
- :mod:`export.evaluation`: segment MAP@K from any backend;
- :mod:`export.exporter`: ``modloc export``, step by step;
- :mod:`export.manifest`: the writer's side of :mod:`engine.artifacts`;
- :mod:`export.trt`: ``modloc build`` (TensorRT);
- :mod:`export.cli`: the verbs; :mod:`export.demo`: the demo's export stage.

Submodules are imported on use: ``export.cli`` must load without torch or TensorRT.
"""
