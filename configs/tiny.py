"""A tiny random Qwen2.5-VL with the real vocabulary and vision geometry: for the planner test,
benchmarks and CPU smoke runs. `--config configs/tiny.py:stage1`."""
from configs import base

TINY_HF_CONFIG = {
    'vocab_size': 151936, 'hidden_size': 256, 'intermediate_size': 512, 'num_hidden_layers': 4,
    'num_attention_heads': 4, 'num_key_value_heads': 2, 'rms_norm_eps': 1e-6, 'rope_theta': 1e6,
    'rope_scaling': {'type': 'mrope', 'mrope_section': [8, 12, 12]}, 'tie_word_embeddings': True,
    'vision_config': {'depth': 4, 'hidden_size': 128, 'intermediate_size': 256, 'num_heads': 4,
                      'out_hidden_size': 256, 'window_size': 112, 'fullatt_block_indexes': [1, 3]},
}


def get_config(variant: str = 'stage1'):
  c = base.get_config(variant)
  c.model.hf_dict = TINY_HF_CONFIG
  c.model.dtype = 'float32'
  c.model.frozen_dtype = 'float32'
  c.data.global_batch = 8
  c.data.min_pixels, c.data.max_pixels = 28 * 28 * 16, 28 * 28 * 64
  c.data.buckets = ((256, 256, 128),)
  c.stage1.micro_batches = 2
  c.optim.total_steps = 10
  return c
