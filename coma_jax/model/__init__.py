"""Flax NNX Qwen2.5-VL on a static-shape input contract."""
from coma_jax.model.config import ModelConfig, TextConfig, VisionConfig
from coma_jax.model.inputs import ModelInputs, build_model_inputs
from coma_jax.model.qwen2_5_vl import Qwen25VL, forward, vision_features
from coma_jax.model.rope_index import get_rope_index

__all__ = ['ModelConfig', 'TextConfig', 'VisionConfig', 'ModelInputs', 'build_model_inputs', 'Qwen25VL',
           'forward', 'vision_features', 'get_rope_index']
