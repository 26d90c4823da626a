"""Backbones by timm/torchvision name, feature taps and checkpoint I/O."""
from kdforge.models.checkpoint import (backbone_state_dict, load_model_from_run, load_state_dict_checked,
                                       load_weights_file, read_weights_file)
from kdforge.models.factory import TINY_MODELS, create_model, feature_dim, model_spec
from kdforge.models.taps import FeatureTaps, block_outputs, cls_attention, pooled_features, token_features

__all__ = ["create_model", "feature_dim", "model_spec", "TINY_MODELS", "FeatureTaps", "pooled_features",
           "token_features", "block_outputs", "cls_attention", "load_state_dict_checked", "load_weights_file",
           "read_weights_file", "load_model_from_run", "backbone_state_dict"]
