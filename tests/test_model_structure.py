"""Adapter hook points, logical axis names and input validation of the model."""
import jax
import numpy as np
import pytest
from flax import nnx

from coma_jax.model import ModelConfig, Qwen25VL, build_model_inputs
from coma_jax.model.layers import LAYERS_AXIS, iter_hooks
from tests.parity_batch import mixed_batch
from tests.tiny_models import hf_config

TEXT_AXES = {'embed', 'mlp', 'heads', 'kv_heads', 'vocab'}
VISION_AXES = {'vision_patch', 'vision_embed', 'vision_heads', 'vision_mlp', 'vision_merge', 'vision_merge_mlp'}


@pytest.fixture(scope='module')
def model():
  cfg = ModelConfig.from_hf_dict(hf_config('untied_gqa3_win112').to_dict())
  return nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0)))


def test_every_projection_is_a_named_hook(model):
  hooks = {m.hook: path for path, m in iter_hooks(model)}
  assert set(hooks) == {
      'text.q_proj', 'text.k_proj', 'text.v_proj', 'text.o_proj', 'text.gate_proj', 'text.up_proj',
      'text.down_proj', 'vision.qkv', 'vision.proj', 'vision.gate_proj', 'vision.up_proj',
      'vision.down_proj', 'vision.patch_embed', 'vision.merger.fc1', 'vision.merger.fc2', 'lm_head'}
  assert hooks['text.q_proj'] == ('decoder', 'layers', 'self_attn', 'q_proj')
  # Every matrix parameter of the model belongs to a hook, except the embedding table.
  hook_kernels = {path + ('kernel',) for path in hooks.values()}
  matrices = {path for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
              if len(v.shape) - (path[0] in ('decoder',) or path[:2] == ('visual', 'blocks')) == 2}
  assert matrices - hook_kernels == {('embed_tokens', 'embedding')}


def test_every_parameter_has_logical_axis_names(model):
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = var.get_metadata()['out_sharding']
    assert len(names) == len(var.shape), path
    stacked = path[0] == 'decoder' and path[1] == 'layers' or path[:2] == ('visual', 'blocks')
    assert (names[0] == LAYERS_AXIS) == stacked, path
    allowed = VISION_AXES if path[0] == 'visual' else TEXT_AXES
    assert set(names) - {LAYERS_AXIS} <= allowed | ({'embed'} if path[:3] == ('visual', 'merger', 'fc2') else set()), path


def test_input_contract_errors_name_the_problem():
  cfg = ModelConfig.from_hf_dict(hf_config('tied_gqa2_win56').to_dict())
  b = mixed_batch()
  kw = {k: b[k] for k in ('pixel_values', 'image_grid_thw', 'pixel_values_videos', 'video_grid_thw',
                          'second_per_grid_ts')}
  with pytest.raises(ValueError, match=r'pixel values have shape \(395, 1176\), but the grids need \(396'):
    build_model_inputs(cfg, b['input_ids'], b['attention_mask'], **dict(kw, pixel_values=b['pixel_values'][:-1]))
  with pytest.raises(ValueError, match='seq_len 3 is shorter'):
    build_model_inputs(cfg, b['input_ids'], b['attention_mask'], **kw, seq_len=3)
  ids = b['input_ids'].copy()
  ids[0, 6] = 7  # break the first image block
  with pytest.raises(ValueError, match='row 0: image 0'):
    build_model_inputs(cfg, ids, b['attention_mask'], **kw)


def test_static_shapes_do_not_depend_on_the_data():
  cfg = ModelConfig.from_hf_dict(hf_config('tied_gqa2_win56').to_dict())
  b = mixed_batch()
  budgets = dict(seq_len=64, patch_budget=1024, vision_rows=2, vision_row_len=512)
  kw = {k: b[k] for k in ('pixel_values', 'image_grid_thw', 'pixel_values_videos', 'video_grid_thw',
                          'second_per_grid_ts')}
  full = build_model_inputs(cfg, b['input_ids'], b['attention_mask'], **kw, **budgets)
  # Drop the video row: different content, same shapes.
  keep = [0, 1, 3, 4, 2]
  ids, mask = b['input_ids'][keep], b['attention_mask'][keep]
  ids[4], mask[4] = 0, 0
  fewer = build_model_inputs(cfg, ids, mask, pixel_values=b['pixel_values'], image_grid_thw=b['image_grid_thw'],
                             **budgets)
  shapes = lambda x: [None if a is None else np.shape(a) for a in jax.tree.leaves(x, is_leaf=lambda a: a is None)]
  assert shapes(full) == shapes(fewer)
