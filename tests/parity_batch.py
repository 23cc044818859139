"""The mixed batch of the parity tests, built the way a Qwen2.5-VL processor lays it out."""
from __future__ import annotations

import numpy as np

from tests.tiny_models import IMAGE, V_END, V_START, VIDEO

PATCH_DIM = 3 * 2 * 14 * 14


def _vision_tokens(token: int, grid) -> list[int]:
  t, h, w = grid
  return [V_START] + [token] * (t * h * w // 4) + [V_END]


def build_rows(rows, pad_side, pad_id=0):
  """rows: list of token lists -> input_ids, attention_mask padded on `pad_side[i]`."""
  length = max(len(r) for r in rows)
  ids = np.full((len(rows), length), pad_id, np.int64)
  mask = np.zeros((len(rows), length), np.int64)
  for i, (r, side) in enumerate(zip(rows, pad_side)):
    sl = slice(0, len(r)) if side == 'right' else slice(length - len(r), length)
    ids[i, sl], mask[i, sl] = r, 1
  return ids, mask


def mixed_batch(seed: int = 0, second_per_grid_t: float = 0.5):
  """An image with text; two images in one sample (left-padded); a short video; text only
  (left-padded); text + image (right-padded). Image grids exceed, and are not multiples of,
  both tiny configs' windows."""
  rng = np.random.default_rng(seed)
  text = lambda n: list(rng.integers(1, 400, n))
  img_a, img_b, img_c, img_d = (1, 10, 14), (1, 6, 8), (1, 4, 4), (1, 12, 10)
  video = (2, 6, 6)
  rows = [
      text(5) + _vision_tokens(IMAGE, img_a) + text(7),
      text(3) + _vision_tokens(IMAGE, img_b) + text(4) + _vision_tokens(IMAGE, img_c) + text(2),
      text(2) + _vision_tokens(VIDEO, video) + text(6),
      text(9),
      text(4) + _vision_tokens(IMAGE, img_d) + text(3),
  ]
  ids, mask = build_rows(rows, ['right', 'left', 'right', 'left', 'right'])
  image_grids = np.array([img_a, img_b, img_c, img_d])
  video_grids = np.array([video])
  n_img = int(np.prod(image_grids, axis=1).sum())
  n_vid = int(np.prod(video_grids, axis=1).sum())
  mm_types = np.where(ids == IMAGE, 1, np.where(ids == VIDEO, 2, 0))
  pixels = rng.normal(size=(n_img, PATCH_DIM)).astype(np.float32)
  # Image c is nearly flat at the CLIP mean (normalised ~0), as blank regions of real photos are:
  # its activations are small enough that the vision norms' eps (1e-6) matters.
  c_start = int(np.prod(img_a)) + int(np.prod(img_b))
  pixels[c_start:c_start + int(np.prod(img_c))] *= 1e-3
  return dict(
      input_ids=ids, attention_mask=mask,
      pixel_values=pixels,
      image_grid_thw=image_grids,
      pixel_values_videos=rng.normal(size=(n_vid, PATCH_DIM)).astype(np.float32),
      video_grid_thw=video_grids,
      second_per_grid_ts=np.array([second_per_grid_t], np.float32),
      mm_token_type_ids=mm_types)
