"""Ready-made loaders for the two stages, over built TFDS datasets (`build_tfds.py`)."""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import tensorflow_datasets as tfds

from coma_jax.data.batching import Bucket, example_slots, parse_buckets
from coma_jax.data.pipeline import BatchSpec, ConcatSource, GlobalBatchIterator, StepReader
from coma_jax.data.sampler import EpochSampler, SubsetBlockSampler
from coma_jax.data.sequences import SequenceSettings, TokenIds, stage1_example, stage2_example
from coma_jax.data.tfds_builders.mmeb import pair_from_features
from coma_jax.data.tfds_builders.stage1_qa import record_from_features
from coma_jax.data.tokenizer import QwenTokenizer
from coma_jax.model.config import ModelConfig


def open_builder(data_dir: str, name: str):
  """The newest built version of dataset `name` under data_dir."""
  root = os.path.join(data_dir, name)
  versions = sorted(v for v in os.listdir(root) if os.path.isdir(os.path.join(root, v))) if os.path.isdir(root) else []
  if not versions:
    raise FileNotFoundError(f'no built {name} dataset under {data_dir}; run python -m coma_jax.data.build_tfds {name}')
  return tfds.builder_from_directory(os.path.join(root, versions[-1]))


def sequence_settings(buckets: Sequence[Bucket], **kw) -> SequenceSettings:
  """Settings whose limits are the largest bucket's, so every valid example fits some bucket."""
  return SequenceSettings(max_length=max(b.seq_len for b in buckets),
                          max_vision_slots=max(b.vision_slots for b in buckets),
                          max_label_tokens=max(b.label_slots for b in buckets) or 1 << 30, **kw)


@dataclasses.dataclass
class Stage1Examples:
  """Picklable example maker for grain workers."""
  tokenizer: QwenTokenizer
  settings: SequenceSettings
  model_config: ModelConfig

  def __post_init__(self):
    self.ids = TokenIds.of(self.tokenizer, self.settings.num_compression_tokens)

  def __call__(self, features, global_id):
    return stage1_example(record_from_features(features), self.tokenizer, self.ids, self.settings,
                          lambda grids: example_slots(grids, self.model_config))


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
    return {name: None if getattr(record, name) is None else stage2_example(
        getattr(record, name), f'{record.id}:{name}', self.tokenizer, self.ids, self.settings, slots)
            for name in self.sides}


def stage1_loader(data_dir: str, model_config: ModelConfig, tokenizer: QwenTokenizer, *, global_batch: int,
                  buckets, seed: int, examples_per_group: int = 1, start_step: int = 0,
                  num_steps: int | None = None, num_workers: int = 0, process_index: int = 0,
                  process_count: int = 1, on_bad_record: str = 'skip', **sequence_kw) -> GlobalBatchIterator:
  buckets = parse_buckets(buckets)
  settings = sequence_settings(buckets, **sequence_kw)
  source = open_builder(data_dir, 'stage1_qa').as_data_source()['train']
  sampler = EpochSampler(len(source), global_batch, seed)
  reader = StepReader(source, sampler, Stage1Examples(tokenizer, settings, model_config),
                      process_index, process_count, on_bad_record)
  spec = BatchSpec(model_config, buckets, examples_per_group, settings.num_compression_tokens)
  return GlobalBatchIterator(reader, spec, start_step=start_step, num_workers=num_workers,
                             num_steps=num_steps if num_steps is not None else sampler.steps_per_epoch)


def stage2_loader(data_dir: str, model_config: ModelConfig, tokenizer: QwenTokenizer, *, global_batch: int,
                  buckets, seed: int, num_steps: int, block_size: int = 64, caps=None, weights=None,
                  hard_negatives: bool = False, examples_per_group: int = 1, start_step: int = 0,
                  num_workers: int = 0, process_index: int = 0, process_count: int = 1,
                  on_bad_record: str = 'skip', **sequence_kw) -> GlobalBatchIterator:
  buckets = parse_buckets(buckets)
  settings = sequence_settings(buckets, **sequence_kw)
  builder = open_builder(data_dir, 'mmeb_train')
  names = builder.info.metadata.get('split_names', {})
  sources = builder.as_data_source()
  splits = sorted(sources)
  sizes = {names.get(s, s): len(sources[s]) for s in splits}
  sampler = SubsetBlockSampler(sizes, global_batch, block_size, seed, caps=caps, weights=weights)
  sides = ('query', 'positive', 'negative') if hard_negatives else ('query', 'positive')
  reader = StepReader(ConcatSource([sources[s] for s in splits]), sampler,
                      Stage2Examples(tokenizer, settings, model_config, sampler, sides),
                      process_index, process_count, on_bad_record)
  spec = BatchSpec(model_config, buckets, examples_per_group, settings.num_compression_tokens, sides=sides)
  return GlobalBatchIterator(reader, spec, start_step=start_step, num_steps=num_steps, num_workers=num_workers)
