"""Sequence packing on the host: which examples share a row (first-fit decreasing), and the
padding a packed batch leaves.

A packed bucket is (rows, seq_len, vision_slots, label_slots): every row holds whole examples
whose tokens, vision slots (whole attention windows per image) and supervised labels fit the row's
budgets. The packing is a pure function of the examples' footprints and keys (their global ids),
so every process and every resume packs a step the same way.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from coma_jax.data.batching import example_slots


@dataclasses.dataclass(frozen=True)
class Footprint:
  """What one example needs of a row."""
  tokens: int
  vision_slots: int  # whole windows: what the vision layout reserves
  patches: int       # real patches (vision_slots - patches is window padding)
  labels: int


@dataclasses.dataclass(frozen=True)
class PackedBucket:
  """A packed batch's shape: `rows` rows (over all processes) of `seq_len` tokens, each row its own
  vision group of `vision_slots` slots, with `label_slots` supervised positions (stage 1)."""
  rows: int
  seq_len: int
  vision_slots: int
  label_slots: int = 0


def parse_packed_buckets(spec: Sequence) -> tuple[PackedBucket, ...]:
  buckets = tuple(sorted((b if isinstance(b, PackedBucket) else PackedBucket(*b) for b in spec),
                         key=lambda b: (b.rows * b.seq_len, b.rows * b.vision_slots, b.label_slots)))
  if not buckets:
    raise ValueError('at least one packed bucket is needed')
  return buckets


def footprint(example, model_config) -> Footprint:
  return Footprint(len(example.tokens), example_slots(example.grids, model_config), example.num_patches,
                   example.num_labels)


def first_fit_decreasing(footprints: Sequence[Footprint], keys: Sequence[int], *, seq_len: int,
                         vision_slots: int, label_slots: int, max_per_row: int | None = None) -> list[list[int]]:
  """Rows as lists of indices into `footprints`, each row in ascending key order.

  Examples go largest first (tokens, then vision slots, then labels; ties by key) into the first
  row with room in every budget (and fewer than `max_per_row` examples). An example that fits no
  empty row is an error naming its key.
  """
  order = sorted(range(len(footprints)), key=lambda i: (-footprints[i].tokens, -footprints[i].vision_slots,
                                                        -footprints[i].labels, keys[i]))
  budgets = (seq_len, vision_slots, label_slots)
  rows: list[list[int]] = []
  used: list[list[int]] = []
  for i in order:
    need = (footprints[i].tokens, footprints[i].vision_slots, footprints[i].labels)
    if any(n > b for n, b in zip(need, budgets)):
      raise ValueError(f'example {keys[i]} needs (tokens, vision slots, labels) {need}, more than a '
                       f'row holds {budgets}')
    for row, room in zip(rows, used):
      if (max_per_row is None or len(row) < max_per_row) and all(u + n <= b for u, n, b in zip(room, need, budgets)):
        row.append(i)
        room[:] = [u + n for u, n in zip(room, need)]
        break
    else:
      rows.append([i])
      used.append(list(need))
  return [sorted(row, key=lambda i: keys[i]) for row in rows]


def pack(bucket: PackedBucket, footprints: Sequence[Footprint], keys: Sequence[int], rows: int,
         max_per_row: int | None = None) -> list[list[int]] | None:
  """The examples in at most `rows` rows of `bucket` (first-fit decreasing), or None."""
  try:
    packed = first_fit_decreasing(footprints, keys, seq_len=bucket.seq_len, vision_slots=bucket.vision_slots,
                                  label_slots=bucket.label_slots, max_per_row=max_per_row)
  except ValueError:
    return None
  return packed if len(packed) <= rows else None


def padding(footprints: Sequence[Footprint], rows: int, seq_len: int, vision_slots: int) -> dict:
  """Token padding, and vision padding split into window padding (whole windows around each
  image: packing cannot remove it) and packing slack (slots no example uses), as fractions of the
  batch's slots."""
  tokens = sum(f.tokens for f in footprints)
  slots = sum(f.vision_slots for f in footprints)
  patches = sum(f.patches for f in footprints)
  total_slots = rows * vision_slots
  return {'token_padding': 1.0 - tokens / (rows * seq_len),
          'window_padding': (slots - patches) / total_slots if total_slots else 0.0,
          'packing_slack': 1.0 - slots / total_slots if total_slots else 0.0}
