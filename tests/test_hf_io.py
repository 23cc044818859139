"""HF checkpoint import/export: transformers <-> coma_jax, single and sharded, and its errors."""
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import skimage.data
import torch
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image
from safetensors.numpy import load_file, save_file
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

from coma_jax.data.image import ImageSettings, preprocess_image
from coma_jax.hf import assembly, hf_style_forward, load_pretrained, save_pretrained
from coma_jax.hf.io import checkpoint_shapes
from coma_jax.hf.safetensors_files import ShardedWriter
from coma_jax.model.config import ModelConfig
from tests.parity_batch import mixed_batch
from tests.tiny_models import IMAGE, V_END, V_START, torch_model

TOL = 1e-4


def torch_logits(tm, batch):
  with torch.no_grad():
    return tm(**{k: torch.as_tensor(v) for k, v in batch.items()}).logits.numpy()


def max_diff(a, b, mask):
  return float(np.abs(a[mask] - b[mask]).max())


@pytest.fixture(scope='module')
def untied(tmp_path_factory):
  tm = torch_model('untied_gqa3_win112', seed=1)
  batch = mixed_batch(seed=1)
  return tm, batch, torch_logits(tm, batch), tmp_path_factory.mktemp('hf_untied')


def test_load_a_sharded_transformers_checkpoint(untied):
  tm, batch, ref, tmp = untied
  tm.save_pretrained(tmp / 'sharded', max_shard_size='200KB')
  files = sorted(os.listdir(tmp / 'sharded'))
  assert 'model.safetensors.index.json' in files and sum(f.endswith('.safetensors') for f in files) > 3
  model = load_pretrained(str(tmp / 'sharded'))
  assert max_diff(hf_style_forward(model, **batch), ref, batch['attention_mask'].astype(bool)) <= TOL


@pytest.mark.parametrize('max_shard_bytes', [10**9, 300_000])
def test_round_trip_through_our_export(untied, max_shard_bytes):
  tm, batch, ref, tmp = untied
  tm.save_pretrained(tmp / 'src')
  model = load_pretrained(str(tmp / 'src'))
  out = tmp / f'export_{max_shard_bytes}'
  names = save_pretrained(model, str(out), max_shard_bytes=max_shard_bytes)
  assert (len(names) == 1) == (max_shard_bytes == 10**9)
  again, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
  assert not info['missing_keys'], info['missing_keys']
  assert not info['unexpected_keys'] and not info['mismatched_keys'], info
  again.eval()
  assert max_diff(torch_logits(again, batch), ref, batch['attention_mask'].astype(bool)) <= TOL


def test_tied_round_trip_and_bf16(tmp_path):
  tm = torch_model('tied_gqa2_win56', seed=2)
  batch = mixed_batch(seed=2)
  ref = torch_logits(tm, batch)
  tm.save_pretrained(tmp_path / 'src')
  model = load_pretrained(str(tmp_path / 'src'))
  save_pretrained(model, str(tmp_path / 'out'))
  assert 'lm_head.weight' not in load_file(str(tmp_path / 'out' / 'model.safetensors'))
  again, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / 'out'), output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  assert max_diff(torch_logits(again.eval(), batch), ref, batch['attention_mask'].astype(bool)) <= TOL
  # bf16 storage: written as bf16, read back as bf16 parameters.
  save_pretrained(model, str(tmp_path / 'bf16'), dtype=jnp.bfloat16)
  stored = load_file(str(tmp_path / 'bf16' / 'model.safetensors'))
  assert all(v.dtype == ml_dtypes.bfloat16 for v in stored.values())
  assert json.load(open(tmp_path / 'bf16' / 'config.json'))['dtype'] == 'bfloat16'
  low = load_pretrained(str(tmp_path / 'bf16'), dtype=jnp.bfloat16)
  assert low.decoder.layers.self_attn.q_proj.kernel.dtype == jnp.bfloat16


def test_module_style_names_and_flat_config(untied, tmp_path):
  """transformers writes `model.layers.*` / `visual.*`; module-style names load too."""
  tm, batch, ref, _ = untied
  tm.save_pretrained(tmp_path / 'new')
  tensors = load_file(str(tmp_path / 'new' / 'model.safetensors'))
  assert 'visual.patch_embed.proj.weight' in tensors and 'model.layers.0.mlp.up_proj.weight' in tensors
  renamed = {k.replace('model.', 'model.language_model.', 1).replace('visual.', 'model.visual.', 1)
             if not k.startswith('lm_head') else k: v for k, v in tensors.items()}
  (tmp_path / 'old').mkdir()
  save_file(renamed, str(tmp_path / 'old' / 'model.safetensors'), metadata={'format': 'pt'})
  nested = json.load(open(tmp_path / 'new' / 'config.json'))
  flat = dict(nested.pop('text_config'), **{k: v for k, v in nested.items()})
  flat['rope_scaling'] = dict(flat.pop('rope_parameters'), type='mrope')
  json.dump(flat, open(tmp_path / 'old' / 'config.json', 'w'))
  model = load_pretrained(str(tmp_path / 'old'))
  assert max_diff(hf_style_forward(model, **batch), ref, batch['attention_mask'].astype(bool)) <= TOL


def test_bad_checkpoints_name_the_key(untied, tmp_path):
  tm, _, _, _ = untied
  tm.save_pretrained(tmp_path / 'good')
  tensors = load_file(str(tmp_path / 'good' / 'model.safetensors'))
  config = (tmp_path / 'good' / 'config.json').read_text()

  def write(name, t):
    (tmp_path / name).mkdir()
    (tmp_path / name / 'config.json').write_text(config)
    save_file(t, str(tmp_path / name / 'model.safetensors'))
    return str(tmp_path / name)

  missing = dict(tensors)
  missing.pop('model.layers.1.mlp.up_proj.weight')
  with pytest.raises(ValueError, match=r"missing keys \['model.layers.1.mlp.up_proj.weight'\]"):
    load_pretrained(write('missing', missing))
  with pytest.raises(ValueError, match=r"unexpected keys \['model.extra.weight'\]"):
    load_pretrained(write('extra', dict(tensors, **{'model.extra.weight': np.zeros(3, np.float32)})))
  wrong = dict(tensors)
  wrong['visual.blocks.2.attn.proj.weight'] = np.zeros((48, 40), np.float32)
  with pytest.raises(ValueError, match=r'visual.blocks.2.attn.proj.weight: shape \(48, 40\)'):
    load_pretrained(write('shape', wrong))
  (tmp_path / 'pickle').mkdir()
  (tmp_path / 'pickle' / 'config.json').write_text(config)
  (tmp_path / 'pickle' / 'pytorch_model.bin').write_bytes(b'not read')
  with pytest.raises(FileNotFoundError, match='never pickle'):
    load_pretrained(str(tmp_path / 'pickle'))


def test_load_straight_into_a_sharding(untied, tmp_path):
  tm, batch, ref, _ = untied
  tm.save_pretrained(tmp_path / 'src')
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(8), ('fsdp',))

  def fsdp(path, shape):  # shard the first divisible non-layer axis, else replicate
    stacked = path[:2] in (('decoder', 'layers'), ('visual', 'blocks'))
    spec = [None] * len(shape)
    for axis in range(int(stacked), len(shape)):
      if shape[axis] % 8 == 0:
        spec[axis] = 'fsdp'
        break
    return NamedSharding(mesh, P(*spec))

  model = load_pretrained(str(tmp_path / 'src'), shardings=fsdp)
  q = model.decoder.layers.self_attn.q_proj.kernel.value
  assert q.sharding.spec == P(None, 'fsdp', None) and len(q.addressable_shards) == 8
  assert max_diff(hf_style_forward(model, **batch), ref, batch['attention_mask'].astype(bool)) <= TOL


def test_row_chunks_and_any_split_give_the_same_parameters(untied, tmp_path, monkeypatch):
  """Tensors read a few rows at a time into blocks split on layer, row and other axes."""
  tm, _, _, _ = untied
  tm.save_pretrained(tmp_path / 'src')
  whole = load_pretrained(str(tmp_path / 'src'))
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ('a', 'b'))

  def split(path, shape):  # 'a' on the first axis 2 divides, 'b' on the last other axis 4 divides
    spec = [None] * len(shape)
    for axis in [a for a in range(len(shape)) if shape[a] % 2 == 0][:1]:
      spec[axis] = 'a'
    for axis in [a for a in range(len(shape)) if shape[a] % 4 == 0 and spec[a] is None][-1:]:
      spec[axis] = 'b'
    return NamedSharding(mesh, P(*spec))

  monkeypatch.setattr(assembly, 'CHUNK_BYTES', 1000)
  chunked = load_pretrained(str(tmp_path / 'src'), shardings=split)
  pairs = zip(jax.tree.leaves(nnx.state(whole, nnx.Param)), jax.tree.leaves(nnx.state(chunked, nnx.Param)))
  for a, b in pairs:
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_real_photo_through_both_pipelines(untied):
  tm, _, _, tmp = untied
  tm.save_pretrained(tmp / 'photo')
  model = load_pretrained(str(tmp / 'photo'))
  photo = Image.fromarray(skimage.data.coffee())
  settings = ImageSettings(min_pixels=28 * 28 * 16, max_pixels=28 * 28 * 48)
  ref_pre = Qwen2VLImageProcessorPil(min_pixels=settings.min_pixels, max_pixels=settings.max_pixels)(
      images=[photo], return_tensors='np')
  patches, grid = preprocess_image(photo, settings)
  assert np.abs(patches - ref_pre['pixel_values']).max() <= 1e-5
  n = int(np.prod(grid)) // 4
  ids = np.array([[11, 12, V_START] + [IMAGE] * n + [V_END, 13, 14, 15]])
  mask = np.ones_like(ids)
  with torch.no_grad():
    ref = tm(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
             pixel_values=torch.as_tensor(ref_pre['pixel_values']),
             image_grid_thw=torch.as_tensor(ref_pre['image_grid_thw']),
             mm_token_type_ids=torch.as_tensor((ids == IMAGE).astype(np.int64))).logits.numpy()
  ours = hf_style_forward(model, ids, mask, pixel_values=patches, image_grid_thw=np.array([grid]))
  assert max_diff(ours, ref, mask.astype(bool)) <= TOL


def _resident_kb(field):
  with open('/proc/self/status') as f:
    return int(next(line for line in f if line.startswith(field)).split()[1])


def test_loading_holds_the_parameters_about_once(tmp_path):
  """Peak RSS growth during a load stays near the parameter bytes: no file stays mapped and no
  parameter exists as per-layer copies plus a stack (the old reader grew 2.5x here). At tens of
  MB, fixed costs (the first trace, scratch the allocator keeps) weigh 0.1-0.2x, hence 1.5x."""
  config = ModelConfig.from_hf_dict(dict(
      vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
      rope_scaling=dict(type='mrope', mrope_section=[8, 12, 12]),
      vision_config=dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=256,
                         fullatt_block_indexes=[1])))
  rng = np.random.default_rng(0)
  writer = ShardedWriter(str(tmp_path), max_shard_bytes=8 * 1024**2)
  for key, shape in checkpoint_shapes(config).items():
    writer.add(key, rng.standard_normal(shape, np.float32))
  writer.finish()
  (tmp_path / 'config.json').write_text(json.dumps(config.to_hf_dict()))
  jax.devices()  # the backend's start-up is not the loader's
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')  # resets the peak (VmHWM) to the current RSS
  except OSError:
    pytest.skip('cannot reset the peak RSS here')
  before = _resident_kb('VmRSS')
  model = load_pretrained(str(tmp_path))
  growth = (_resident_kb('VmHWM') - before) * 1024
  assert model.lm_head.kernel.dtype == jnp.float32
  assert growth <= 1.5 * writer.total, f'peak RSS grew by {growth / writer.total:.2f}x the parameter bytes'
