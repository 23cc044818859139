"""`make demo`: the whole method on the learnable demo data (`python -m coma_jax.data.demo --size full`),
trained from scratch on 2 CPU cores in minutes.

A tiny random model (hf_configs/qwen2_5_vl_demo.json: the real vocabulary and vision geometry,
hidden 128, 4 LLM and 2 vision layers) cannot learn through a frozen random vision tower and a
small adapter, so the demo trains every weight, in fp32, on 112 px images, with fixed step counts.

  python -m coma_jax.train --config configs/demo.py:stage1 --config.data.data_dir=DATA --workdir RUN1
  (configs/demo.py:stage0: the same step with the plain LM loss and no compression tokens; see get_config)
  python -m coma_jax.train --config configs/demo.py:stage2 --config.data.data_dir=DATA \
      --config.init_from=RUN1 --workdir RUN2
"""
import os

from configs import base

IMAGE_PIXELS = 112 * 112  # every demo image is resized to about 112 x 112: 64 patches, 16 tokens


def get_config(variant: str = 'stage1'):
  """stage1, stage2, or stage0: generative pre-training standing in for the instruction tuning a
  real Qwen2.5-VL has had (the demo model starts random): the stage-1 data and step with the plain
  LM loss on the answers, full causal attention and no compression tokens (K = 0). Its workdir is
  an init_from for stage 1 or stage 2, which add their own compression tokens."""
  if variant == 'stage0':
    c = get_config('stage1')
    c.model.num_compression_tokens = 0
    c.stage1.mask = 'causal'
    # 240 steps at 3e-4 left greedy decoding writing only <|im_end|> (no answer right, validation
    # loss 2.88); at 1e-3 37 % of answers and 70 % of caption tokens were right
    # (benchmarks/stage0_skills.py). Stage 0 is meant to make a model that sees.
    c.optim.learning_rate = 1e-3
    return c
  c = base.get_config(variant)
  c.model.init = 'random'
  c.model.hf_config = os.path.join(os.path.dirname(__file__), '..', 'coma_jax', 'model', 'hf_configs',
                                   'qwen2_5_vl_demo.json')
  c.model.num_compression_tokens = 8
  c.model.dtype = c.model.frozen_dtype = 'float32'
  c.model.remat = 'none'  # small activations; recomputation would only cost time
  c.adapter = dict(kind='none')  # no adapter: every weight trains
  c.trainable.full = True
  c.optim.warmup_ratio = 0.1
  c.data.global_batch = 32
  c.data.num_workers = 1
  c.data.min_pixels = c.data.max_pixels = IMAGE_PIXELS
  c.checkpoint.every = 100
  c.checkpoint.keep = 1
  # Not packed: at hidden 128 a longer row costs more in attention than packing saves. Packed
  # (the buckets below), the demo reached the same losses (to 3 decimals) and P@1 0.838 overall (0.849
  # unpacked) in 162 s + 492 s for the two stages, against 127 s + 416 s unpacked (same day; data
  # version 2, before the captions). With captions (and no label budget),
  # packed stage 0 ran 0.65 steps/s (rows of 512, 55 % padding).
  c.data.packing = False
  if variant == 'stage1':
    c.train.steps = 150
    c.optim.learning_rate = 3e-4  # 1e-3 fit stage 1 far better but left stage 2 worse (docs/demo.md)
    # One image, a caption (<= 40 label tokens) or up to three short answers. The LM head (151,936
    # rows) runs on 448 of the 32 x 40 label slots: a batch holds ~295 real labels (sd 57; 0.7 % of
    # batches hold more and take every slot). Every slot: 0.72 steps/s; 12 slots and no captions: 1.49.
    c.data.buckets = ((128, 64, 40),)
    c.stage1.label_budget = 448
    c.data.packed_buckets = ((8, 416, 256, 64), (8, 512, 256, 64), (10, 512, 256, 64))  # 4 examples per row
    c.stage1.micro_batches = 1
    c.validation.every = 100
    c.validation.max_examples = 256
  else:
    c.train.steps = 1100
    c.optim.learning_rate = 3e-4  # 5e-4 learned less; 1e-3 collapsed to ln(batch) in a prototype
    c.data.buckets = ((64, 64, 0),)
    c.data.packed_buckets = ((8, 320, 512, 0), (8, 384, 512, 0), (16, 320, 512, 0))  # both sides of 32 pairs
    # Two tasks per step (blocks of 16 at batch 32: blocks of 8 learned less); follows a batch override.
    c.data.block_size = c.data.get_ref('global_batch') // 2
    c.data.subset_caps = ''
    c.stage2.chunks = 1
    c.validation.every = 0  # the eval set is held out for `evaluate`; no best-by-eval selection
  return c
