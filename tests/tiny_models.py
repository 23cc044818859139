"""Tiny random transformers Qwen2.5-VL models and their JAX twins, for parity tests."""
from __future__ import annotations

import tempfile

import numpy as np
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from coma_jax.hf import load_pretrained
from coma_jax.model import Qwen25VL

IMAGE, VIDEO, V_START, V_END = 500, 501, 502, 503

# Two configs that differ in everything that can go wrong: GQA ratio, window size, head dims,
# tied vs untied head, full-attention block placement, tokens_per_second.
TINY_CONFIGS = {
    'tied_gqa2_win56': dict(
        text=dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                  rope_parameters=dict(rope_type='default', rope_theta=10000.0, mrope_section=[2, 3, 3])),
        vision=dict(depth=4, hidden_size=32, intermediate_size=44, num_heads=2, out_hidden_size=64,
                    window_size=56, fullatt_block_indexes=[1, 3], tokens_per_second=2),
        tie=True),
    'untied_gqa3_win112': dict(
        text=dict(vocab_size=520, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-5,
                  rope_parameters=dict(rope_type='default', rope_theta=1000000.0, mrope_section=[2, 3, 3])),
        vision=dict(depth=3, hidden_size=48, intermediate_size=68, num_heads=3, out_hidden_size=96,
                    window_size=112, fullatt_block_indexes=[2], tokens_per_second=4),
        tie=False),
}


def hf_config(name: str) -> Qwen2_5_VLConfig:
  spec = TINY_CONFIGS[name]
  vision = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, **spec['vision'])
  return Qwen2_5_VLConfig(text_config=dict(spec['text'], bos_token_id=None, eos_token_id=None),
                          vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                          vision_start_token_id=V_START, vision_end_token_id=V_END,
                          tie_word_embeddings=spec['tie'])


def torch_model(name: str, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
  """A random fp32 model at realistic activation scales (unit-variance projections), with random
  norms and biases, so that details such as the merger's exact GELU move the outputs."""
  torch.manual_seed(seed)
  model = Qwen2_5_VLForConditionalGeneration(hf_config(name)).eval().float()
  model.config._attn_implementation = 'eager'
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if p.ndim == 1 and 'norm' in pname.split('.')[-2] or pname.endswith('ln_q.weight'):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif p.ndim == 1:  # biases
        p.copy_(0.1 * torch.randn_like(p))
      elif 'embed_tokens' in pname:  # also the tied head: keep logits O(1)
        p.copy_(0.1 * torch.randn_like(p))
      else:  # (out, in, ...) weights: unit gain
        p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
  return model


def jax_twin(tm: Qwen2_5_VLForConditionalGeneration, **model_kwargs) -> Qwen25VL:
  """Our model with the torch model's weights: transformers saves, our loader reads."""
  with tempfile.TemporaryDirectory() as tmp:
    tm.save_pretrained(tmp)
    return load_pretrained(tmp, **model_kwargs)
