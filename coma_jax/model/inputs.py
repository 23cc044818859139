"""The model's static-shape input contract, and its host-side (NumPy) builder.

Everything with a data-dependent shape or value (positions, window order, segment ids, where the
vision tokens go) is computed here, so the jitted forward only sees fixed-shape arrays.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from coma_jax.model.config import ModelConfig
from coma_jax.model.rope_index import get_rope_index
from coma_jax.model.vision_layout import build_vision_layout, slots_needed


# The batch (or vision-group) axis of each batch array: `positions` is (3, B, L); all others lead
# with it. Used to shard batches and to split them into micro-batches or GradCache chunks.
BATCH_AXIS = {'positions': 1}


@struct.dataclass
class ModelInputs:
  """One batch. B rows of L tokens. The rows form G equal vision groups (row b is in group
  b // (B/G)); each group has N raster patches (the patch budget) laid out in R rows of S slots.

  Text:
    input_ids (B, L) int32; token_valid (B, L) bool; positions (3, B, L) int32 M-RoPE (t, h, w);
    vision_token_index (B, L) int32: which merged vision token of the row's group (raster
    order) fills the position, -1 = text.
  Vision (all None for a text-only batch):
    pixel_patches (G, N, C*T*P*P) float, raster order; vision_rope_ids (G, N, 2) int32 (h, w);
    window_index (G, R, S/u) and window_inverse (G, N/u) int32 (u = merge^2, -1 = empty);
    window_segment_ids, full_segment_ids (G, R, S) int32 (0 = empty slot).
  Packing: segment_ids (B, L) int32 numbers the sequences of a packed row 1, 2, ... (0 = padding);
    None = one sequence per row (the valid tokens).
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
  segment_ids: jax.Array | None = None

  @property
  def has_vision(self) -> bool:
    return self.pixel_patches is not None

  @property
  def segments(self) -> jax.Array:
    """(B, L) int32: the attention segment of each token (equal ids see each other; 0 = padding)."""
    return self.token_valid.astype(jnp.int32) if self.segment_ids is None else self.segment_ids


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


def _rows_of_items(input_ids, valid, token, grids, u) -> list[int]:
  """The batch row of each item (in order), from the placeholder counts per row."""
  per_row = ((input_ids == token) & valid).sum(axis=1)
  rows, row, used = [], 0, 0
  for t, h, w in grids:
    while row < len(per_row) and used >= per_row[row]:
      row, used = row + 1, 0
    rows.append(row)
    used += t * h * w // u
  return rows


def build_model_inputs(cfg: ModelConfig, input_ids, attention_mask=None, *,
                       pixel_values=None, image_grid_thw=None,
                       pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None,
                       seq_len: int | None = None, vision_groups: int = 1,
                       patch_budget: int | None = None, vision_rows: int | None = None,
                       vision_row_len: int | None = None) -> ModelInputs:
  """Converts processor-style NumPy arrays into `ModelInputs`, padded to the given budgets.

  `seq_len` right-pads the token axis. The batch rows split into `vision_groups` equal groups,
  each with its own vision arrays of `patch_budget` patches in `vision_rows` rows of
  `vision_row_len` slots (so the vision tower shards with the batch). Left unset, each budget
  is the tightest common fit for this batch.
  """
  input_ids = np.asarray(input_ids, np.int64)
  valid = np.ones(input_ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
  if input_ids.ndim != 2 or valid.shape != input_ids.shape:
    raise ValueError(f'input_ids {input_ids.shape} and attention_mask {valid.shape} must both be (batch, length)')
  batch, length = input_ids.shape
  if vision_groups < 1 or batch % vision_groups:
    raise ValueError(f'vision_groups {vision_groups} must divide the batch size {batch}')
  image_grids = [] if image_grid_thw is None else [tuple(g) for g in np.asarray(image_grid_thw).tolist()]
  video_grids = [] if video_grid_thw is None else [tuple(g) for g in np.asarray(video_grid_thw).tolist()]
  u = cfg.vision.merge_unit

  positions = get_rope_index(
      input_ids, valid, image_grid_thw=image_grids, video_grid_thw=video_grids,
      second_per_grid_ts=None if second_per_grid_ts is None else np.asarray(second_per_grid_ts).tolist(),
      image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
      spatial_merge_size=cfg.vision.spatial_merge_size, tokens_per_second=cfg.vision.tokens_per_second)
  n_image_units = sum(t * h * w for t, h, w in image_grids) // u
  token_index = vision_token_index(
      input_ids, valid, image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
      num_image_units=n_image_units, num_video_units=sum(t * h * w for t, h, w in video_grids) // u)

  grids = image_grids + video_grids
  vision = {}
  if grids:
    patches = np.concatenate([np.asarray(p, np.float32) for p in (pixel_values, pixel_values_videos)
                              if p is not None], axis=0)
    expected = sum(t * h * w for t, h, w in grids)
    if patches.shape != (expected, cfg.vision.patch_dim):
      raise ValueError(f'pixel values have shape {patches.shape}, but the grids need '
                       f'({expected}, {cfg.vision.patch_dim})')
    # Regroup: each group's items (its images, then its videos) with group-local unit indices.
    rows_per_group = batch // vision_groups
    item_rows = (_rows_of_items(input_ids, valid, cfg.image_token_id, image_grids, u)
                 + _rows_of_items(input_ids, valid, cfg.video_token_id, video_grids, u))
    item_units, start = [], 0
    for t, h, w in grids:
      item_units.append(np.arange(start, start + t * h * w // u))
      start += t * h * w // u
    unit_local = np.full(start, -1, np.int64)
    groups = []
    for g in range(vision_groups):
      items = [k for k, r in enumerate(item_rows) if r // rows_per_group == g]
      units = np.concatenate([item_units[k] for k in items]) if items else np.zeros(0, np.int64)
      unit_local[units] = np.arange(len(units))
      group_patches = patches.reshape(-1, u, patches.shape[1])[units].reshape(-1, patches.shape[1])
      groups.append((group_patches, [grids[k] for k in items]))
    token_index = np.where(token_index >= 0, unit_local[np.maximum(token_index, 0)], -1).astype(np.int32)
    vision = grouped_vision_arrays(cfg, groups, patch_budget=patch_budget, rows=vision_rows,
                                   row_len=vision_row_len)

  if seq_len is not None:
    if seq_len < length:
      raise ValueError(f'seq_len {seq_len} is shorter than the batch length {length}')
    pad = seq_len - length
    input_ids = np.pad(input_ids, ((0, 0), (0, pad)))
    valid = np.pad(valid, ((0, 0), (0, pad)))
    positions = np.pad(positions, ((0, 0), (0, 0), (0, pad)))
    token_index = np.pad(token_index, ((0, 0), (0, pad)), constant_values=-1)
  return ModelInputs(input_ids=input_ids.astype(np.int32), token_valid=valid,
                     positions=positions.astype(np.int32), vision_token_index=token_index, **vision)


def grouped_vision_arrays(cfg: ModelConfig, groups, *, patch_budget: int | None = None,
                          rows: int | None = None, row_len: int | None = None,
                          pixel_dtype=np.float32) -> dict[str, np.ndarray]:
  """The vision fields of `ModelInputs` (leading group axis) for [(raster patches, grids), ...].

  A group's patches may be one array or a list of items, each an (n, patch_dim) array or an
  object with `len()` and `write_patches(out)` (a resized image that patchifies itself into the
  batch buffer). Either way they are written once. Unset budgets take the tightest common fit.
  `pixel_dtype`: bfloat16 for a bf16 model (the patch embedding rounds to it anyway: the same
  result, half the host-to-device bytes and device memory).
  """
  vc, u = cfg.vision, cfg.vision.merge_unit
  pieces = [list(p) if isinstance(p, (list, tuple)) else [p] for p, _ in groups]
  sizes = [sum(len(x) for x in ps) for ps in pieces]
  if patch_budget is None:
    patch_budget = max(max(sizes), u)
  if row_len is None:
    row_len = max([vc.window_patches] + [sum(slots_needed(grids, vc)) for _, grids in groups])
  layouts = [build_vision_layout(grids, vc, patch_budget=patch_budget, rows=rows, row_len=row_len)
             for _, grids in groups]
  if rows is None:  # tightest common row count: pad every group's layout to it
    rows = max(layout.window_index.shape[0] for layout in layouts)
    layouts = [build_vision_layout(grids, vc, patch_budget=patch_budget, rows=rows, row_len=row_len)
               for _, grids in groups]
  pixels = np.zeros((len(groups), patch_budget, vc.patch_dim), pixel_dtype)
  for g, ((_, grids), ps, layout) in enumerate(zip(groups, pieces, layouts)):
    arrays = [x for x in ps if isinstance(x, np.ndarray)]
    if sizes[g] != layout.num_patches or any(x.shape[1:] != (vc.patch_dim,) for x in arrays):
      raise ValueError(f'vision group {g}: pixel values of {sizes[g]} patches x '
                       f'{[x.shape[1:] for x in arrays][:1]}, but its grids need ({layout.num_patches}, {vc.patch_dim})')
    start = 0
    for x in ps:
      if isinstance(x, np.ndarray):
        pixels[g, start:start + len(x)] = x
      else:
        x.write_patches(pixels[g, start:start + len(x)])
      start += len(x)
  stack = lambda name: np.stack([getattr(layout, name) for layout in layouts])
  return dict(pixel_patches=pixels, vision_rope_ids=stack('rope_ids'), window_index=stack('window_index'),
              window_inverse=stack('window_inverse'), window_segment_ids=stack('window_segment_ids'),
              full_segment_ids=stack('full_segment_ids'))


def build_grouped_inputs(cfg: ModelConfig, input_ids: np.ndarray, valid: np.ndarray, groups, *,
                         seq_len: int, patch_budget: int, vision_rows: int, vision_row_len: int,
                         pixel_dtype=np.float32, positions: np.ndarray | None = None,
                         segment_ids: np.ndarray | None = None) -> ModelInputs:
  """The training path: images already grouped, [(list of per-image patches, grids)] per vision
  group of consecutive rows, in row order. No processor-style flattening, one pixel copy.
  Packed rows pass their `positions` (M-RoPE restarting per sequence) and `segment_ids`."""
  batch, length = input_ids.shape
  rows_per_group = batch // len(groups)
  grids = [tuple(g) for _, gs in groups for g in gs]
  if positions is None:
    positions = get_rope_index(input_ids, valid, image_grid_thw=grids, image_token_id=cfg.image_token_id,
                               video_token_id=cfg.video_token_id, spatial_merge_size=cfg.vision.spatial_merge_size,
                               tokens_per_second=cfg.vision.tokens_per_second)
  is_image = ((input_ids == cfg.image_token_id) & valid).reshape(len(groups), -1)
  local = np.where(is_image, np.cumsum(is_image, axis=1) - 1, -1).reshape(batch, length).astype(np.int32)
  for g, (_, gs) in enumerate(groups):
    n = int(is_image[g].sum())
    if n != sum(t * h * w for t, h, w in gs) // cfg.vision.merge_unit:
      raise ValueError(f'vision group {g} (rows {g * rows_per_group}..{(g + 1) * rows_per_group - 1}): '
                       f'{n} image placeholders for grids {gs}')
  pad = ((0, 0), (0, seq_len - length))
  return ModelInputs(
      input_ids=np.pad(input_ids, pad).astype(np.int32), token_valid=np.pad(valid, pad),
      positions=np.pad(positions, ((0, 0),) + pad).astype(np.int32),
      vision_token_index=np.pad(local, pad, constant_values=-1),
      segment_ids=None if segment_ids is None else np.pad(segment_ids, pad).astype(np.int32),
      **grouped_vision_arrays(cfg, groups, patch_budget=patch_budget, rows=vision_rows, row_len=vision_row_len,
                              pixel_dtype=pixel_dtype))
