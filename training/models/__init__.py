"""Models of the MOD system: NeXtVLAD, the DBoF baseline and mixture trees (MixNeXtVLAD, MOD).

Every model's ``forward(features, num_frames)`` takes the uint8 batch and returns logits
(a :class:`TreeOutput` of per-node logits for trees); ``forward_input`` takes the float
model input and mask. Presets: :func:`create_model`, :func:`list_models`.
"""

from modloc.training.models.dbof import DBoFConfig, DBoFModel, MoEClassifier
from modloc.training.models.inputs import FeatureInput
from modloc.training.models.mod_tree import (
    GATE_INPUTS,
    GateInput,
    MixtureGate,
    MixtureNode,
    MODTree,
    MODTreeConfig,
    TreeOutput,
    gate_frames,
    internal_paths,
    leaf_paths,
    node_name,
    reference_gate_input,
    tower_paths,
    tree_gate_input,
)
from modloc.training.models.nextvlad import NeXtVLAD
from modloc.training.models.nextvlad_model import ContextGating, NeXtVLADConfig, NeXtVLADModel
from modloc.training.models.registry import (
    ModelInfo,
    build_model,
    count_parameters,
    create_model,
    list_models,
    model_config,
)

__all__ = [
    "GATE_INPUTS", "GateInput", "gate_frames", "reference_gate_input", "tree_gate_input",
    "ContextGating", "DBoFConfig", "DBoFModel", "FeatureInput", "MODTree", "MODTreeConfig",
    "MixtureGate", "MixtureNode", "MoEClassifier", "ModelInfo", "NeXtVLAD", "NeXtVLADConfig",
    "NeXtVLADModel", "TreeOutput", "build_model", "count_parameters", "create_model",
    "internal_paths", "leaf_paths", "list_models", "model_config", "node_name", "tower_paths",
]
