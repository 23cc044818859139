"""Host-side (NumPy) layout of vision patches for the static-shape vision tower.

Patches arrive in the processor's raster order: item by item, frame by frame, merge unit by
merge unit (m*m consecutive patches form one merge unit). The tower reorders merge units into
attention windows. Windows at the right and bottom edges are partial, so every window gets a
fixed slot of `window_patches` patches, padded and masked. Frames are packed into `rows` of
`row_len` slots (whole frames only), so that full attention is block-diagonal per frame inside
a row and window attention is a reshape of the row into windows.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from coma_jax.model.config import VisionConfig


@dataclasses.dataclass(frozen=True)
class VisionLayout:
  """Index arrays for the vision part of the model's input contract (see the README)."""
  rope_ids: np.ndarray           # (N, 2) int32: (h, w) rotary id of each raster patch
  window_index: np.ndarray       # (R, S/u) int32: raster merge unit in each slot unit, -1 = empty
  window_inverse: np.ndarray     # (N/u,) int32: flat slot unit of each raster merge unit, -1 = padding
  window_segment_ids: np.ndarray  # (R, S) int32: window id of each slot, 0 = empty
  full_segment_ids: np.ndarray   # (R, S) int32: frame id of each slot, 0 = empty
  num_patches: int               # real (unpadded) raster patches


def frame_windows(gh: int, gw: int, window: int) -> list[np.ndarray]:
  """Merge-unit indices (row-major within the frame) of each window, in window order."""
  ids = np.arange(gh * gw).reshape(gh, gw)
  return [ids[r:r + window, c:c + window].ravel()
          for r in range(0, gh, window) for c in range(0, gw, window)]


def slots_needed(grids: Sequence[Sequence[int]], cfg: VisionConfig) -> list[int]:
  """Slots (patches, padded to whole windows) each frame of each item takes, frame by frame."""
  m, win = cfg.spatial_merge_size, cfg.window_merged
  out = []
  for t, h, w in grids:
    out += [math.ceil(h // m / win) * math.ceil(w // m / win) * cfg.window_patches] * int(t)
  return out


def build_vision_layout(grids: Sequence[Sequence[int]], cfg: VisionConfig, *,
                        patch_budget: int | None = None, rows: int | None = None,
                        row_len: int | None = None) -> VisionLayout:
  """Lays out items of grid (t, h, w) (in patches) into the padded window layout.

  Defaults give the tightest layout: one row holding everything, no patch padding.
  """
  m, u, win, wp = cfg.spatial_merge_size, cfg.merge_unit, cfg.window_merged, cfg.window_patches
  grids = [tuple(int(x) for x in g) for g in grids]
  for k, (t, h, w) in enumerate(grids):
    if min(t, h, w) <= 0 or h % m or w % m:
      raise ValueError(f'vision item {k}: grid {(t, h, w)} must be positive with h, w multiples of {m}')
  num_patches = sum(t * h * w for t, h, w in grids)
  frame_slots = slots_needed(grids, cfg)
  if patch_budget is None:
    patch_budget = num_patches
  if patch_budget % u or patch_budget < num_patches:
    raise ValueError(f'patch budget {patch_budget} must be a multiple of {u} and hold the '
                     f'{num_patches} patches of this batch')
  if row_len is None:
    row_len = max(wp, sum(frame_slots))
  if row_len % wp:
    raise ValueError(f'vision row length {row_len} must be a multiple of the window size {wp} patches')

  # Pack whole frames into rows, in order.
  frame_row, frame_start, row, used = [], [], 0, 0
  for k, need in enumerate(frame_slots):
    if need > row_len:
      raise ValueError(f'a frame needs {need} vision slots, more than the row length {row_len}')
    if used + need > row_len:
      row, used = row + 1, 0
    frame_row.append(row)
    frame_start.append(used)
    used += need
  rows_needed = row + 1 if frame_slots else 1
  if rows is None:
    rows = rows_needed
  if rows < rows_needed:
    raise ValueError(f'the vision items need {rows_needed} rows of {row_len} slots; only {rows} allowed')

  su = row_len // u  # slot units per row
  window_index = np.full((rows, su), -1, np.int32)
  window_inverse = np.full((patch_budget // u,), -1, np.int32)
  window_seg = np.zeros((rows, row_len), np.int32)
  full_seg = np.zeros((rows, row_len), np.int32)
  rope_ids = np.zeros((patch_budget, 2), np.int32)

  frame, unit_offset, patch_offset = 0, 0, 0
  next_window_id = np.ones(rows, np.int32)
  for t, h, w in grids:
    gh, gw = h // m, w // m
    # Rotary ids of one frame, raster patch order (merge-unit major, as the processor emits).
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
    block = lambda a: a.reshape(gh, m, gw, m).transpose(0, 2, 1, 3).ravel()
    frame_ids = np.stack([block(hh), block(ww)], axis=-1)
    for _ in range(t):
      r, start = frame_row[frame], frame_start[frame]
      rope_ids[patch_offset:patch_offset + h * w] = frame_ids
      for win_units in frame_windows(gh, gw, win):
        slot_unit = r * su + start // u + np.arange(len(win_units))
        window_index[r, start // u + np.arange(len(win_units))] = unit_offset + win_units
        window_inverse[unit_offset + win_units] = slot_unit
        window_seg[r, start:start + len(win_units) * u] = next_window_id[r]
        next_window_id[r] += 1
        start += wp
      full_seg[r, frame_start[frame]:frame_start[frame] + frame_slots[frame]] = np.where(
          window_seg[r, frame_start[frame]:frame_start[frame] + frame_slots[frame]] > 0, frame + 1, 0)
      frame += 1
      unit_offset += gh * gw
      patch_offset += h * w
  return VisionLayout(rope_ids=rope_ids, window_index=window_index, window_inverse=window_inverse,
                      window_segment_ids=window_seg, full_segment_ids=full_seg, num_patches=num_patches)
