"""Qwen2.5-VL architecture config: a frozen dataclass read from any HF `config.json`.

Reads both the flat 4.x hub layout (text fields at the top level, `rope_scaling`) and the nested
5.x layout (`text_config`, `vision_config`, `rope_parameters`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

# Fixed by the released model, not by config.json (transformers hard-codes them too).
VISION_NORM_EPS = 1e-6
DEFAULT_VISION_ROPE_THETA = 10000.0


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  depth: int
  hidden_size: int
  intermediate_size: int
  num_heads: int
  out_hidden_size: int
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  tokens_per_second: float = 2
  rope_theta: float = DEFAULT_VISION_ROPE_THETA
  hidden_act: str = 'silu'
  norm_eps: float = VISION_NORM_EPS

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Length of one flattened patch: channels x temporal x patch x patch."""
    return self.in_channels * self.temporal_patch_size * self.patch_size**2

  @property
  def merge_unit(self) -> int:
    return self.spatial_merge_size**2

  @property
  def window_merged(self) -> int:
    """Side of an attention window, in merged units (4 for the released 112 px window)."""
    return self.window_size // self.spatial_merge_size // self.patch_size

  @property
  def window_patches(self) -> int:
    """Patches in one full window: the fixed slot size of the padded window layout."""
    return self.window_merged**2 * self.merge_unit

  def is_full_attention(self, block: int) -> bool:
    return block in self.fullatt_block_indexes


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1000000.0
  mrope_section: tuple[int, int, int] = (16, 24, 24)
  hidden_act: str = 'silu'
  max_position_embeddings: int = 128000

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  text: TextConfig
  vision: VisionConfig
  tie_word_embeddings: bool = False
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653

  def __post_init__(self):
    t, v = self.text, self.vision
    problems = []
    if t.hidden_size % t.num_attention_heads:
      problems.append(f'text hidden_size {t.hidden_size} is not divisible by num_attention_heads {t.num_attention_heads}')
    if t.num_attention_heads % t.num_key_value_heads:
      problems.append(f'num_attention_heads {t.num_attention_heads} is not a multiple of num_key_value_heads {t.num_key_value_heads}')
    if 2 * sum(t.mrope_section) != t.head_dim:
      problems.append(f'mrope_section {t.mrope_section} must sum to head_dim/2 = {t.head_dim // 2}')
    if v.hidden_size % v.num_heads or v.head_dim % 4:
      problems.append(f'vision head_dim {v.hidden_size}/{v.num_heads} must be an integer divisible by 4 (2-D rotary)')
    if v.window_merged < 1:
      problems.append(f'vision window_size {v.window_size} is smaller than one merged unit')
    bad_blocks = [b for b in v.fullatt_block_indexes if not 0 <= b < v.depth]
    if bad_blocks:
      problems.append(f'fullatt_block_indexes {bad_blocks} are outside 0..{v.depth - 1}')
    if problems:
      raise ValueError('Invalid Qwen2.5-VL config: ' + '; '.join(problems))

  # ---- reading -------------------------------------------------------------------------------

  @classmethod
  def from_hf_dict(cls, d: dict[str, Any]) -> 'ModelConfig':
    """Builds the config from a parsed HF config.json, flat (4.x) or nested (5.x)."""
    text_d = dict(d.get('text_config') or {})
    for key, value in d.items():  # Flat 4.x layout: text fields sit at the top level.
      if key not in ('text_config', 'vision_config'):
        text_d.setdefault(key, value)
    rope = text_d.get('rope_parameters') or text_d.get('rope_scaling') or {}
    vision_d = d.get('vision_config')
    if not vision_d:
      raise ValueError('config.json has no vision_config: not a Qwen2.5-VL config')
    vision_rope = vision_d.get('rope_parameters') or {}
    try:
      text = TextConfig(
          vocab_size=text_d['vocab_size'],
          hidden_size=text_d['hidden_size'],
          intermediate_size=text_d['intermediate_size'],
          num_hidden_layers=text_d['num_hidden_layers'],
          num_attention_heads=text_d['num_attention_heads'],
          num_key_value_heads=text_d.get('num_key_value_heads') or text_d['num_attention_heads'],
          rms_norm_eps=text_d.get('rms_norm_eps', 1e-6),
          rope_theta=rope.get('rope_theta', text_d.get('rope_theta', 1000000.0)),
          mrope_section=tuple(rope.get('mrope_section', (16, 24, 24))),
          hidden_act=text_d.get('hidden_act', 'silu'),
          max_position_embeddings=text_d.get('max_position_embeddings', 128000),
      )
      vision = VisionConfig(
          depth=vision_d['depth'],
          hidden_size=vision_d['hidden_size'],
          intermediate_size=vision_d['intermediate_size'],
          num_heads=vision_d['num_heads'],
          out_hidden_size=vision_d.get('out_hidden_size', text.hidden_size),
          in_channels=vision_d.get('in_channels', vision_d.get('in_chans', 3)),
          patch_size=vision_d.get('patch_size', vision_d.get('spatial_patch_size', 14)),
          temporal_patch_size=vision_d.get('temporal_patch_size', 2),
          spatial_merge_size=vision_d.get('spatial_merge_size', 2),
          window_size=vision_d.get('window_size', 112),
          fullatt_block_indexes=tuple(vision_d.get('fullatt_block_indexes', (7, 15, 23, 31))),
          tokens_per_second=vision_d.get('tokens_per_second', 2),
          rope_theta=vision_rope.get('rope_theta', vision_d.get('rope_theta', DEFAULT_VISION_ROPE_THETA)),
          hidden_act=vision_d.get('hidden_act', 'silu'),
      )
    except KeyError as e:
      raise ValueError(f'config.json is missing the required field {e.args[0]!r}') from None
    return cls(
        text=text,
        vision=vision,
        # Top level only: transformers 5.x also mirrors it into text_config, but the top level rules.
        tie_word_embeddings=bool(d.get('tie_word_embeddings', False)),
        image_token_id=d.get('image_token_id', 151655),
        video_token_id=d.get('video_token_id', 151656),
        vision_start_token_id=d.get('vision_start_token_id', 151652),
        vision_end_token_id=d.get('vision_end_token_id', 151653),
    )

  @classmethod
  def from_json_file(cls, path: str) -> 'ModelConfig':
    with open(path) as f:
      try:
        d = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}: not valid JSON ({e})') from None
    return cls.from_hf_dict(d)

  @classmethod
  def from_pretrained_dir(cls, path: str) -> 'ModelConfig':
    return cls.from_json_file(os.path.join(path, 'config.json'))

  # ---- writing -------------------------------------------------------------------------------

  def to_hf_dict(self) -> dict[str, Any]:
    """The nested 5.x layout, which transformers 4.5x and 5.x both read."""
    t, v = self.text, self.vision
    return {
        'architectures': ['Qwen2_5_VLForConditionalGeneration'],
        'model_type': 'qwen2_5_vl',
        'tie_word_embeddings': self.tie_word_embeddings,
        'image_token_id': self.image_token_id,
        'video_token_id': self.video_token_id,
        'vision_start_token_id': self.vision_start_token_id,
        'vision_end_token_id': self.vision_end_token_id,
        'text_config': {
            'model_type': 'qwen2_5_vl_text',
            'vocab_size': t.vocab_size,
            'hidden_size': t.hidden_size,
            'intermediate_size': t.intermediate_size,
            'num_hidden_layers': t.num_hidden_layers,
            'num_attention_heads': t.num_attention_heads,
            'num_key_value_heads': t.num_key_value_heads,
            'rms_norm_eps': t.rms_norm_eps,
            'hidden_act': t.hidden_act,
            'max_position_embeddings': t.max_position_embeddings,
            'rope_parameters': {'rope_type': 'default', 'rope_theta': t.rope_theta,
                                'mrope_section': list(t.mrope_section)},
            'tie_word_embeddings': self.tie_word_embeddings,
        },
        'vision_config': {
            'model_type': 'qwen2_5_vl_vision',
            'depth': v.depth,
            'hidden_size': v.hidden_size,
            'intermediate_size': v.intermediate_size,
            'num_heads': v.num_heads,
            'out_hidden_size': v.out_hidden_size,
            'in_channels': v.in_channels,
            'patch_size': v.patch_size,
            'temporal_patch_size': v.temporal_patch_size,
            'spatial_merge_size': v.spatial_merge_size,
            'window_size': v.window_size,
            'fullatt_block_indexes': list(v.fullatt_block_indexes),
            'tokens_per_second': v.tokens_per_second,
            'hidden_act': v.hidden_act,
            'rope_parameters': {'rope_type': 'axial', 'rope_theta': v.rope_theta},
        },
    }
