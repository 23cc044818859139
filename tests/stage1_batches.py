"""Tiny stage-1 batches in the tiny test models' vocabulary (images are random uint8 pixels)."""
from __future__ import annotations

import numpy as np

from coma_jax.data.batching import Bucket, collate
from coma_jax.data.image import ImageSettings, ResizedImage
from coma_jax.data.sequences import IGNORE, ROLE_COMPRESSION, ROLE_DIALOGUE, ROLE_PREFIX, Example
from tests.tiny_models import IMAGE, V_END, V_START

K = 4
COMPRESSION_IDS = list(range(504, 504 + K))


def example(rng, name, grid_hw=(8, 8), prefix_text=3, dialogue=10, pixels=None) -> Example:
  h, w = grid_hw
  img = ResizedImage(pixels if pixels is not None else rng.integers(0, 256, (h * 14, w * 14, 3)).astype(np.uint8),
                     ImageSettings())
  prefix = [V_START] + [IMAGE] * (h * w // 4) + [V_END] + list(rng.integers(1, 400, prefix_text))
  dialog = list(rng.integers(1, 400, dialogue))
  tokens = np.array(prefix + COMPRESSION_IDS + dialog, np.int32)
  roles = np.array([ROLE_PREFIX] * len(prefix) + [ROLE_COMPRESSION] * K + [ROLE_DIALOGUE] * dialogue, np.int8)
  supervised = np.arange(len(tokens)) >= len(prefix) + K + dialogue // 3  # the later dialogue tokens
  return Example(name, tokens, roles, np.where(supervised, tokens, IGNORE).astype(np.int32), [img], [img.grid])


def batch(cfg, seed=0, rows=8, bucket=Bucket(64, 128, 16), examples=None, **kw):
  rng = np.random.default_rng(seed)
  examples = examples or [example(rng, f'e{i}', grid_hw=[(8, 8), (6, 8), (4, 4)][i % 3],
                                  dialogue=8 + 2 * (i % 4), **kw) for i in range(rows)]
  return collate(examples, cfg, bucket, 1, K), examples
