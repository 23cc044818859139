"""Global-batch samplers: step -> the global example ids of that step, a pure function of the seed.

The iterator state is just the step (the position in the global sequence), so it does not depend
on the number of processes: a run saved with 2 processes resumes with 1 (or the reverse) on the
identical next global batch. Each process then reads only its contiguous slice.
"""
from __future__ import annotations

import functools
from typing import Mapping

import numpy as np


def process_slice(global_ids: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
  if len(global_ids) % process_count:
    raise ValueError(f'global batch {len(global_ids)} does not split over {process_count} processes')
  n = len(global_ids) // process_count
  return global_ids[process_index * n:(process_index + 1) * n]


class EpochSampler:
  """Stage 1: a fresh seeded permutation per epoch; the last partial batch of an epoch is dropped."""

  def __init__(self, num_examples: int, global_batch: int, seed: int):
    if num_examples < global_batch:
      raise ValueError(f'{num_examples} examples are fewer than one global batch of {global_batch}')
    self.num_examples, self.global_batch, self.seed = num_examples, global_batch, seed
    self.steps_per_epoch = num_examples // global_batch

  @functools.lru_cache(maxsize=2)
  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

  def batch_ids(self, step: int) -> np.ndarray:
    epoch, i = divmod(step, self.steps_per_epoch)
    return self._permutation(epoch)[i * self.global_batch:(i + 1) * self.global_batch]


class SubsetBlockSampler:
  """Stage 2: blocks of `block_size` consecutive examples, each block from one subset.

  A block's subset is drawn with probability proportional to the subset weights; within a
  subset, examples come in a seeded order (reshuffled each pass) over at most `cap` of them.
  Global id = offset of the subset + index inside it (subsets concatenated in the given order).
  """
  CHUNK = 4096  # blocks whose subsets are drawn together

  def __init__(self, subset_sizes: Mapping[str, int], global_batch: int, block_size: int, seed: int,
               caps: Mapping[str, int] | None = None, weights: Mapping[str, float] | None = None):
    if global_batch % block_size:
      raise ValueError(f'global batch {global_batch} is not a multiple of the block size {block_size}')
    self.names = list(subset_sizes)
    self.sizes = np.array([subset_sizes[n] for n in self.names])
    self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
    caps = caps or {}
    self.used = np.array([min(subset_sizes[n], caps.get(n, subset_sizes[n])) for n in self.names])
    w = np.array([float((weights or {}).get(n, 1.0)) for n in self.names])
    w = np.where(self.used > 0, w, 0.0)
    if w.sum() <= 0:
      raise ValueError('no subset has examples and a positive weight')
    self.p = w / w.sum()
    self.global_batch, self.block_size, self.seed = global_batch, block_size, seed
    self.blocks_per_step = global_batch // block_size
    self._chunks: dict[int, np.ndarray] = {}
    self._counts_before: dict[int, np.ndarray] = {0: np.zeros(len(self.names), np.int64)}

  def _chunk(self, c: int) -> np.ndarray:
    if c not in self._chunks:
      self._chunks[c] = np.random.default_rng([self.seed, 1, c]).choice(len(self.names), self.CHUNK, p=self.p)
    return self._chunks[c]

  def _blocks_before(self, c: int) -> np.ndarray:
    """How many blocks each subset had before chunk c (cumulated chunk by chunk, memoised)."""
    last = max(k for k in self._counts_before if k <= c)
    counts = self._counts_before[last].copy()
    for k in range(last, c):
      counts += np.bincount(self._chunk(k), minlength=len(self.names))
      self._counts_before[k + 1] = counts.copy()
    return counts

  @functools.lru_cache(maxsize=64)
  def _order(self, subset: int, epoch: int) -> np.ndarray:
    chosen = np.random.default_rng([self.seed, 2, subset]).permutation(self.sizes[subset])[:self.used[subset]]
    return np.random.default_rng([self.seed, 3, subset, epoch]).permutation(chosen)

  def block_subsets(self, step: int) -> np.ndarray:
    first = step * self.blocks_per_step
    return np.array([self._chunk(j // self.CHUNK)[j % self.CHUNK]
                     for j in range(first, first + self.blocks_per_step)])

  def batch_ids(self, step: int) -> np.ndarray:
    first = step * self.blocks_per_step
    c = first // self.CHUNK
    counts = self._blocks_before(c) + np.bincount(self._chunk(c)[:first % self.CHUNK], minlength=len(self.names))
    ids = []
    for subset in self.block_subsets(step):
      start = counts[subset] * self.block_size
      counts[subset] += 1
      n = self.used[subset]
      for pos in range(start, start + self.block_size):
        epoch, i = divmod(pos, n)
        ids.append(self.offsets[subset] + self._order(subset, epoch)[i])
    return np.asarray(ids, np.int64)

  def subset_of(self, global_id: int) -> tuple[str, int]:
    s = int(np.searchsorted(self.offsets, global_id, side='right') - 1)
    return self.names[s], int(global_id - self.offsets[s])
