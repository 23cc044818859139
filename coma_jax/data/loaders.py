"""Ready-made loaders for the two stages, over built TFDS datasets (`build_tfds.py`)."""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

from coma_jax.data.batching import Bucket, check_example_contract, example_slots, parse_buckets
from coma_jax.data.packing import PackedBucket, parse_packed_buckets
from coma_jax.data.pipeline import ConcatSource, GlobalBatchIterator, StepReader
from coma_jax.data.step_batches import BatchSpec
from coma_jax.data.sampler import EpochSampler, SubsetBlockSampler
from coma_jax.data.sequences import SequenceSettings, TokenIds, stage1_example, stage2_example
from coma_jax.data.tfds_builders.mmeb import pair_from_features
from coma_jax.data.tfds_builders.stage1_qa import record_from_features
from coma_jax.data.tokenizer import QwenTokenizer
from coma_jax.model.config import ModelConfig

log = logging.getLogger('coma_jax.data')
VERSION_DIR = re.compile(r'^(\d+)\.(\d+)\.(\d+)$')


def open_builder(data_dir: str, name: str):
  """The newest complete build of dataset `name` under data_dir.

  Only finished versions count (a `X.Y.Z` folder with its dataset_info.json): a killed build
  leaves an `incomplete.*` folder, which is never picked.
  """
  root = os.path.join(data_dir, name)
  entries = os.listdir(root) if os.path.isdir(root) else []
  complete = [tuple(int(x) for x in VERSION_DIR.match(v).groups()) for v in entries if VERSION_DIR.match(v)
              and os.path.isfile(os.path.join(root, v, 'dataset_info.json'))]
  leftovers = [v for v in entries if v.startswith('incomplete.')]
  if leftovers:
    log.warning('%s: leftover folders of an interrupted build, safe to delete: %s', root, leftovers)
  if not complete:
    raise FileNotFoundError(f'no complete {name} dataset under {data_dir}'
                            + (f' (only the interrupted build(s) {leftovers})' if leftovers else '')
                            + f'; run python -m coma_jax.data.build_tfds {name}')
  return tfds.builder_from_directory(os.path.join(root, '.'.join(map(str, max(complete)))))


def sequence_settings(buckets: Sequence[Bucket | PackedBucket], examples_per_group: int = 1, **kw) -> SequenceSettings:
  """Settings whose limits are the largest bucket's, so every valid example fits some bucket.

  A vision group holds `examples_per_group` examples, so one example may take that share of the
  largest vision budget: then any group of valid examples fits it. (A packed row is its own
  vision group: an example may take all of a row.)
  """
  largest = max(b.vision_slots for b in buckets)
  return SequenceSettings(max_length=max(b.seq_len for b in buckets),
                          max_vision_slots=largest // examples_per_group,
                          max_label_tokens=max(b.label_slots for b in buckets) or 1 << 30, **kw)


def _buckets(buckets, packed_buckets, process_count: int):
  packed = parse_packed_buckets(packed_buckets) if packed_buckets else None
  if packed and any(b.rows % process_count for b in packed):
    raise ValueError(f'packed buckets {list(packed)}: rows must divide over {process_count} processes')
  return (parse_buckets(buckets) if buckets else None), packed


@dataclasses.dataclass
class Stage1Examples:
  """Picklable example maker for grain workers."""
  tokenizer: QwenTokenizer
  settings: SequenceSettings
  model_config: ModelConfig

  def __post_init__(self):
    self.ids = TokenIds.of(self.tokenizer, self.settings.num_compression_tokens)

  def __call__(self, features, global_id):
    example = stage1_example(record_from_features(features), self.tokenizer, self.ids, self.settings,
                             lambda grids: example_slots(grids, self.model_config))
    check_example_contract(example, self.model_config, self.settings)
    return example


@dataclasses.dataclass
class Stage2Examples:
  tokenizer: QwenTokenizer
  settings: SequenceSettings
  model_config: ModelConfig
  sampler: SubsetBlockSampler
  sides: tuple = ('query', 'positive')

  def __post_init__(self):
    self.ids = TokenIds.of(self.tokenizer, self.settings.num_compression_tokens)

  def __call__(self, features, global_id):
    subset, _ = self.sampler.subset_of(global_id)
    record = pair_from_features(features, subset)
    slots = lambda grids: example_slots(grids, self.model_config)
    out = {name: None if getattr(record, name) is None else stage2_example(
        getattr(record, name), f'{record.id}:{name}', self.tokenizer, self.ids, self.settings, slots)
           for name in self.sides}
    for example in out.values():
      if example is not None:
        check_example_contract(example, self.model_config, self.settings)
    return out


def reference_subset_caps() -> dict[str, int]:
  """The per-subset caps of the reference's stage 2 (coma_jax/data/mmeb_v1_datasets.json)."""
  import json
  with open(os.path.join(os.path.dirname(__file__), 'mmeb_v1_datasets.json')) as f:
    return json.load(f)['stage2_subset_caps_used_by_the_reference']


def stage1_loader(data_dir: str, model_config: ModelConfig, tokenizer: QwenTokenizer, *, global_batch: int,
                  buckets, seed: int, examples_per_group: int = 1, start_step: int = 0,
                  end_step: int | None = None, num_workers: int = 0, process_index: int = 0,
                  process_count: int = 1, on_bad_record: str = 'skip', max_bad_fraction: float = 0.05,
                  split: str = 'train', pixel_dtype=np.float32, packed_buckets=None, max_per_row: int = 16,
                  **sequence_kw) -> GlobalBatchIterator:
  """Batches of stage1_qa's `split`: data steps start_step .. end_step - 1 (default: one epoch).
  `packed_buckets` [(rows, seq_len, vision_slots, label_slots), ...]: pack (`buckets` unused)."""
  buckets, packed = _buckets(buckets, packed_buckets, process_count)
  settings = sequence_settings(packed or buckets, 1 if packed else examples_per_group, **sequence_kw)
  sources = open_builder(data_dir, 'stage1_qa').as_data_source()
  if split not in sources:
    raise ValueError(f'stage1_qa under {data_dir} has no {split!r} split (it has {sorted(sources)})')
  source = sources[split]
  sampler = EpochSampler(len(source), global_batch, seed)
  reader = StepReader(source, sampler, Stage1Examples(tokenizer, settings, model_config),
                      process_index, process_count, on_bad_record)
  spec = BatchSpec(model_config, buckets, examples_per_group, settings.num_compression_tokens,
                   pixel_dtype=pixel_dtype, packed_buckets=packed, max_per_row=max_per_row,
                   process_index=process_index, process_count=process_count)
  return GlobalBatchIterator(reader, spec, start_step=start_step, num_workers=num_workers,
                             end_step=end_step if end_step is not None else sampler.steps_per_epoch,
                             max_bad_fraction=max_bad_fraction)


def stage2_loader(data_dir: str, model_config: ModelConfig, tokenizer: QwenTokenizer, *, global_batch: int,
                  buckets, seed: int, end_step: int, block_size: int = 64, caps=None, weights=None,
                  hard_negatives: bool = False, examples_per_group: int = 1, start_step: int = 0,
                  num_workers: int = 0, process_index: int = 0, process_count: int = 1,
                  on_bad_record: str = 'skip', max_bad_fraction: float = 0.05, pixel_dtype=np.float32,
                  packed_buckets=None, max_per_row: int = 16, **sequence_kw) -> GlobalBatchIterator:
  """Pairs of mmeb_train (see `stage1_loader` for packing: a packed row mixes the sides)."""
  buckets, packed = _buckets(buckets, packed_buckets, process_count)
  settings = sequence_settings(packed or buckets, 1 if packed else examples_per_group, **sequence_kw)
  builder = open_builder(data_dir, 'mmeb_train')
  names = builder.info.metadata.get('split_names', {})
  sources = builder.as_data_source()
  splits = sorted(sources)
  sizes = {names.get(s, s): len(sources[s]) for s in splits}
  from coma_jax.data.tfds_builders.base import split_name
  caps = {names.get(split_name(k), k): v for k, v in (caps or {}).items()}  # 'OK-VQA' or 'OK_VQA' alike
  sampler = SubsetBlockSampler(sizes, global_batch, block_size, seed, caps=caps, weights=weights)
  sides = ('query', 'positive', 'negative') if hard_negatives else ('query', 'positive')
  reader = StepReader(ConcatSource([sources[s] for s in splits]), sampler,
                      Stage2Examples(tokenizer, settings, model_config, sampler, sides),
                      process_index, process_count, on_bad_record)
  spec = BatchSpec(model_config, buckets, examples_per_group, settings.num_compression_tokens, sides=sides,
                   pixel_dtype=pixel_dtype, packed_buckets=packed, max_per_row=max_per_row,
                   process_index=process_index, process_count=process_count)
  return GlobalBatchIterator(reader, spec, start_step=start_step, end_step=end_step, num_workers=num_workers,
                             max_bad_fraction=max_bad_fraction)
