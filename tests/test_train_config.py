"""Configs: every key of every shipped config is read by the run it describes, and a config that
cannot work fails before anything compiles, naming the key."""
import json
import os

import jax
import ml_collections
import pytest

from coma_jax.model.config import ModelConfig
from coma_jax.training.config_checks import ConfigError, check_config
from coma_jax.training.run import build_run
from coma_jax.training.validation import make_validation
from coma_jax.training.workdir import checkpoints_of
from configs import coma_3b, coma_7b, demo, tiny

SHIPPED = [(module, variant) for module in (tiny, demo, coma_3b, coma_7b) for variant in ('stage1', 'stage2')] + [(demo, 'stage0')]


class Recorder:
  """A read-only view of a ConfigDict that records the path of every leaf read."""

  def __init__(self, config, seen: set, prefix: str = ''):
    object.__setattr__(self, '_config', config)
    object.__setattr__(self, '_seen', seen)
    object.__setattr__(self, '_prefix', prefix)

  def __getattr__(self, name):
    value = getattr(self._config, name)
    path = f'{self._prefix}{name}'
    if isinstance(value, ml_collections.ConfigDict):
      return Recorder(value, self._seen, path + '.')
    self._seen.add(path)
    return value

  def __setattr__(self, name, value):
    raise AttributeError('read-only')


def leaves(config, prefix=''):
  out = set()
  for key, value in config.items():
    out |= leaves(value, f'{prefix}{key}.') if isinstance(value, ml_collections.ConfigDict) else {prefix + key}
  return out


def fake_stage1_workdir(path, module):
  """What an abstract stage-2 build reads of its stage-1 workdir: the config and the model config."""
  os.makedirs(path, exist_ok=True)
  c = module.get_config('stage1')
  with open(os.path.join(path, 'config.json'), 'w') as f:
    f.write(c.to_json_best_effort())
  with open(os.path.join(path, 'model_config.json'), 'w') as f:
    json.dump(ModelConfig.from_json_file(c.model.hf_config).to_hf_dict(), f)
  return str(path)


@pytest.mark.parametrize('module,variant', SHIPPED, ids=[f'{m.__name__.split(".")[-1]}:{v}' for m, v in SHIPPED])
def test_every_key_of_every_shipped_config_is_read(module, variant, demo_data_dir, tmp_path):
  """Builds the run abstractly (nothing allocated: the 3B and 7B plan on 8 fake devices), its train
  loader and its validation, while recording which keys they read."""
  c = module.get_config(variant)
  c.data.data_dir = demo_data_dir
  if variant == 'stage2' and c.stage2.require_init_from:
    c.init_from = fake_stage1_workdir(tmp_path / 'stage1', module)
  seen = set()
  run = build_run(Recorder(c, seen), abstract=True)
  try:
    run.train_loader(0)
  except ValueError as e:  # the smoke data is smaller than the recipe's global batch of 256
    assert 'fewer than one global batch' in str(e)
  try:
    make_validation(run)
  except ValueError as e:  # the smoke validation split is smaller than the recipe's batch
    assert 'fewer than one data.global_batch' in str(e)
  checkpoints_of(str(tmp_path / 'run'), Recorder(c, seen), read_only=False).close()
  assert leaves(c) - seen == set()
  assert jax.tree.leaves(run.setup.state.params)  # something trains


def bad(change, variant='stage1'):
  c = tiny.get_config(variant)
  c.data.data_dir = '/data'
  change(c)
  return c


@pytest.mark.parametrize('variant,change,key', [
    ('stage1', lambda c: setattr(c.data, 'global_batch', 12), 'data.global_batch'),  # 8 devices
    ('stage2', lambda c: setattr(c.data, 'block_size', 3), 'data.block_size'),
    ('stage2', lambda c: setattr(c.stage2, 'chunks', 16), 'stage2.chunks'),
    ('stage1', lambda c: setattr(c.stage1, 'micro_batches', 3), 'stage1.micro_batches'),
    ('stage1', lambda c: setattr(c.model, 'num_compression_tokens', 0), 'model.num_compression_tokens'),
    ('stage1', lambda c: setattr(c.stage1, 'mask', 'bidirectional'), 'stage1.mask'),
    ('stage1', lambda c: setattr(c.data, 'buckets', ((256, 512, 0),)), 'data.buckets'),
    ('stage1', lambda c: setattr(c.data, 'packed_buckets', ((12, 256, 128, 12),)), 'data.packed_buckets'),
    ('stage1', lambda c: setattr(c.data, 'packed_buckets', ((8, 256, 128, 0),)), 'data.packed_buckets'),
    ('stage2', lambda c: setattr(c.stage2, 'require_init_from', True), 'init_from'),
    ('stage1', lambda c: setattr(c.mesh, 'shape', (16, 1, 1)), 'mesh.shape'),
    ('stage1', lambda c: setattr(c.data, 'data_dir', ''), 'data.data_dir'),
    ('stage1', lambda c: setattr(c.validation, 'every', 3), 'checkpoint.every'),
    ('stage1', lambda c: (setattr(c.model, 'init', 'pretrained'), setattr(c.model, 'checkpoint', '')), 'model.checkpoint'),
])
def test_a_config_that_cannot_work_names_its_key(variant, change, key):
  with pytest.raises(ConfigError, match=rf'^config\.{key}:'):
    check_config(bad(change, variant), num_devices=8)
