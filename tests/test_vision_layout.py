"""The padded window layout against transformers' window index, and its error messages."""
import numpy as np
import pytest
import torch
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from coma_jax.model.config import VisionConfig
from coma_jax.model.vision_layout import build_vision_layout

GRIDS = [(1, 10, 14), (1, 6, 8), (2, 6, 6), (1, 16, 16), (1, 2, 2)]


def config(window_size):
  return VisionConfig(depth=2, hidden_size=32, intermediate_size=8, num_heads=2, out_hidden_size=8,
                      window_size=window_size)


@pytest.mark.parametrize('window_size', [56, 112])
def test_window_order_and_segments_match_transformers(window_size):
  cfg = config(window_size)
  layout = build_vision_layout(GRIDS, cfg)
  grid = torch.tensor(GRIDS)
  ref_index, ref_cu = get_vision_window_index(grid, 2, window_size, 14)
  index = layout.window_index.reshape(-1)
  np.testing.assert_array_equal(index[index >= 0], ref_index.numpy())
  # Windows: same sizes in the same order (our slots are padded to a fixed window).
  seg = layout.window_segment_ids.reshape(-1)
  sizes = [int((seg == s).sum()) for s in range(1, seg.max() + 1)]
  np.testing.assert_array_equal(np.cumsum([0] + sizes), ref_cu.numpy())
  assert all(s <= cfg.window_patches for s in sizes) and min(sizes) < cfg.window_patches
  # Full attention: one segment per frame, of h*w patches.
  full = layout.full_segment_ids.reshape(-1)
  frames = [int((full == s).sum()) for s in range(1, full.max() + 1)]
  np.testing.assert_array_equal(np.cumsum([0] + frames), get_vision_cu_seqlens(grid).numpy())
  # The inverse really inverts, and rotary ids are transformers'.
  flat_units = np.flatnonzero(layout.window_index.reshape(-1) >= 0)
  np.testing.assert_array_equal(layout.window_inverse[index[flat_units]], flat_units)
  np.testing.assert_array_equal(layout.rope_ids, get_vision_position_ids(grid, 2).numpy())


def test_budgets_pad_and_errors_name_the_limit():
  cfg = config(112)
  layout = build_vision_layout(GRIDS, cfg, patch_budget=2048, rows=4, row_len=1024)
  assert layout.rope_ids.shape == (2048, 2) and layout.window_index.shape == (4, 256)
  assert (layout.window_inverse[layout.num_patches // 4:] == -1).all()
  with pytest.raises(ValueError, match='patch budget 100'):
    build_vision_layout(GRIDS, cfg, patch_budget=100)
  with pytest.raises(ValueError, match='more than the row length 128'):
    build_vision_layout(GRIDS, cfg, row_len=128)
  with pytest.raises(ValueError, match='only 1 allowed'):
    build_vision_layout(GRIDS, cfg, rows=1, row_len=384)
  with pytest.raises(ValueError, match='multiple of the window size'):
    build_vision_layout(GRIDS, cfg, row_len=100)
  with pytest.raises(ValueError, match=r'vision item 1: grid \(1, 5, 8\)'):
    build_vision_layout([(1, 4, 4), (1, 5, 8)], cfg)
