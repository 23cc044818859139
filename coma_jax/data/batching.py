"""Static-shape batches: buckets, padding, the model's input contract and the loss-side arrays.

A bucket fixes every shape of a batch: the text length, the vision slots of each vision group
(one row of `vision_slots` slots per group, which is also its patch budget) and the label slots
per row. A batch takes the smallest bucket that fits all of its examples, so the number of
distinct batch shapes is at most the number of buckets.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

import numpy as np

from coma_jax.data.sequences import IGNORE, ROLE_COMPRESSION, ROLE_DIALOGUE, ROLE_PAD, Example, SequenceSettings
from coma_jax.model.config import ModelConfig
from coma_jax.model.inputs import build_grouped_inputs, build_model_inputs
from coma_jax.model.rope_index import get_rope_index
from coma_jax.model.vision_layout import build_vision_layout, slots_needed


@dataclasses.dataclass(frozen=True, order=True)
class Bucket:
  seq_len: int
  vision_slots: int   # per vision group: slots of its one vision row, and its patch budget
  label_slots: int = 0  # per row: supervised positions (stage 1); 0 for stage 2


def parse_buckets(spec: Sequence) -> tuple[Bucket, ...]:
  buckets = tuple(sorted(b if isinstance(b, Bucket) else Bucket(*b) for b in spec))
  if not buckets:
    raise ValueError('at least one bucket is needed')
  return buckets


def example_slots(grids, cfg: ModelConfig) -> int:
  return sum(slots_needed(grids, cfg.vision))


def check_example_contract(ex: Example, cfg: ModelConfig, settings: SequenceSettings) -> None:
  """The per-example part of what `collate` runs (rope index, vision layout, budgets), run in the
  worker on each new example, so that collate is total on the examples that pass.

  Data problems were BadRecords before this point; a failure here is a bug in coma_jax, so it
  raises a RuntimeError naming the record rather than being skipped.
  """
  try:
    get_rope_index(ex.tokens[None], None, image_grid_thw=ex.grids, image_token_id=cfg.image_token_id,
                   video_token_id=cfg.video_token_id, spatial_merge_size=cfg.vision.spatial_merge_size,
                   tokens_per_second=cfg.vision.tokens_per_second)
    if ex.grids:
      build_vision_layout(ex.grids, cfg.vision)
    slots = example_slots(ex.grids, cfg)
    problems = [
        f'{len(ex.tokens)} tokens > max_length {settings.max_length}' if len(ex.tokens) > settings.max_length else '',
        f'{ex.num_labels} labels > {settings.max_label_tokens}' if ex.num_labels > settings.max_label_tokens else '',
        f'{slots} vision slots > {settings.max_vision_slots}' if slots > settings.max_vision_slots else '',
        'compression tokens' if int((ex.roles == ROLE_COMPRESSION).sum()) != settings.num_compression_tokens else '',
        'lengths' if not len(ex.tokens) == len(ex.roles) == len(ex.labels) else '',
        'video placeholders' if (ex.tokens == cfg.video_token_id).any() else '']
    if any(problems):
      raise ValueError(', '.join(p for p in problems if p))
  except ValueError as e:
    raise RuntimeError(f'example {ex.id!r} breaks the batch contract (a bug in coma_jax, not bad data): {e}') from e


@dataclasses.dataclass(frozen=True)
class Needs:
  """What a set of rows needs; combined across processes with an element-wise max."""
  seq_len: int
  vision_slots: int
  label_slots: int

  def as_array(self) -> np.ndarray:
    return np.array([self.seq_len, self.vision_slots, self.label_slots], np.int64)


def needs_of(examples: Sequence[Example | None], cfg: ModelConfig, examples_per_group: int) -> Needs:
  real = [e for e in examples if e is not None]
  groups = [examples[i:i + examples_per_group] for i in range(0, len(examples), examples_per_group)]
  slots = max([example_slots([g for e in grp if e is not None for g in e.grids], cfg) for grp in groups] + [0])
  return Needs(seq_len=max([len(e.tokens) for e in real] + [1]), vision_slots=slots,
               label_slots=max([e.num_labels for e in real] + [0]))


def pick_bucket(buckets: Sequence[Bucket], needs: Needs) -> Bucket:
  for b in buckets:
    if b.seq_len >= needs.seq_len and b.vision_slots >= needs.vision_slots and b.label_slots >= needs.label_slots:
      return b
  raise ValueError(f'no bucket fits {needs}; buckets: {list(buckets)} (the largest bucket must hold '
                   f'the largest example times examples_per_group)')


def collate(examples: Sequence[Example | None], cfg: ModelConfig, bucket: Bucket,
            examples_per_group: int, num_compression_tokens: int, pixel_dtype=np.float32) -> dict:
  """Pads examples (None = a skipped bad record: an all-padding row) into one static batch.

  Returns numpy arrays only (a pytree whose structure is fixed by the bucket, so it goes into a
  jitted step as it is): 'inputs' (ModelInputs), 'roles', 'labels' (HF style, IGNORE = -100),
  'label_positions' / 'label_targets' (B, label_slots): the positions whose logits predict a
  supervised token and that token (-1 = padding), 'compression_positions' (B, K),
  'example_valid' (B,), 'split_index' / 'split_slot' (the stage-1 mask's gathers). Host-side
  statistics are `batch_stats`. `pixel_dtype`: the pixel patches' (the model's compute dtype).
  """
  b, length, k = len(examples), bucket.seq_len, num_compression_tokens
  if b % examples_per_group:
    raise ValueError(f'{b} examples do not split into groups of {examples_per_group}')
  ids = np.zeros((b, length), np.int64)
  mask = np.zeros((b, length), bool)
  roles = np.full((b, length), ROLE_PAD, np.int8)
  labels = np.full((b, length), IGNORE, np.int32)
  label_positions = np.full((b, bucket.label_slots), -1, np.int32)
  label_targets = np.full((b, bucket.label_slots), -1, np.int32)
  compression = np.zeros((b, k), np.int32)
  valid = np.zeros(b, bool)
  for row, ex in enumerate(examples):
    if ex is None:
      continue
    n = len(ex.tokens)
    if n > length:
      raise ValueError(f'example {ex.id!r} has {n} tokens, more than the bucket length {length}')
    ids[row, :n], mask[row, :n], roles[row, :n], labels[row, :n] = ex.tokens, True, ex.roles, ex.labels
    supervised = np.flatnonzero(ex.labels != IGNORE)
    supervised = supervised[supervised > 0]  # token 0 has no preceding position to predict it
    if len(supervised) > bucket.label_slots and bucket.label_slots:
      raise ValueError(f'example {ex.id!r} has {len(supervised)} labels, more than {bucket.label_slots}')
    if bucket.label_slots:
      label_positions[row, :len(supervised)] = supervised - 1
      label_targets[row, :len(supervised)] = ex.tokens[supervised]
    positions = np.flatnonzero(ex.roles == ROLE_COMPRESSION)
    if len(positions) != k:
      raise ValueError(f'example {ex.id!r} has {len(positions)} compression tokens, expected {k}')
    compression[row] = positions
    valid[row] = True

  groups = b // examples_per_group
  if bucket.vision_slots:  # every batch keeps its vision arrays (empty ones too): static shapes
    grouped = []
    for g in range(groups):
      members = [e for e in examples[g * examples_per_group:(g + 1) * examples_per_group] if e is not None]
      grouped.append(([i for e in members for i in e.images], [grid for e in members for grid in e.grids]))
    inputs = build_grouped_inputs(cfg, ids, mask, grouped, seq_len=length, patch_budget=bucket.vision_slots,
                                  vision_rows=1, vision_row_len=bucket.vision_slots, pixel_dtype=pixel_dtype)
  else:
    inputs = build_model_inputs(cfg, ids, mask, seq_len=length)
  split_index, split_slot = split_indices(roles)
  return {'inputs': inputs, 'roles': roles, 'labels': labels, 'label_positions': label_positions,
          'label_targets': label_targets, 'compression_positions': compression, 'example_valid': valid,
          'split_index': split_index, 'split_slot': split_slot}


CUT_KINDS = ('dropped_turns', 'trimmed_input_text', 'trimmed_text')


def batch_stats(examples: Sequence[Example | None], bucket: Bucket, examples_per_group: int) -> dict:
  """Host-side statistics of one collated batch (for the metrics; never sent to the device):
  examples, token and vision padding waste, truncation cuts by kind (fixed keys)."""
  real = [e for e in examples if e is not None]
  tokens = sum(len(e.tokens) for e in real)
  groups = len(examples) // examples_per_group
  cuts = collections.Counter()
  for e in real:
    cuts.update(e.cuts)
  return {
      'examples': len(real),
      'token_padding_waste': 1.0 - tokens / (len(examples) * bucket.seq_len),
      'vision_padding_waste': (1.0 - sum(e.num_patches for e in real) / (groups * bucket.vision_slots))
      if bucket.vision_slots else 0.0,
      'cuts': {kind: cuts.get(kind, 0) for kind in CUT_KINDS},
  }


def split_indices(roles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Host side. split_index (B, L): the source position of each slot of call 2 (-1 = empty);
  split_slot (B, L): each dialogue position's slot in call 2 (-1 elsewhere)."""
  b, length = roles.shape
  split_index = np.full((b, length), -1, np.int32)
  split_slot = np.full((b, length), -1, np.int32)
  for r in range(b):
    comp = np.flatnonzero(roles[r] == ROLE_COMPRESSION)
    if len(comp) == 0:
      continue
    start, end = comp[0], int(np.flatnonzero(roles[r] != ROLE_PAD).max()) + 1
    split_index[r, :end - start] = np.arange(start, end)
    dialogue = np.flatnonzero(roles[r] == ROLE_DIALOGUE)
    split_slot[r, dialogue] = dialogue - start
  return split_index, split_slot

