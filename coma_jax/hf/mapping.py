"""One declarative table between transformers' Qwen2.5-VL tensor names and our parameter paths.

Each rule names an HF key (with `{i}` for a layer index), our parameter path and a transform.
The same table drives import (HF -> ours, stacking layers) and export (ours -> HF, unstacking).
Legacy 4.x key names (`model.layers.*`, `visual.*`) are accepted on import.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

from coma_jax.model.config import ModelConfig

# Per-key transforms, HF -> ours and back. Linear weights are (out, in) in torch, (in, out) here.
TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    'identity': (lambda a, shape: a, lambda a, hf_shape: a),
    'linear': (lambda a, shape: a.T, lambda a, hf_shape: a.T),
    # Conv3d (embed, C, T, P, P) with stride == kernel is a matmul on the flattened patch.
    'conv3d': (lambda a, shape: a.reshape(a.shape[0], -1).T, lambda a, hf_shape: a.T.reshape(hf_shape)),
}
# The axis of our value that the HF tensor's first axis becomes, so a tensor can be read and
# transformed a range of HF rows at a time.
ROW_AXIS = {'identity': 0, 'linear': 1, 'conv3d': 1}


@dataclasses.dataclass(frozen=True)
class Rule:
  hf: str               # HF key; '{i}' marks the layer index of a stacked parameter
  path: tuple[str, ...]  # attribute path of the nnx.Param in our model
  transform: str
  stack: str | None = None  # 'text' or 'vision': which layer count the `{i}` runs over
  hf_shape: tuple[int, ...] | None = None  # only where the export transform needs it (conv3d)


def _layer_rules(hf_prefix: str, path_prefix: tuple[str, ...], stack: str,
                 entries: list[tuple[str, tuple[str, ...], str]]) -> list[Rule]:
  return [Rule(f'{hf_prefix}.{{i}}.{hf}', path_prefix + path, tf, stack) for hf, path, tf in entries]


def _linear(hf: str, path: tuple[str, ...], bias: bool) -> list[tuple[str, tuple[str, ...], str]]:
  out = [(f'{hf}.weight', path + ('kernel',), 'linear')]
  return out + [(f'{hf}.bias', path + ('bias',), 'identity')] if bias else out


def rules(config: ModelConfig) -> list[Rule]:
  v = config.vision
  vision_block = (
      [('norm1.weight', ('norm1', 'scale'), 'identity'), ('norm2.weight', ('norm2', 'scale'), 'identity')]
      + _linear('attn.qkv', ('attn', 'qkv'), True) + _linear('attn.proj', ('attn', 'proj'), True)
      + [e for name in ('gate_proj', 'up_proj', 'down_proj') for e in _linear(f'mlp.{name}', ('mlp', name), True)])
  text_layer = (
      [('input_layernorm.weight', ('input_layernorm', 'scale'), 'identity'),
       ('post_attention_layernorm.weight', ('post_attention_layernorm', 'scale'), 'identity')]
      + [e for name in ('q_proj', 'k_proj', 'v_proj') for e in _linear(f'self_attn.{name}', ('self_attn', name), True)]
      + _linear('self_attn.o_proj', ('self_attn', 'o_proj'), False)
      + [e for name in ('gate_proj', 'up_proj', 'down_proj') for e in _linear(f'mlp.{name}', ('mlp', name), False)])
  out = [
      Rule('model.visual.patch_embed.proj.weight', ('visual', 'patch_embed', 'kernel'), 'conv3d',
           hf_shape=(v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)),
      *_layer_rules('model.visual.blocks', ('visual', 'blocks'), 'vision', vision_block),
      Rule('model.visual.merger.ln_q.weight', ('visual', 'merger', 'ln_q', 'scale'), 'identity'),
      Rule('model.visual.merger.mlp.0.weight', ('visual', 'merger', 'fc1', 'kernel'), 'linear'),
      Rule('model.visual.merger.mlp.0.bias', ('visual', 'merger', 'fc1', 'bias'), 'identity'),
      Rule('model.visual.merger.mlp.2.weight', ('visual', 'merger', 'fc2', 'kernel'), 'linear'),
      Rule('model.visual.merger.mlp.2.bias', ('visual', 'merger', 'fc2', 'bias'), 'identity'),
      Rule('model.language_model.embed_tokens.weight', ('embed_tokens', 'embedding'), 'identity'),
      *_layer_rules('model.language_model.layers', ('decoder', 'layers'), 'text', text_layer),
      Rule('model.language_model.norm.weight', ('decoder', 'norm', 'scale'), 'identity'),
  ]
  if not config.tie_word_embeddings:
    out.append(Rule('lm_head.weight', ('lm_head', 'kernel'), 'linear'))
  return out


def canonical_key(key: str) -> str:
  """Maps the on-disk names (`visual.*`, `model.layers.*`: what the hub checkpoints hold and what
  transformers 4.x and 5.x both write) onto the module names the table uses."""
  if key.startswith('visual.'):
    return 'model.' + key
  if key.startswith('model.') and not key.startswith(('model.visual.', 'model.language_model.')):
    return 'model.language_model.' + key[len('model.'):]
  return key


def checkpoint_key(key: str) -> str:
  """The inverse of `canonical_key`: the name transformers itself writes to disk."""
  if key.startswith('model.visual.'):
    return key[len('model.'):]
  if key.startswith('model.language_model.'):
    return 'model.' + key[len('model.language_model.'):]
  return key


def num_layers(config: ModelConfig, stack: str | None) -> int:
  return {'text': config.text.num_hidden_layers, 'vision': config.vision.depth, None: 1}[stack]


def expand(config: ModelConfig) -> Iterator[tuple[str, Rule, int | None]]:
  """Every concrete HF key with its rule and layer index (None for unstacked parameters)."""
  for rule in rules(config):
    if rule.stack is None:
      yield rule.hf, rule, None
    else:
      for i in range(num_layers(config, rule.stack)):
        yield rule.hf.format(i=i), rule, i


def get_param(model, path: tuple[str, ...]):
  obj = model
  for name in path:
    obj = getattr(obj, name)
  return obj


def match_keys(config: ModelConfig, keys) -> dict[str, str]:
  """Canonical HF key -> the checkpoint's own key, after checking the key sets agree.

  A missing or unexpected key raises an error that names it. A tied model ignores a stored
  `lm_head.weight` (it is the embedding).
  """
  by_key = {canonical_key(k): k for k in keys}
  if config.tie_word_embeddings:
    by_key.pop('lm_head.weight', None)
  wanted = {key for key, _, _ in expand(config)}
  on_disk_names = any(canonical_key(k) != k for k in keys)
  missing = sorted(checkpoint_key(k) if on_disk_names else k for k in wanted - set(by_key))
  unexpected = sorted(by_key[k] for k in set(by_key) - wanted)
  if missing or unexpected:
    more = lambda keys: f'{keys[:8]}{" ..." if len(keys) > 8 else ""}'
    raise ValueError(f'checkpoint does not match its config: missing keys {more(missing)}; '
                     f'unexpected keys {more(unexpected)}')
  return by_key
