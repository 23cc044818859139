"""One step's examples -> its static batch (with 'example_ids': the global ids of this process's
examples, in order), unpacked (one example per row, a bucket per side) or
packed (several examples per row, first-fit decreasing; stage 2 mixes the sides in one row set).

Either way: each token carries its sequence id and offset (dropout keys), and each stage-2
sequence the index of the representation it makes (side x global example position), so the step
computes the same thing whatever the layout. Processes agree on the shape: the element-wise max of
their needs (unpacked), or the first packed bucket that fits on every process (packed).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from coma_jax.data.batching import Bucket, Needs, batch_stats, collate, collate_rows, needs_of, pick_bucket
from coma_jax.data.packing import Footprint, PackedBucket, footprint, pack, padding
from coma_jax.model.config import ModelConfig

SIDES = ('query', 'positive', 'negative')  # stage 2's sides, in the order their ids and indices use


def sequence_id(example_id: int, side: str) -> int:
  """A stage-2 sequence's dropout id (coma_jax.training.stage2.sequence_id)."""
  return example_id * len(SIDES) + SIDES.index(side)


def rep_index(side: str, position: int, num_examples: int) -> int:
  """A stage-2 sequence's representation (coma_jax.training.stage2.rep_index)."""
  return SIDES.index(side) * num_examples + position


def global_max(values: np.ndarray) -> np.ndarray:
  """Element-wise max over processes (identity with one process)."""
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(values)).max(axis=0)


@dataclasses.dataclass
class BatchSpec:
  """How examples become batches: per side (stage 1: one side 'inputs'; stage 2: query, ...).
  `packed_buckets` set: packing on (`buckets` and `examples_per_group` then unused)."""
  model_config: ModelConfig
  buckets: Sequence[Bucket]
  examples_per_group: int
  num_compression_tokens: int
  sides: Sequence[str] | None = None  # None: examples are single Examples
  pixel_dtype: Any = np.float32  # the model's compute dtype (bfloat16 halves the pixel bytes)
  packed_buckets: Sequence[PackedBucket] | None = None
  max_per_row: int = 16  # sequences per packed row (stage 2's representation slots per row)
  process_index: int = 0
  process_count: int = 1


def step_batch(spec: BatchSpec, examples: list, ids: Sequence[int]) -> tuple[dict, Any, dict]:
  """(batch, bucket, stats) of this process's examples of one step (global ids `ids`)."""
  if spec.packed_buckets is not None:
    return _packed(spec, examples, ids)
  if spec.sides is None:
    batch, bucket, stats = _unpacked_side(spec, examples, [int(i) for i in ids], None)
    return dict(batch, example_ids=np.asarray(ids, np.int32)), bucket, stats
  batch, buckets, stats = {}, {}, {}
  for side in spec.sides:
    batch[side], buckets[side], stats[side] = _unpacked_side(
        spec, [None if e is None else e.get(side) for e in examples], [int(i) for i in ids], side)
  batch['example_ids'] = np.asarray(ids, np.int32)
  return batch, buckets, stats


def _unpacked_side(spec: BatchSpec, examples, ids, side):
  needs = needs_of(examples, spec.model_config, spec.examples_per_group)
  bucket = pick_bucket(spec.buckets, Needs(*global_max(needs.as_array()).tolist()))
  first, total = spec.process_index * len(examples), len(examples) * spec.process_count
  out = collate(examples, spec.model_config, bucket, spec.examples_per_group, spec.num_compression_tokens,
                spec.pixel_dtype,
                sequence_ids=ids if side is None else [sequence_id(i, side) for i in ids],
                rep_index=range(first, first + len(examples)) if side is None else
                [rep_index(side, first + r, total) for r in range(len(examples))])
  stats = batch_stats(examples, bucket, spec.examples_per_group)
  # What each example needs of a row (host-side only: packing estimates, benchmarks).
  stats['footprints'] = [footprint(e, spec.model_config) for e in examples if e is not None]
  return out, bucket, stats


def _packed(spec: BatchSpec, examples, ids):
  first, total = spec.process_index * len(examples), len(examples) * spec.process_count
  seqs, seq_ids, reps = [], [], []
  for r, (e, gid) in enumerate(zip(examples, ids)):
    if e is None:
      continue
    for side in ([None] if spec.sides is None else spec.sides):
      ex = e if side is None else e.get(side)
      if ex is not None:
        seqs.append(ex)
        seq_ids.append(int(gid) if side is None else sequence_id(int(gid), side))
        reps.append(first + r if side is None else rep_index(side, first + r, total))
  fps = [footprint(e, spec.model_config) for e in seqs]
  bucket, rows = agree_on_packing(spec.packed_buckets, fps, seq_ids, spec.process_count, spec.max_per_row)
  local_rows = bucket.rows // spec.process_count
  out = collate_rows(seqs, rows + [[] for _ in range(local_rows - len(rows))], spec.model_config,
                     seq_len=bucket.seq_len, vision_slots=bucket.vision_slots, label_slots=bucket.label_slots,
                     rows_per_group=1, num_compression_tokens=spec.num_compression_tokens, sequence_ids=seq_ids,
                     rep_index=reps, slots_per_row=spec.max_per_row, pixel_dtype=spec.pixel_dtype)
  stats = dict(packed_stats(seqs, fps, bucket, local_rows), examples=sum(e is not None for e in examples))
  example_ids = np.asarray(ids, np.int32)
  if spec.sides is None:
    return dict(out, example_ids=example_ids), bucket, stats
  return {'packed': out, 'example_ids': example_ids}, bucket, stats


def agree_on_packing(buckets: Sequence[PackedBucket], fps: Sequence[Footprint], keys: Sequence[int],
                     process_count: int, max_per_row: int) -> tuple[PackedBucket, list[list[int]]]:
  """The first bucket (smallest first) whose rows hold every process's sequences, and this
  process's rows in it. A pure function of the step's sequences: resumes and reruns pack alike."""
  packings = [pack(b, fps, keys, b.rows // process_count, max_per_row) for b in buckets]
  fits = np.array([p is not None for p in packings], np.int64)
  agreed = 1 - global_max(1 - fits)  # fits on every process
  if not agreed.any():
    need = (max([f.tokens for f in fps] + [0]), max([f.vision_slots for f in fps] + [0]))
    raise ValueError(f'{len(fps)} sequences (largest: {need[0]} tokens, {need[1]} vision slots) fit no packed '
                     f'bucket of {list(buckets)} on every process; add a bucket with more rows')
  choice = int(np.argmax(agreed))
  return buckets[choice], packings[choice]


def packed_stats(seqs, fps, bucket: PackedBucket, local_rows: int) -> dict:
  """As `batch_stats`, for a packed batch (vision padding also split: window padding, slack);
  'sequences' counts what was packed (stage 2: every side)."""
  import collections
  from coma_jax.data.batching import CUT_KINDS
  cuts = collections.Counter()
  for e in seqs:
    cuts.update(e.cuts)
  pad = padding(fps, local_rows, bucket.seq_len, bucket.vision_slots)
  return {'examples': len(seqs), 'sequences': len(seqs), 'token_padding_waste': pad['token_padding'],
          'vision_padding_waste': (1.0 - sum(f.patches for f in fps) / (local_rows * bucket.vision_slots))
          if bucket.vision_slots else 0.0,
          'window_padding': pad['window_padding'], 'packing_slack': pad['packing_slack'],
          'cuts': {kind: cuts.get(kind, 0) for kind in CUT_KINDS}, 'footprints': fps}
