"""A tiny random Qwen2.5-VL (hf_configs/qwen2_5_vl_tiny.json: the real vocabulary and vision
geometry, toy widths) for CPU smoke runs and the planner test:

  python -m coma_jax.data.demo --out DATA --size smoke
  python -m coma_jax.train --config configs/tiny.py:stage1 --config.data.data_dir=DATA --workdir RUN1
  python -m coma_jax.train --config configs/tiny.py:stage2 --config.data.data_dir=DATA \
      --config.init_from=RUN1 --workdir RUN2
"""
import os

from configs import base


def get_config(variant: str = 'stage1'):
  c = base.get_config(variant)
  c.model.init = 'random'
  c.model.hf_config = os.path.join(os.path.dirname(__file__), '..', 'coma_jax', 'model', 'hf_configs',
                                   'qwen2_5_vl_tiny.json')
  c.model.num_compression_tokens = 8
  c.model.dtype = 'float32'
  c.model.frozen_dtype = 'float32'
  c.data.global_batch = 8
  c.data.num_workers = 0
  c.data.min_pixels, c.data.max_pixels = 28 * 28 * 16, 28 * 28 * 64
  c.data.packing = True  # CPU smoke runs pack (the tests train through the packed path)
  c.train.steps = 10
  c.checkpoint.every = 5
  c.validation.every = 5
  c.validation.max_examples = 16
  if variant == 'stage1':
    # One image, two images (the demo's 112 px images: 64 patches each); 6 label slots cut the
    # longer dialogues (counted truncations).
    c.data.buckets = ((256, 64, 6), (256, 128, 6))
    # 8 rows (the tests' 8 fake devices); 64 vision slots: one image per row, 128: two images share one.
    c.data.packed_buckets = ((8, 256, 64, 6), (8, 256, 128, 6))  # 6 labels per row: some dialogues are cut
    c.stage1.micro_batches = 2
  else:
    c.data.buckets = ((128, 512, 0),)
    c.data.packed_buckets = ((8, 256, 512, 0),)
    c.data.block_size = 4
    c.stage2.chunks = 2
    c.stage2.require_init_from = False  # may start from random weights (smoke runs)
  return c
