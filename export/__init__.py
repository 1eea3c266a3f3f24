"""modloc export: checkpoints → ONNX artifact directories → TensorRT engines.

- :mod:`modloc.export.graph`: the trained model rewritten for inference (uint8 in, constants and
  BatchNorm folded, precision carried in the graph);
- :mod:`modloc.export.onnx_export`: ONNX export with dynamic axes, checks, the parity gate;
- :mod:`modloc.export.precision`: fp16 / bf16 / INT8 variants, calibration;
- :mod:`modloc.export.gate`: the quality gate every variant must pass against fp32;
- :mod:`modloc.export.validation`: segment MAP@K from any backend;
- :mod:`modloc.export.exporter`: ``modloc export``, step by step;
- :mod:`modloc.export.manifest`: the writer's side of :mod:`modloc.engine.runtime.artifacts`;
- :mod:`modloc.export.trt`: ``modloc build`` (TensorRT);
- :mod:`modloc.cli.export`: the verbs; :mod:`modloc.demo.export_stage`: the demo's export stage.

Submodules are imported on use: ``modloc.cli.export`` must load without torch or TensorRT.
"""
