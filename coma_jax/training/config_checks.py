"""A config that makes no sense fails before anything compiles, with a message naming the key."""
from __future__ import annotations

import numpy as np

from coma_jax.model.attention import IMPLEMENTATIONS as ATTENTION
from coma_jax.parallel.mesh import resolve_shape
from coma_jax.parallel.rules import rules_dict

MASKS, NORMALISATIONS, LABEL_MODES = ('paper', 'causal'), ('example_mean', 'token_mean'), ('answers', 'dialogue')
INITS, REMATS, ADAPTERS = ('pretrained', 'random'), ('none', 'full', 'save_dots', 'projections'), ('none', 'lora', 'dora')
DTYPES, EMBEDDINGS = ('float32', 'bfloat16'), ('all', 'new_tokens_only', 'none')


class ConfigError(ValueError):
  """A config value that cannot work; the message starts with the key."""


def _require(ok: bool, key: str, message: str) -> None:
  if not ok:
    raise ConfigError(f'config.{key}: {message}')


def batch_shards(c, num_devices: int) -> int:
  """How many ways the batch axis is split: the product of the mesh axes the 'batch' rule names."""
  shape = dict(zip(('data', 'fsdp', 'tensor'), resolve_shape(tuple(c.mesh.shape), num_devices)))
  axes = rules_dict([tuple(r) for r in c.mesh.rules])['batch']
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return int(np.prod([shape[a] for a in axes]))


def check_config(c, num_devices: int, process_count: int = 1, abstract: bool = False) -> None:
  """Raises ConfigError naming the first key that cannot work on `num_devices` devices.
  `abstract` (planning): no weights are loaded, so no checkpoint is needed."""
  stage1 = c.stage == 'stage1'
  _require(c.stage in ('stage1', 'stage2'), 'stage', f'must be stage1 or stage2, got {c.stage!r}')
  _require(c.train.steps >= 1, 'train.steps', f'must be >= 1, got {c.train.steps}')
  _require(c.model.init in INITS, 'model.init', f'must be one of {INITS}, got {c.model.init!r}')
  if c.model.init == 'pretrained' and not c.init_from and not abstract:
    _require(bool(c.model.checkpoint), 'model.checkpoint',
             "model.init='pretrained' needs a local Qwen2.5-VL checkpoint directory")
  if c.model.init == 'random':
    _require(bool(c.model.hf_config or c.model.checkpoint), 'model.hf_config', "model.init='random' needs a config.json")
  stage0 = stage1 and c.stage1.mask == 'causal'  # K = 0 there: stage 0, the plain LM loss
  _require(c.model.num_compression_tokens >= (0 if stage0 else 1), 'model.num_compression_tokens',
           f'K must be >= 1 (0 only in stage 1 with stage1.mask=causal: stage 0), got {c.model.num_compression_tokens}')
  if c.model.num_compression_tokens == 0:
    _require(c.trainable.embeddings != 'new_tokens_only', 'trainable.embeddings',
             "'new_tokens_only' trains the compression tokens' rows, and K = 0 has none")
  _require(c.model.remat in REMATS, 'model.remat', f'must be one of {REMATS}, got {c.model.remat!r}')
  for key in ('dtype', 'frozen_dtype'):
    _require(getattr(c.model, key) in DTYPES, f'model.{key}', f'must be one of {DTYPES}, got {getattr(c.model, key)!r}')
  _require(c.model.attention in ATTENTION, 'model.attention', f'must be one of {ATTENTION}, got {c.model.attention!r}')
  _require(c.trainable.embeddings in EMBEDDINGS, 'trainable.embeddings',
           f'must be one of {EMBEDDINGS}, got {c.trainable.embeddings!r}')
  _require(c.adapter.kind in ADAPTERS, 'adapter.kind', f'must be one of {ADAPTERS}, got {c.adapter.kind!r}')
  try:
    resolve_shape(tuple(c.mesh.shape), num_devices)
  except ValueError as e:
    raise ConfigError(f'config.mesh.shape: {e}') from None
  d = c.data
  _require(bool(d.data_dir), 'data.data_dir', 'is empty: a folder of built datasets (python -m coma_jax.data.demo or build_tfds)')
  _require(d.examples_per_group >= 1 and d.global_batch % d.examples_per_group == 0, 'data.examples_per_group',
           f'{d.examples_per_group} must divide data.global_batch {d.global_batch}')
  shards = batch_shards(c, num_devices)
  groups = d.global_batch // d.examples_per_group
  _require(groups % shards == 0, 'data.global_batch',
           f'{d.global_batch} ({groups} vision groups) does not split over the {shards} batch shards of mesh.shape '
           f'{tuple(c.mesh.shape)}')
  _require(d.global_batch % process_count == 0, 'data.global_batch',
           f'{d.global_batch} does not split over {process_count} processes')
  _require(d.min_pixels <= d.max_pixels, 'data.min_pixels', f'{d.min_pixels} > data.max_pixels {d.max_pixels}')
  _require(0 <= d.max_bad_fraction <= 1, 'data.max_bad_fraction', f'must be in [0, 1], got {d.max_bad_fraction}')
  _require(d.on_bad_record in ('skip', 'error'), 'data.on_bad_record', f"must be 'skip' or 'error', got {d.on_bad_record!r}")
  _require(len(d.buckets) >= 1 and all(len(b) == 3 for b in d.buckets), 'data.buckets',
           'needs (seq_len, vision_slots, label_slots) triples')
  _require(c.checkpoint.every >= 1, 'checkpoint.every', f'must be >= 1, got {c.checkpoint.every}')
  _require(c.checkpoint.keep >= 1, 'checkpoint.keep', f'must be >= 1, got {c.checkpoint.keep}')
  if c.validation.every:
    _require(c.checkpoint.every % c.validation.every == 0, 'checkpoint.every',
             f'{c.checkpoint.every} must be a multiple of validation.every {c.validation.every}: every '
             'checkpoint needs its validation metric to keep the best')
  if stage1:
    s = c.stage1
    _require(s.mask in MASKS, 'stage1.mask', f'must be one of {MASKS}, got {s.mask!r}')
    _require(s.normalisation in NORMALISATIONS, 'stage1.normalisation', f'must be one of {NORMALISATIONS}')
    _require(s.label_mode in LABEL_MODES, 'stage1.label_mode', f'must be one of {LABEL_MODES}')
    _require(s.label_budget >= 0, 'stage1.label_budget', f'must be >= 0 (0: every label slot), got {s.label_budget}')
    _require(all(b[2] > 0 for b in d.buckets), 'data.buckets',
             f'stage 1 needs label slots in every bucket (the third number), got {tuple(d.buckets)}: '
             'with 0 the loss would be 0')
    _require(s.micro_batches >= 1 and groups % s.micro_batches == 0, 'stage1.micro_batches',
             f'{s.micro_batches} does not divide the {groups} vision groups of data.global_batch')
  else:
    s = c.stage2
    _require(s.temperature > 0, 'stage2.temperature', f'must be > 0, got {s.temperature}')
    _require(d.subset_caps in ('reference', ''), 'data.subset_caps', f"must be 'reference' or '', got {d.subset_caps!r}")
    _require(d.block_size >= 1 and d.global_batch % d.block_size == 0, 'data.block_size',
             f'data.global_batch {d.global_batch} is not a multiple of the block size {d.block_size}')
    _require(s.chunks >= 1 and groups % s.chunks == 0, 'stage2.chunks',
             f'{s.chunks} GradCache chunks do not divide the {groups} vision groups of data.global_batch '
             f'(at most {groups})')
    if s.require_init_from:
      _require(bool(c.init_from), 'init_from', 'this stage-2 config starts from a stage-1 workdir '
               '(or set stage2.require_init_from=False)')
  _check_packing(c, shards, process_count, stage1)


def _check_packing(c, shards: int, process_count: int, stage1: bool) -> None:
  """After the stage's own checks: packed buckets are well formed (with packing off too), and
  their rows split like the unpacked batch's."""
  d = c.data
  splits = ('stage1.micro_batches', c.stage1.micro_batches) if stage1 else ('stage2.chunks', c.stage2.chunks)
  _require(d.max_per_row >= 1, 'data.max_per_row', f'must be >= 1, got {d.max_per_row}')
  if d.packed_buckets or d.packing:
    _require(len(d.packed_buckets) >= 1 and all(len(b) == 4 and min(b[:2]) >= 1 for b in d.packed_buckets),
             'data.packed_buckets', 'needs (rows, seq_len, vision_slots, label_slots) with rows, seq_len >= 1')
    for rows, *_ in (d.packed_buckets if d.packing else ()):  # how rows split matters only when packing
      _require(rows % shards == 0 and rows % splits[1] == 0 and rows % process_count == 0, 'data.packed_buckets',
               f'{rows} rows do not split over the {shards} batch shards, the {splits[1]} {splits[0]} and the '
               f'{process_count} processes')
    if stage1:
      _require(all(b[3] > 0 for b in d.packed_buckets), 'data.packed_buckets',
               f'stage 1 needs label slots in every packed bucket (the fourth number), got {tuple(d.packed_buckets)}')
