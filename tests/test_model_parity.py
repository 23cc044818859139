"""Numerical parity with transformers' Qwen2.5-VL (fp32, highest matmul precision)."""
import numpy as np
import pytest
import torch

from coma_jax.hf import hf_style_forward
from coma_jax.model import build_model_inputs, forward, vision_features
from coma_jax.model.inputs import grouped_vision_arrays
from coma_jax.model.vision_layout import slots_needed
from tests.parity_batch import mixed_batch
from tests.tiny_models import TINY_CONFIGS, jax_twin, torch_model

TOL = 1e-4


@pytest.fixture(scope='module', params=sorted(TINY_CONFIGS))
def pair(request):
  tm = torch_model(request.param)
  return tm, jax_twin(tm)


@pytest.fixture(scope='module')
def batch():
  return mixed_batch()


@pytest.fixture(scope='module')
def torch_logits(pair, batch):
  tm, _ = pair
  with torch.no_grad():
    return tm(**{k: torch.as_tensor(v) for k, v in batch.items()}).logits.numpy()


def test_vision_tower_pooler_output(pair, batch):
  """Images (and a video) whose grids exceed, and are not multiples of, the window."""
  tm, jm = pair
  pixels = np.concatenate([batch['pixel_values'], batch['pixel_values_videos']])
  grids = np.concatenate([batch['image_grid_thw'], batch['video_grid_thw']])
  with torch.no_grad():
    ref = tm.model.visual(torch.as_tensor(pixels), grid_thw=torch.as_tensor(grids)).pooler_output.numpy()
  text = build_model_inputs(jm.config, np.zeros((1, 1)))
  inputs = text.replace(**grouped_vision_arrays(jm.config, [(pixels, grids)]))
  ours = np.asarray(vision_features(jm, inputs))[0]
  assert ours.shape == ref.shape
  assert np.abs(ours - ref).max() <= TOL, np.abs(ours - ref).max()


def test_logits_on_the_mixed_batch(pair, batch, torch_logits):
  _, jm = pair
  ours = hf_style_forward(jm, **batch)
  valid = batch['attention_mask'].astype(bool)
  diff = np.abs(ours[valid] - torch_logits[valid]).max()
  assert diff <= TOL, diff
  assert np.abs(torch_logits[valid]).max() > 0.5  # the comparison is not between near-zeros


def test_padding_to_static_budgets_changes_nothing(pair, batch, torch_logits):
  """Longer rows, a larger patch budget and more vision rows only add masked padding."""
  _, jm = pair
  kw = {k: batch[k] for k in ('pixel_values', 'image_grid_thw', 'pixel_values_videos',
                              'video_grid_thw', 'second_per_grid_ts')}
  tight = build_model_inputs(jm.config, batch['input_ids'], batch['attention_mask'], **kw)
  _, rows, row_len = tight.window_segment_ids.shape
  padded = build_model_inputs(jm.config, batch['input_ids'], batch['attention_mask'], **kw,
                              seq_len=batch['input_ids'].shape[1] + 13,
                              patch_budget=tight.pixel_patches.shape[1] + 64,
                              vision_rows=3, vision_row_len=row_len)
  assert padded.window_segment_ids.shape == (1, 3, row_len)
  ours = np.asarray(forward(jm, padded))[:, :batch['input_ids'].shape[1]]
  valid = batch['attention_mask'].astype(bool)
  assert np.abs(ours[valid] - torch_logits[valid]).max() <= TOL


def test_frames_split_over_several_vision_rows(pair, batch, torch_logits):
  """Packing frames into short rows (full attention stays per frame) gives the same logits."""
  _, jm = pair
  kw = {k: batch[k] for k in ('pixel_values', 'image_grid_thw', 'pixel_values_videos',
                              'video_grid_thw', 'second_per_grid_ts')}
  grids = np.concatenate([batch['image_grid_thw'], batch['video_grid_thw']])
  inputs = build_model_inputs(jm.config, batch['input_ids'], batch['attention_mask'], **kw,
                              vision_row_len=max(slots_needed(grids, jm.config.vision)))
  assert inputs.window_segment_ids.shape[1] > 1
  ours = np.asarray(forward(jm, inputs))
  valid = batch['attention_mask'].astype(bool)
  assert np.abs(ours[valid] - torch_logits[valid]).max() <= TOL


def test_scanned_and_unrolled_layers_agree(pair, batch):
  tm, jm = pair
  unrolled = jax_twin(tm, scan_layers=False)
  a = hf_style_forward(jm, **batch)
  b = hf_style_forward(unrolled, **batch)
  valid = batch['attention_mask'].astype(bool)
  np.testing.assert_allclose(a[valid], b[valid], rtol=0, atol=1e-5)


def test_the_parity_check_sees_the_hidden_details(pair, batch):
  """Negative controls: transformers with a tanh GELU merger, or eps 1e-5 in the vision norms,
  differs from us by far more than the tolerance, so the parity tests would catch either slip."""
  tm, jm = pair
  pixels = np.concatenate([batch['pixel_values'], batch['pixel_values_videos']])
  grids = np.concatenate([batch['image_grid_thw'], batch['video_grid_thw']])
  ours = np.asarray(vision_features(jm, build_model_inputs(jm.config, np.zeros((1, 1))).replace(
      **grouped_vision_arrays(jm.config, [(pixels, grids)]))))[0]
  visual = tm.model.visual

  def torch_pooler():
    with torch.no_grad():
      return visual(torch.as_tensor(pixels), grid_thw=torch.as_tensor(grids)).pooler_output.numpy()

  exact_gelu = visual.merger.mlp[1]
  visual.merger.mlp[1] = torch.nn.GELU(approximate='tanh')
  try:
    assert np.abs(torch_pooler() - ours).max() > 3 * TOL  # measured 4.7e-4 and 5.5e-4
  finally:
    visual.merger.mlp[1] = exact_gelu
  norms = [m for m in visual.modules() if type(m).__name__ == 'Qwen2_5_VLRMSNorm']
  for m in norms:
    m.variance_epsilon = 1e-5
  try:
    assert np.abs(torch_pooler() - ours).max() > 10 * TOL
  finally:
    for m in norms:
      m.variance_epsilon = 1e-6
  assert np.abs(torch_pooler() - ours).max() <= TOL


@pytest.mark.parametrize('groups', [3, 6])
def test_vision_groups_give_the_same_logits(pair, batch, torch_logits, groups):
  """Rows split into groups with their own vision arrays (what shards with the batch). Groups
  differ in content; with 6 groups, the text-only rows make groups with no vision at all."""
  _, jm = pair
  kw = {k: batch[k] for k in ('pixel_values', 'image_grid_thw', 'pixel_values_videos',
                              'video_grid_thw', 'second_per_grid_ts')}
  ids, mask = batch['input_ids'], batch['attention_mask']
  # Six rows (a copy of the text-only row added), so that the groups divide the batch.
  ids6, mask6 = np.concatenate([ids, ids[3:4]]), np.concatenate([mask, mask[3:4]])
  grouped = build_model_inputs(jm.config, ids6, mask6, **kw, vision_groups=groups)
  assert grouped.pixel_patches.shape[0] == groups
  ours = np.asarray(forward(jm, grouped))[:5]
  valid = mask.astype(bool)
  assert np.abs(ours[valid] - torch_logits[valid]).max() <= TOL
