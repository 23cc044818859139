"""CoMa-3B on Qwen2.5-VL-3B: `--config configs/coma_3b.py:stage1` (or :stage2)."""
import os

from configs import base


def get_config(variant: str = 'stage1'):
  c = base.get_config(variant)
  c.model.hf_config = os.path.join(os.path.dirname(__file__), '..', 'coma_jax', 'model', 'hf_configs',
                                   'qwen2_5_vl_3b.json')
  return c
