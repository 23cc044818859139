"""Checkpoint retention (latest + best), half-written and damaged checkpoints, collapse warnings."""
import logging
import os
import shutil

import jax.numpy as jnp
import numpy as np

from coma_jax.training.checkpoint import Checkpoints
from coma_jax.training.loop import _collapse_warning, _restore_latest
from coma_jax.training.train_state import TrainState


def state(value: float) -> TrainState:
  return TrainState(step=jnp.int32(0), params={'w': jnp.full((4,), value)}, frozen={},
                    opt_state={'mu': jnp.zeros((4,))}, skipped=jnp.int32(0))


def save(store, step, value, metric=None):
  s = state(value)
  store.save(step, s.params, {'opt_state': s.opt_state, 'step': jnp.int32(step), 'skipped': s.skipped},
             {'loop_step': step}, metrics=None if metric is None else {'loss': metric})


def test_keeps_the_latest_and_the_best(tmp_path):
  store = Checkpoints(str(tmp_path), keep=1, metric='loss')
  for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 4.0)]:
    save(store, step, float(step), loss)
  store.wait()
  assert sorted(store.all_steps()) == [2, 4] and store.best_step() == 2
  store.close()


def test_a_half_written_or_damaged_checkpoint_is_never_restored(tmp_path, caplog):
  store = Checkpoints(str(tmp_path), keep=3)
  for step in (2, 4, 6):
    save(store, step, float(step))
  store.wait()
  os.makedirs(tmp_path / 'checkpoints' / '8.orbax-checkpoint-tmp-1234')  # killed mid-write: never listed
  assert 8 not in store.all_steps()
  shutil.rmtree(tmp_path / 'checkpoints' / '6' / 'params')  # complete once, damaged since
  with caplog.at_level(logging.WARNING):
    step, restored, _ = _restore_latest(store, state(0.0))
  assert step == 4 and np.asarray(restored.params['w']).tolist() == [4.0] * 4 and int(restored.step) == 4
  assert 'checkpoint 6 does not restore' in caplog.text
  assert 6 not in store.all_steps()  # deleted: a rerun saves step 6 again instead of skipping it
  store.close()


def test_a_changed_config_is_not_resumed(tmp_path):
  import pytest
  store = Checkpoints(str(tmp_path), keep=2)
  s = state(1.0)
  store.save(2, s.params, {'opt_state': s.opt_state, 'step': jnp.int32(2), 'skipped': s.skipped},
             {'loop_step': 2, 'config': {'optim': {'learning_rate': 1e-4}, 'data': {'num_workers': 4}}})
  store.wait()
  same = {'optim': {'learning_rate': 1e-4}, 'data': {'num_workers': 0}}  # workers may change
  assert _restore_latest(store, state(0.0), same)[0] == 2
  with pytest.raises(ValueError, match=r'another config \(optim.learning_rate differ'):
    _restore_latest(store, state(0.0), {'optim': {'learning_rate': 5e-5}, 'data': {'num_workers': 4}})
  store.close()


def test_collapse_is_named_loudly(caplog):
  from ml_collections import ConfigDict
  run = type('Run', (), {'config': ConfigDict({'data': {'global_batch': 64}, 'stage2': {
      'hard_negatives': False, 'temperature': 0.03}, 'optim': {'learning_rate': 1e-3}})})()
  history = []
  with caplog.at_level(logging.WARNING):
    for _ in range(19):
      _collapse_warning(run, float(np.log(64)), history)
    assert 'COLLAPSE' not in caplog.text
    _collapse_warning(run, float(np.log(64)), history)
  assert 'COLLAPSE' in caplog.text and 'learning rate' in caplog.text and 'optim.learning_rate=0.001' in caplog.text
