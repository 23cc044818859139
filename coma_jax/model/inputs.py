"""The model's static-shape input contract, and its host-side (NumPy) builder.

Everything with a data-dependent shape or value (positions, window order, segment ids, where the
vision tokens go) is computed here, so the jitted forward only sees fixed-shape arrays.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import struct

from coma_jax.model.config import ModelConfig
from coma_jax.model.rope_index import get_rope_index
from coma_jax.model.vision_layout import build_vision_layout


@struct.dataclass
class ModelInputs:
  """One batch. B rows of L tokens; N raster patches (the patch budget); R vision rows of S slots.

  Text:
    input_ids (B, L) int32; token_valid (B, L) bool; positions (3, B, L) int32 M-RoPE (t, h, w);
    vision_token_index (B, L) int32: which raster merged vision token fills the position, -1 = text.
  Vision (all None for a text-only batch):
    pixel_patches (N, C*T*P*P) float, raster order; vision_rope_ids (N, 2) int32 (h, w);
    window_index (R, S/u) int32 and window_inverse (N/u,) int32 (u = merge^2, -1 = empty);
    window_segment_ids, full_segment_ids (R, S) int32 (0 = empty slot).
  """
  input_ids: jax.Array
  token_valid: jax.Array
  positions: jax.Array
  vision_token_index: jax.Array
  pixel_patches: jax.Array | None = None
  vision_rope_ids: jax.Array | None = None
  window_index: jax.Array | None = None
  window_inverse: jax.Array | None = None
  window_segment_ids: jax.Array | None = None
  full_segment_ids: jax.Array | None = None

  @property
  def has_vision(self) -> bool:
    return self.pixel_patches is not None


def vision_token_index(input_ids: np.ndarray, valid: np.ndarray, *, image_token_id: int,
                       video_token_id: int, num_image_units: int, num_video_units: int) -> np.ndarray:
  """Image placeholders take image units in order (row-major over the batch), videos likewise,
  video units following all image units in the raster vision sequence."""
  index = np.full(input_ids.shape, -1, np.int32)
  for token, offset, count, kind in ((image_token_id, 0, num_image_units, 'image'),
                                     (video_token_id, num_image_units, num_video_units, 'video')):
    where = (input_ids == token) & valid
    n = int(where.sum())
    if n != count:
      raise ValueError(f'{n} {kind} placeholder tokens in input_ids, but the {kind} grids give {count} tokens')
    index[where] = offset + np.arange(n, dtype=np.int32)
  return index


def build_model_inputs(cfg: ModelConfig, input_ids, attention_mask=None, *,
                       pixel_values=None, image_grid_thw=None,
                       pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None,
                       seq_len: int | None = None, patch_budget: int | None = None,
                       vision_rows: int | None = None, vision_row_len: int | None = None) -> ModelInputs:
  """Converts processor-style NumPy arrays into `ModelInputs`, padded to the given budgets.

  `seq_len` right-pads the token axis; `patch_budget`, `vision_rows` and `vision_row_len` fix the
  vision shapes. Left unset, each is the tightest fit for this batch.
  """
  input_ids = np.asarray(input_ids, np.int64)
  valid = np.ones(input_ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
  if input_ids.ndim != 2 or valid.shape != input_ids.shape:
    raise ValueError(f'input_ids {input_ids.shape} and attention_mask {valid.shape} must both be (batch, length)')
  image_grids = [] if image_grid_thw is None else [tuple(g) for g in np.asarray(image_grid_thw).tolist()]
  video_grids = [] if video_grid_thw is None else [tuple(g) for g in np.asarray(video_grid_thw).tolist()]
  u = cfg.vision.merge_unit

  positions = get_rope_index(
      input_ids, valid, image_grid_thw=image_grids, video_grid_thw=video_grids,
      second_per_grid_ts=None if second_per_grid_ts is None else np.asarray(second_per_grid_ts).tolist(),
      image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
      spatial_merge_size=cfg.vision.spatial_merge_size, tokens_per_second=cfg.vision.tokens_per_second)
  token_index = vision_token_index(
      input_ids, valid, image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
      num_image_units=sum(t * h * w for t, h, w in image_grids) // u,
      num_video_units=sum(t * h * w for t, h, w in video_grids) // u)

  batch, length = input_ids.shape
  if seq_len is not None:
    if seq_len < length:
      raise ValueError(f'seq_len {seq_len} is shorter than the batch length {length}')
    pad = seq_len - length
    input_ids = np.pad(input_ids, ((0, 0), (0, pad)))
    valid = np.pad(valid, ((0, 0), (0, pad)))
    positions = np.pad(positions, ((0, 0), (0, 0), (0, pad)))
    token_index = np.pad(token_index, ((0, 0), (0, pad)), constant_values=-1)
  text = dict(input_ids=input_ids.astype(np.int32), token_valid=valid,
              positions=positions.astype(np.int32), vision_token_index=token_index)
  grids = image_grids + video_grids
  if not grids:
    return ModelInputs(**text)

  patches = np.concatenate([np.asarray(p, np.float32) for p in (pixel_values, pixel_values_videos)
                            if p is not None], axis=0)
  return ModelInputs(**text, **vision_arrays(cfg, patches, grids, patch_budget=patch_budget,
                                              rows=vision_rows, row_len=vision_row_len))


def vision_arrays(cfg: ModelConfig, patches: np.ndarray, grids: Sequence[Sequence[int]], *,
                  patch_budget: int | None = None, rows: int | None = None,
                  row_len: int | None = None) -> dict[str, np.ndarray]:
  """The vision fields of `ModelInputs` for raster patches of items with the given grids."""
  expected = sum(int(t) * int(h) * int(w) for t, h, w in grids)
  if patches.shape != (expected, cfg.vision.patch_dim):
    raise ValueError(f'pixel values have shape {patches.shape}, but the grids need '
                     f'({expected}, {cfg.vision.patch_dim})')
  layout = build_vision_layout(grids, cfg.vision, patch_budget=patch_budget, rows=rows, row_len=row_len)
  padded = np.zeros((layout.rope_ids.shape[0], patches.shape[1]), np.float32)
  padded[:expected] = patches
  return dict(pixel_patches=padded, vision_rope_ids=layout.rope_ids, window_index=layout.window_index,
              window_inverse=layout.window_inverse, window_segment_ids=layout.window_segment_ids,
              full_segment_ids=layout.full_segment_ids)
