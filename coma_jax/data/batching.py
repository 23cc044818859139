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
  worker on each new example, so that collate is total on the examples that pass. The M-RoPE
  positions it computes stay on the example: collate places them (no second computation).

  Data problems were BadRecords before this point; a failure here is a bug in coma_jax, so it
  raises a RuntimeError naming the record rather than being skipped.
  """
  try:
    ex.positions = example_positions(ex, cfg)
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


def power_of_two_bucket(n: int, smallest: int) -> int:
  """The next power of two from `smallest` that holds n: few distinct shapes, so few compilations
  (inference batches: the embedder, the generator)."""
  size = smallest
  while size < n:
    size *= 2
  return size


def pick_bucket(buckets: Sequence[Bucket], needs: Needs) -> Bucket:
  for b in buckets:
    if b.seq_len >= needs.seq_len and b.vision_slots >= needs.vision_slots and b.label_slots >= needs.label_slots:
      return b
  raise ValueError(f'no bucket fits {needs}; buckets: {list(buckets)} (the largest bucket must hold '
                   f'the largest example times examples_per_group)')


def collate(examples: Sequence[Example | None], cfg: ModelConfig, bucket: Bucket,
            examples_per_group: int, num_compression_tokens: int, pixel_dtype=np.float32,
            sequence_ids=None, rep_index=None) -> dict:
  """Unpacked: example i (None = a skipped bad record: an all-padding row) alone in row i, and
  `examples_per_group` rows share one vision group. See `collate_rows` for the arrays;
  `sequence_ids` default to the row numbers, `rep_index` to the row numbers."""
  b = len(examples)
  if b % examples_per_group:
    raise ValueError(f'{b} examples do not split into groups of {examples_per_group}')
  real = [e for e in examples if e is not None]
  rows, n = [], 0
  for e in examples:
    rows.append([] if e is None else [n])
    n += e is not None
  pick = lambda values, default: [int(v) for v, e in zip(default if values is None else values, examples)
                                  if e is not None]
  return collate_rows(real, rows, cfg, seq_len=bucket.seq_len, vision_slots=bucket.vision_slots,
                      label_slots=bucket.label_slots, rows_per_group=examples_per_group,
                      num_compression_tokens=num_compression_tokens, sequence_ids=pick(sequence_ids, range(b)),
                      rep_index=pick(rep_index, range(b)), slots_per_row=1, pixel_dtype=pixel_dtype)


def collate_rows(examples: Sequence[Example], rows: Sequence[Sequence[int]], cfg: ModelConfig, *, seq_len: int,
                 vision_slots: int, label_slots: int, rows_per_group: int, num_compression_tokens: int,
                 sequence_ids: Sequence[int], rep_index: Sequence[int], slots_per_row: int,
                 pixel_dtype=np.float32) -> dict:
  """Examples placed into rows (`rows[r]`: indices into `examples`, in order; [] = a padding row)
  as one static batch. Every example keeps its own positions (M-RoPE restarts at 0), attention
  segment, labels and stage-1 tail; `rows_per_group` consecutive rows share a vision group of
  `vision_slots` slots (its patch budget), with each image's windows its own.

  Returns numpy arrays only (a pytree whose structure is fixed by the shapes, so it goes into a
  jitted step as it is): 'inputs' (ModelInputs, with segment_ids), 'roles', 'labels' (HF style,
  IGNORE = -100), 'label_positions' / 'label_targets' (B, label_slots): the positions whose logits
  predict a supervised token and that token (-1 = padding), 'label_counts' (B, label_slots): the
  supervised tokens of that label's example (for per-example means), 'labelled_examples' (B,):
  examples with labels per row, 'compression_positions' (B, slots_per_row, K) and 'rep_index'
  (B, slots_per_row): where each sequence's K tokens are and which representation they make (-1 =
  empty slot), 'example_valid' (B,): the row holds an example, 'split_index' / 'split_slot' /
  'split_segment' (the stage-1 mask's second call), 'token_ids' / 'token_offsets' (B, L): each
  token's sequence id and offset in it (dropout keys). `pixel_dtype`: the pixel patches'.
  """
  b, length, k = len(rows), seq_len, num_compression_tokens
  if b % rows_per_group:
    raise ValueError(f'{b} rows do not split into vision groups of {rows_per_group}')
  ids = np.zeros((b, length), np.int64)
  mask = np.zeros((b, length), bool)
  segments = np.zeros((b, length), np.int32)
  positions = np.zeros((3, b, length), np.int64)
  roles = np.full((b, length), ROLE_PAD, np.int8)
  labels = np.full((b, length), IGNORE, np.int32)
  label_positions = np.full((b, label_slots), -1, np.int32)
  label_targets = np.full((b, label_slots), -1, np.int32)
  label_counts = np.zeros((b, label_slots), np.int32)
  labelled = np.zeros(b, np.int32)
  compression = np.zeros((b, slots_per_row, k), np.int32)
  reps = np.full((b, slots_per_row), -1, np.int32)
  token_ids = np.full((b, length), -1, np.int32)
  token_offsets = np.zeros((b, length), np.int32)
  split_index = np.full((b, length), -1, np.int32)
  split_slot = np.full((b, length), -1, np.int32)
  split_segment = np.zeros((b, length), np.int32)
  for row, members in enumerate(rows):
    if len(members) > slots_per_row:
      raise ValueError(f'row {row} holds {len(members)} sequences, more than {slots_per_row}')
    start = tail = used_labels = 0
    for j, i in enumerate(members):
      ex = examples[i]
      n = len(ex.tokens)
      if start + n > length:
        raise ValueError(f'example {ex.id!r} ({n} tokens) does not fit row {row} of length {length} '
                         f'({start} tokens already used)')
      span = slice(start, start + n)
      ids[row, span], mask[row, span], roles[row, span], labels[row, span] = ex.tokens, True, ex.roles, ex.labels
      segments[row, span], token_ids[row, span], token_offsets[row, span] = j + 1, sequence_ids[i], np.arange(n)
      positions[:, row, span] = example_positions(ex, cfg)
      supervised = np.flatnonzero(ex.labels != IGNORE)
      supervised = supervised[supervised > 0]  # token 0 has no preceding position to predict it
      if label_slots:  # stage 2 has neither labels nor label slots
        if used_labels + len(supervised) > label_slots:
          raise ValueError(f'example {ex.id!r} has {len(supervised)} labels, more than row {row} has left '
                           f'({label_slots - used_labels} of {label_slots})')
        where = slice(used_labels, used_labels + len(supervised))
        label_positions[row, where] = start + supervised - 1
        label_targets[row, where] = ex.tokens[supervised]
        label_counts[row, where] = len(supervised)
        used_labels += len(supervised)
        labelled[row] += len(supervised) > 0
      comp = np.flatnonzero(ex.roles == ROLE_COMPRESSION)
      if len(comp) != k:
        raise ValueError(f'example {ex.id!r} has {len(comp)} compression tokens, expected {k}')
      compression[row, j], reps[row, j] = start + comp, rep_index[i]
      # The stage-1 mask's second call: this example's [compression + dialogue] tail, its own segment.
      dialogue = np.flatnonzero(ex.roles == ROLE_DIALOGUE)
      first = comp[0] if k else dialogue[0] if dialogue.size else n  # K = 0 (stage 0): the dialogue
      size = n - first
      split_index[row, tail:tail + size] = start + np.arange(first, n)
      split_segment[row, tail:tail + size] = j + 1
      split_slot[row, start + dialogue] = tail + dialogue - first
      start, tail = start + n, tail + size

  groups = b // rows_per_group
  if vision_slots:  # every batch keeps its vision arrays (empty ones too): static shapes
    grouped = []
    for g in range(groups):
      members = [examples[i] for r in rows[g * rows_per_group:(g + 1) * rows_per_group] for i in r]
      grouped.append(([im for e in members for im in e.images], [grid for e in members for grid in e.grids]))
    inputs = build_grouped_inputs(cfg, ids, mask, grouped, seq_len=length, patch_budget=vision_slots,
                                  vision_rows=1, vision_row_len=vision_slots, pixel_dtype=pixel_dtype,
                                  positions=positions, segment_ids=segments)
  else:
    if any(e.grids for e in examples):
      raise ValueError('a batch without vision slots holds examples with images')
    inputs = build_model_inputs(cfg, ids, mask, seq_len=length).replace(
        positions=positions.astype(np.int32), segment_ids=segments)
  return {'inputs': inputs, 'roles': roles, 'labels': labels, 'label_positions': label_positions,
          'label_targets': label_targets, 'label_counts': label_counts, 'labelled_examples': labelled,
          'compression_positions': compression, 'rep_index': reps, 'example_valid': reps[:, 0] >= 0,
          'split_index': split_index, 'split_slot': split_slot, 'split_segment': split_segment,
          'token_ids': token_ids, 'token_offsets': token_offsets}


def example_positions(ex: Example, cfg: ModelConfig) -> np.ndarray:
  """(3, n) M-RoPE positions of one example on its own (as in an unpacked row): those the
  worker's contract check kept, else computed."""
  if ex.positions is not None:
    return ex.positions
  return get_rope_index(ex.tokens[None], None, image_grid_thw=ex.grids, image_token_id=cfg.image_token_id,
                        video_token_id=cfg.video_token_id, spatial_merge_size=cfg.vision.spatial_merge_size,
                        tokens_per_second=cfg.vision.tokens_per_second)[:, 0].astype(np.int32)


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
