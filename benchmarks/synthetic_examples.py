"""Synthetic examples of mixed lengths for the step benchmarks (CPU and GPU): random token ids and
pixels in the shapes real data has. Stage 1: image + text + K compression tokens + a dialogue whose
last two thirds are supervised; stage 2: pairs of an image query (+ text) and a text positive."""
from __future__ import annotations

import numpy as np

COMPRESSION_IDS = list(range(151665, 151697))  # K = 32 after the base vocabulary
IMAGE_PAD, V_START, V_END = 151655, 151652, 151653
TEXT_IDS = 151643  # ordinary token ids are below this


def image(rng, size: int):
  """A random square image of `size` px (a multiple of 28) and its vision block of placeholders."""
  from coma_jax.data.image import ImageSettings, ResizedImage
  img = ResizedImage(rng.integers(0, 256, (size, size, 3)).astype(np.uint8), ImageSettings(max_pixels=2048 * 28 * 28))
  t, h, w = img.grid
  return img, [V_START] + [IMAGE_PAD] * (t * h * w // 4) + [V_END]


def mixed_examples(n: int, stage: int, *, sizes, dialogue=(24, 480), query_text=(8, 60), positive_text=(8, 120),
                   prefix_text=(8, 40), seed: int = 2) -> list:
  """Stage 1: [Example]; stage 2: [{'query': Example, 'positive': Example}]. Image sides draw a
  size from `sizes`; text lengths are uniform in the given (low, high) ranges."""
  from coma_jax.data.sequences import IGNORE, Example
  rng = np.random.default_rng(seed)
  text = lambda lo_hi: list(rng.integers(0, TEXT_IDS, int(rng.integers(lo_hi[0], lo_hi[1] + 1))))
  k = len(COMPRESSION_IDS)
  out = []
  for i in range(n):
    img, block = image(rng, int(rng.choice(sizes)))
    if stage == 1:
      prefix, turns = block + text(prefix_text), text(dialogue)
      tokens = np.array(prefix + COMPRESSION_IDS + turns, np.int32)
      roles = np.array([1] * len(prefix) + [2] * k + [3] * len(turns), np.int8)
      answer = np.arange(len(tokens)) >= len(prefix) + k + len(turns) // 3
      out.append(Example(f'm{i}', tokens, roles, np.where(answer, tokens, IGNORE).astype(np.int32), [img], [img.grid]))
      continue
    pair = {}
    for name, toks, images in (('query', block + text(query_text), [img]), ('positive', text(positive_text), [])):
      tokens = np.array(toks + COMPRESSION_IDS, np.int32)
      pair[name] = Example(f'{name}{i}', tokens, np.array([1] * len(toks) + [2] * k, np.int8),
                           np.full(len(tokens), IGNORE, np.int32), images, [im.grid for im in images])
    out.append(pair)
  return out
