"""The transformer trunk and its heads; parallelism is applied from plmscale.parallel."""

from plmscale.model.electra import Electra, build_model
from plmscale.model.layers import LayerSpec, LocalLayers
from plmscale.model.transformer import Capture, TransformerLM

__all__ = ["Capture", "Electra", "LayerSpec", "LocalLayers", "TransformerLM", "build_model"]
