"""Host-side (NumPy) 3-D M-RoPE position ids for Qwen2.5-VL, `get_rope_index`.

Text tokens take consecutive positions on all three axes. A vision block of merged grid
(t, h, w) starting at position s gets (s + floor(i_t * interval), s + i_h, s + i_w), where
interval = tokens_per_second * second_per_grid_t for videos and 1 for images.

Text after a vision block resumes at max(position so far) + 1, as the released Qwen2.5-VL code
does. transformers 5.24 instead resumes at s + max(h, w); the two differ only when a video's
temporal extent exceeds its spatial extent. `text_resume='transformers'` reproduces 5.24 and
exists to pin that deviation in a test.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

TEXT_RESUME_RULES = ('released', 'transformers')


def get_rope_index(input_ids: np.ndarray, attention_mask: np.ndarray | None, *,
                   image_grid_thw: Sequence[Sequence[int]] | None = None,
                   video_grid_thw: Sequence[Sequence[int]] | None = None,
                   second_per_grid_ts: Sequence[float] | None = None,
                   image_token_id: int, video_token_id: int, spatial_merge_size: int,
                   tokens_per_second: float, text_resume: str = 'released') -> np.ndarray:
  """Returns positions (3, B, L) int32; padding positions are 0.

  Images and videos are consumed in order of appearance over the batch, row by row, as the
  processor lays them out. A vision block must be exactly t*h*w/merge^2 placeholder tokens.
  """
  if text_resume not in TEXT_RESUME_RULES:
    raise ValueError(f'text_resume must be one of {TEXT_RESUME_RULES}, got {text_resume!r}')
  input_ids = np.asarray(input_ids)
  batch, length = input_ids.shape
  valid = np.ones_like(input_ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
  images = [tuple(int(x) for x in g) for g in (image_grid_thw if image_grid_thw is not None else [])]
  videos = [tuple(int(x) for x in g) for g in (video_grid_thw if video_grid_thw is not None else [])]
  seconds = list(second_per_grid_ts) if second_per_grid_ts is not None else [1.0] * len(videos)
  if len(seconds) != len(videos):
    raise ValueError(f'second_per_grid_ts has {len(seconds)} entries for {len(videos)} videos')
  next_image = next_video = 0
  positions = np.zeros((3, batch, length), np.int64)
  m = spatial_merge_size

  for row in range(batch):
    idx = np.flatnonzero(valid[row])
    tokens = input_ids[row, idx]
    out = np.zeros((3, len(tokens)), np.int64)
    pos, i = 0, 0
    while i < len(tokens):
      tok = tokens[i]
      if tok not in (image_token_id, video_token_id):
        j = i
        while j < len(tokens) and tokens[j] not in (image_token_id, video_token_id):
          j += 1
        out[:, i:j] = pos + np.arange(j - i)
        pos += j - i
        i = j
        continue
      is_video = tok == video_token_id
      kind = 'video' if is_video else 'image'
      grids = videos if is_video else images
      k = next_video if is_video else next_image
      if k >= len(grids):
        raise ValueError(f'row {row}: more {kind} blocks in input_ids than {kind} grids ({len(grids)})')
      t, h, w = grids[k]
      gh, gw = h // m, w // m
      n = t * gh * gw
      block = tokens[i:i + n]
      if len(block) != n or np.any(block != tok) or (i + n < len(tokens) and tokens[i + n] == tok):
        raise ValueError(f'row {row}: {kind} {k} with grid {(t, h, w)} needs exactly {n} consecutive '
                         f'placeholder tokens at valid token {i}')
      if is_video:
        interval = np.float32(tokens_per_second) * np.float32(seconds[k])
        next_video += 1
      else:
        interval = np.float32(1.0)
        next_image += 1
      tt = (np.arange(t, dtype=np.float32) * interval).astype(np.int64)
      grid_t, grid_h, grid_w = np.meshgrid(tt, np.arange(gh), np.arange(gw), indexing='ij')
      out[:, i:i + n] = pos + np.stack([grid_t.ravel(), grid_h.ravel(), grid_w.ravel()])
      if text_resume == 'released':
        pos = int(out[:, i:i + n].max()) + 1
      else:
        pos += max(gh, gw)
      i += n
    positions[:, row, idx] = out

  if next_image != len(images) or next_video != len(videos):
    raise ValueError(f'input_ids hold {next_image} image and {next_video} video blocks, but '
                     f'{len(images)} image and {len(videos)} video grids were given')
  return positions.astype(np.int32)
