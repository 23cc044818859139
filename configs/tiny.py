"""A tiny random Qwen2.5-VL (hf_configs/qwen2_5_vl_tiny.json: the real vocabulary and vision
geometry, toy widths): for the planner test and CPU smoke runs. `--config configs/tiny.py:stage1`."""
import os

from configs import base


def get_config(variant: str = 'stage1'):
  c = base.get_config(variant)
  c.model.hf_config = os.path.join(os.path.dirname(__file__), '..', 'coma_jax', 'model', 'hf_configs',
                                   'qwen2_5_vl_tiny.json')
  c.model.dtype = 'float32'
  c.model.frozen_dtype = 'float32'
  c.data.global_batch = 8
  c.data.min_pixels, c.data.max_pixels = 28 * 28 * 16, 28 * 28 * 64
  c.data.buckets = ((256, 256, 128),)
  c.stage1.micro_batches = 2
  c.optim.total_steps = 10
  return c
