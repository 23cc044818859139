import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from coma_jax.model import ModelConfig, Qwen25VL
from tests.tiny_models import hf_config

HF_CONFIGS = os.path.join(os.path.dirname(__file__), '..', 'coma_jax', 'model', 'hf_configs')


def param_count(module) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize('name,total,vision', [
    ('qwen2_5_vl_3b', 3_754_622_976, 668_684_288),
    ('qwen2_5_vl_7b', 8_292_166_656, 676_550_144),
])
def test_real_parameter_counts_without_allocating(name, total, vision):
  cfg = ModelConfig.from_json_file(os.path.join(HF_CONFIGS, f'{name}.json'))
  abstract = nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing was allocated
  assert param_count(abstract) == total
  assert param_count(abstract.visual) == vision


def test_flat_4x_layout():
  cfg = ModelConfig.from_json_file(os.path.join(HF_CONFIGS, 'qwen2_5_vl_3b.json'))
  assert cfg.tie_word_embeddings is True
  assert cfg.text.mrope_section == (16, 24, 24)
  assert cfg.text.rope_theta == 1e6 and cfg.text.rms_norm_eps == 1e-6
  assert cfg.vision.rope_theta == 10000.0 and cfg.vision.norm_eps == 1e-6
  assert cfg.vision.in_channels == 3 and cfg.vision.fullatt_block_indexes == (7, 15, 23, 31)
  assert cfg.vision.window_patches == 64
  cfg7 = ModelConfig.from_json_file(os.path.join(HF_CONFIGS, 'qwen2_5_vl_7b.json'))
  assert cfg7.tie_word_embeddings is False and cfg7.text.num_key_value_heads == 4


def test_nested_5x_layout_and_round_trip(tmp_path):
  hf = hf_config('untied_gqa3_win112')
  hf.save_pretrained(tmp_path)
  cfg = ModelConfig.from_pretrained_dir(str(tmp_path))
  assert cfg.text.hidden_size == 96 and cfg.text.num_key_value_heads == 2
  assert cfg.text.rms_norm_eps == 1e-5 and cfg.text.rope_theta == 1e6
  assert cfg.vision.window_size == 112 and cfg.vision.tokens_per_second == 4
  assert cfg.tie_word_embeddings is False
  assert cfg.image_token_id == 500
  assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
  # transformers reads what we write back.
  from transformers import Qwen2_5_VLConfig
  (tmp_path / 'ours').mkdir()
  (tmp_path / 'ours' / 'config.json').write_text(json.dumps(cfg.to_hf_dict()))
  again = Qwen2_5_VLConfig.from_pretrained(tmp_path / 'ours')
  assert again.text_config.hidden_size == 96 and again.vision_config.window_size == 112


def test_tie_defaults_false_and_lives_at_top_level():
  d = json.load(open(os.path.join(HF_CONFIGS, 'qwen2_5_vl_3b.json')))
  d.pop('tie_word_embeddings')
  assert ModelConfig.from_hf_dict(d).tie_word_embeddings is False
  nested = ModelConfig.from_json_file(os.path.join(HF_CONFIGS, 'qwen2_5_vl_7b.json')).to_hf_dict()
  nested['text_config']['tie_word_embeddings'] = True  # the top level rules
  assert ModelConfig.from_hf_dict(nested).tie_word_embeddings is False


def test_bad_configs_name_the_problem():
  d = json.load(open(os.path.join(HF_CONFIGS, 'qwen2_5_vl_3b.json')))
  broken = dict(d, rope_scaling={'type': 'mrope', 'mrope_section': [16, 24, 20]})
  with pytest.raises(ValueError, match='mrope_section'):
    ModelConfig.from_hf_dict(broken)
  with pytest.raises(ValueError, match="'hidden_size'"):
    ModelConfig.from_hf_dict({k: v for k, v in d.items() if k != 'hidden_size'})
  with pytest.raises(ValueError, match='vision_config'):
    ModelConfig.from_hf_dict({k: v for k, v in d.items() if k != 'vision_config'})
