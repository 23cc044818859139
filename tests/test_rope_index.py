"""Our NumPy get_rope_index against transformers', and the pinned long-video deviation."""
import numpy as np
import torch

from coma_jax.model import ModelConfig, get_rope_index
from tests.parity_batch import _vision_tokens, build_rows, mixed_batch
from tests.tiny_models import IMAGE, VIDEO, torch_model


def ours(cfg, batch, **kw):
  return get_rope_index(
      batch['input_ids'], batch['attention_mask'], image_grid_thw=batch.get('image_grid_thw'),
      video_grid_thw=batch.get('video_grid_thw'), second_per_grid_ts=batch.get('second_per_grid_ts'),
      image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
      spatial_merge_size=cfg.vision.spatial_merge_size, tokens_per_second=cfg.vision.tokens_per_second, **kw)


def theirs(tm, batch):
  args = {k: torch.as_tensor(batch[k]) for k in ('input_ids', 'attention_mask', 'image_grid_thw',
                                                 'video_grid_thw', 'second_per_grid_ts', 'mm_token_type_ids')
          if batch.get(k) is not None}
  pos, _ = tm.model.get_rope_index(**args)
  return pos.numpy()


def test_equals_transformers_on_the_mixed_batch():
  for name in ('tied_gqa2_win56', 'untied_gqa3_win112'):
    tm = torch_model(name)
    cfg = ModelConfig.from_hf_dict(tm.config.to_dict())
    batch = mixed_batch()
    valid = batch['attention_mask'].astype(bool)
    mine, ref = ours(cfg, batch), theirs(tm, batch)
    np.testing.assert_array_equal(mine[:, valid], ref[:, valid])
    assert (mine[:, ~valid] == 0).all()


def long_video_batch(second_per_grid_t):
  video = (8, 4, 4)  # 8 frames, 2x2 merged: the temporal extent exceeds the spatial one
  ids, mask = build_rows([[7, 8] + _vision_tokens(VIDEO, video) + [9, 10, 11]], ['right'])
  return dict(input_ids=ids, attention_mask=mask, video_grid_thw=np.array([video]),
              second_per_grid_ts=np.array([second_per_grid_t], np.float32),
              mm_token_type_ids=np.where(ids == VIDEO, 2, np.where(ids == IMAGE, 1, 0)))


def test_text_after_a_long_video_resumes_at_max_plus_one():
  """Released Qwen2.5-VL: text after a video starts at max(position) + 1. transformers 5.24
  starts it at start + max(h, w) instead; we follow the released model, on purpose."""
  tm = torch_model('tied_gqa2_win56')  # tokens_per_second = 2
  cfg = ModelConfig.from_hf_dict(tm.config.to_dict())
  batch = long_video_batch(1.0)
  mine, ref = ours(cfg, batch), theirs(tm, batch)
  start = 3  # two text tokens, then <|vision_start|> at position 2
  video = slice(start, start + 8 * 4)
  np.testing.assert_array_equal(mine[:, 0, :video.stop], ref[:, 0, :video.stop])  # identical up to the video
  assert mine[:, 0, video].max() == start + 7 * 2  # last frame: 7 * tokens_per_second * 1.0
  after = mine[:, 0, video.stop:]
  np.testing.assert_array_equal(after, np.broadcast_to(start + 15 + np.arange(4), (3, 4)))
  # transformers 5.24 resumes at start + max(h, w) = start + 2: the documented deviation.
  np.testing.assert_array_equal(ref[:, 0, video.stop:], np.broadcast_to(start + 2 + np.arange(4), (3, 4)))
  # And the 5.24 rule, when asked for, reproduces transformers exactly.
  np.testing.assert_array_equal(ours(cfg, batch, text_resume='transformers'), ref)


def test_fractional_seconds_per_grid_truncate_like_torch():
  tm = torch_model('untied_gqa3_win112')  # tokens_per_second = 4
  cfg = ModelConfig.from_hf_dict(tm.config.to_dict())
  for seconds in (0.3, 1 / 3, 0.49):
    batch = long_video_batch(seconds)
    np.testing.assert_array_equal(ours(cfg, batch, text_resume='transformers'), theirs(tm, batch))


def test_mismatched_placeholders_are_named():
  tm = torch_model('tied_gqa2_win56')
  cfg = ModelConfig.from_hf_dict(tm.config.to_dict())
  batch = mixed_batch()
  import pytest
  with pytest.raises(ValueError, match='image 3 with grid'):
    ours(cfg, dict(batch, image_grid_thw=np.array([[1, 10, 14], [1, 6, 8], [1, 4, 4], [1, 12, 12]])))
  with pytest.raises(ValueError, match='more image blocks'):
    ours(cfg, dict(batch, image_grid_thw=batch['image_grid_thw'][:3]))
