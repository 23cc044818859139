"""Tiny stage-2 pair batches in the tiny test models' vocabulary."""
from __future__ import annotations

import numpy as np

from coma_jax.data.batching import Bucket
from coma_jax.data.step_batches import BatchSpec, step_batch
from coma_jax.data.image import ImageSettings, ResizedImage
from coma_jax.data.sequences import IGNORE, ROLE_COMPRESSION, ROLE_PREFIX, Example
from tests.tiny_models import IMAGE, V_END, V_START

K = 4
COMPRESSION_IDS = list(range(504, 504 + K))


def side(rng, name, image: bool, text_len: int) -> Example:
  images, grids, prefix = [], [], []
  if image:
    h, w = [(8, 8), (6, 8), (4, 4)][int(rng.integers(0, 3))]
    img = ResizedImage(rng.integers(0, 256, (h * 14, w * 14, 3)).astype(np.uint8), ImageSettings())
    images, grids = [img], [img.grid]
    prefix = [V_START] + [IMAGE] * (h * w // 4) + [V_END]
  prefix += list(rng.integers(1, 400, text_len))
  tokens = np.array(prefix + COMPRESSION_IDS, np.int32)
  roles = np.array([ROLE_PREFIX] * len(prefix) + [ROLE_COMPRESSION] * K, np.int8)
  return Example(name, tokens, roles, np.full(len(tokens), IGNORE, np.int32), images, grids)


def pair_batch(cfg, rows=8, seed=0, negatives=False, bucket=Bucket(48, 128, 0), invalid=(), images=True):
  rng = np.random.default_rng(seed)
  names = ('query', 'positive', 'negative') if negatives else ('query', 'positive')
  sides = {n: [None if (i in invalid and n != 'query') else side(rng, f'{n}{i}', image=images and (i + len(n)) % 2 == 0,
                                                                text_len=int(rng.integers(3, 12))) for i in range(rows)]
           for n in names}
  return step_batch(BatchSpec(cfg, [bucket], 1, K, sides=names), by_example(sides), range(rows))[0]


def by_example(sides: dict) -> list[dict]:
  """{side: [example per row]} -> [{side: example} per example], as the loaders' workers give them."""
  return [dict(zip(sides, row)) for row in zip(*sides.values())]
