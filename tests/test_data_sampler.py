"""Global-batch samplers: deterministic, process-count independent, subset blocks, caps, weights."""
import json
import os

import numpy as np
import pytest

from coma_jax.data.sampler import EpochSampler, SubsetBlockSampler, process_slice

CAPS = json.load(open(os.path.join(os.path.dirname(__file__), '..', 'coma_jax', 'data', 'mmeb_v1_datasets.json')))[
    'stage2_subset_caps_used_by_the_reference']


def test_epoch_sampler_is_a_permutation_per_epoch():
  s = EpochSampler(103, 10, seed=3)
  assert s.steps_per_epoch == 10
  epoch0 = np.concatenate([s.batch_ids(i) for i in range(10)])
  assert len(set(epoch0.tolist())) == 100
  assert not np.array_equal(s.batch_ids(0), s.batch_ids(10))  # reshuffled
  np.testing.assert_array_equal(EpochSampler(103, 10, seed=3).batch_ids(17), s.batch_ids(17))
  assert not np.array_equal(EpochSampler(103, 10, seed=4).batch_ids(0), s.batch_ids(0))


@pytest.mark.parametrize('processes', [1, 2, 4])
def test_process_slices_tile_the_global_batch(processes):
  s = EpochSampler(1000, 16, seed=0)
  for step in (0, 5, 63):
    ids = s.batch_ids(step)
    np.testing.assert_array_equal(np.concatenate([process_slice(ids, p, processes) for p in range(processes)]), ids)


def test_subset_blocks_caps_and_resume():
  sizes = {'a': 500, 'b': 120, 'c': 30, 'empty': 0}
  s = SubsetBlockSampler(sizes, global_batch=32, block_size=8, seed=1, caps={'a': 100})
  seen = {n: set() for n in sizes}
  for step in range(40):
    ids = s.batch_ids(step)
    names = [s.subset_of(i)[0] for i in ids]
    for b in range(4):  # each block of 8 comes from one subset
      assert len(set(names[b * 8:(b + 1) * 8])) == 1
    for i in ids:
      name, local = s.subset_of(i)
      seen[name].add(local)
  assert len(seen['a']) <= 100 and not seen['empty']  # cap respected; empty subset never drawn
  assert seen['c'] == set(range(30))
  # A fresh sampler (a resumed run) computes step 39 without replaying: same ids.
  np.testing.assert_array_equal(SubsetBlockSampler(sizes, 32, 8, seed=1, caps={'a': 100}).batch_ids(39), ids)
  # Subsets are roughly equally likely (the reference default).
  counts = np.bincount(np.concatenate([s.block_subsets(i) for i in range(500)]), minlength=4)
  assert counts[3] == 0 and counts[:3].min() > 0.25 * counts[:3].sum()


def test_weights_and_reference_caps():
  s = SubsetBlockSampler({'a': 50, 'b': 50}, 8, 4, seed=0, weights={'a': 1.0, 'b': 0.0})
  assert all(s.subset_of(i)[0] == 'a' for step in range(20) for i in s.batch_ids(step))
  assert CAPS['ImageNet_1K'] == 100000 and len(CAPS) == 20
  with pytest.raises(ValueError, match='not a multiple of the block size'):
    SubsetBlockSampler({'a': 10}, 10, 4, seed=0)
