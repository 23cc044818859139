"""`python -m coma_jax.train` end to end on the smoke demo data, as a user runs it: a run killed
with SIGKILL and rerun, then stopped with SIGTERM (grain workers running) and rerun, reproduces the
uninterrupted run loss for loss, bit for bit; stage 2 starts from the stage-1 workdir; workdirs and
checkpoints restore onto another mesh; plots are drawn. The runs use one CPU device (fast); the
8 -> 4 device restore runs in-process."""
import json
import os
import signal
import subprocess
import time

import jax
import numpy as np

from tests.train_runs import ROOT, STEPS, command, env, records, run_to_end


def last_step(workdir):
  return max([r['step'] for r in records(workdir) if 'split' not in r], default=0)


def interrupt_after(cmd, workdir, step, sig, resumed_from=None, committed=None, timeout=600):
  """Starts the run in its own process group and sends `sig` to the group once `step` is logged
  (by this run: when resuming, after it cut metrics.jsonl back to `resumed_from`) and checkpoint
  `committed` is complete (saves are asynchronous: a step can be logged before the save before it)."""
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)
  deadline = time.time() + timeout
  waits = ([lambda: last_step(workdir) <= resumed_from] if resumed_from is not None else []) + [
      lambda: last_step(workdir) >= step] + (
      [lambda: os.path.isdir(os.path.join(workdir, 'checkpoints', str(committed)))] if committed else [])
  for ready in waits:
    while not ready():
      assert proc.poll() is None, proc.stderr.read()[-4000:]
      assert time.time() < deadline, 'no progress'
      time.sleep(0.05)
  os.killpg(proc.pid, sig)
  _, err = proc.communicate(timeout=300)
  return proc.returncode, err


def by_step(rows, split=None):
  return {r['step']: r for r in rows if r.get('split') == split}


def test_kill_then_sigterm_then_resume_reproduce_the_run(uninterrupted, demo_data_dir, tmp_path):
  reference, reference_log = uninterrupted
  workdir = tmp_path / 'interrupted'
  cmd = command(workdir, demo_data_dir)
  rc, _ = interrupt_after(cmd, workdir, 3, signal.SIGKILL, committed=2)
  assert rc == -signal.SIGKILL
  killed_after = max(r['step'] for r in records(workdir))
  assert 3 <= killed_after < STEPS
  rc, err = interrupt_after(cmd, workdir, 3, signal.SIGTERM, resumed_from=2)  # resumed, then preempted
  assert rc == 0, err[-4000:]
  assert 'resuming from checkpoint 2' in err and 'preempted: saved step' in err
  preempted_at = int(err.split('preempted: saved step ')[1].split(';')[0])
  assert preempted_at >= 3 and preempted_at in [int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit()]
  err = run_to_end(cmd)
  assert f'resuming from checkpoint {preempted_at}' in err
  rows, expected = records(workdir), records(reference)
  train, want = by_step(rows), by_step(expected)
  assert [r['step'] for r in rows if 'split' not in r] == list(range(1, STEPS + 1))  # no step twice
  assert {s: r['loss'] for s, r in train.items()} == {s: r['loss'] for s, r in want.items()}  # bit for bit
  for field in ('grad_norm', 'lr', 'bad_records', 'padding_waste', 'skipped_updates'):  # the skip report continues
    assert {s: r[field] for s, r in train.items()} == {s: r[field] for s, r in want.items()}, field
  assert by_step(rows, 'validation').keys() == {2, 4, STEPS}  # every 2 steps, and the final one
  assert {s: r['loss'] for s, r in by_step(rows, 'validation').items()} == \
      {s: r['loss'] for s, r in by_step(expected, 'validation').items()}


def test_the_workdir_and_its_metrics(uninterrupted):
  workdir, log = uninterrupted
  names = set(os.listdir(workdir))
  assert {'config.json', 'coma_embedding.json', 'model_config.json', 'base.json', 'checkpoints', 'tensorboard',
          'metrics.jsonl'} <= names
  meta = json.load(open(workdir / 'coma_embedding.json'))
  assert meta['num_compression_tokens'] == 8 and meta['first_compression_token_id'] == 151665
  rows = by_step(records(workdir))
  for field in ('loss', 'lr', 'grad_norm', 'skipped_updates', 'bad_records', 'samples_per_s', 'tokens_per_s',
                'padding_waste', 'mfu', 'hfu'):
    assert all(field in r for r in rows.values()), field
  assert rows[1]['mfu'] is None  # no peak FLOP/s is known for a CPU
  buckets = {(r['bucket_seq_len'], r['bucket_vision_slots']) for r in rows.values()}
  assert len(buckets) == 2  # both of tiny's packed buckets (one image, two images per row) were used
  # Through the real loaders: one compilation per bucket used, truncation or not.
  assert f'step compilations in this process: {len(buckets)}' in log
  assert sum(r['truncations'] for r in rows.values()) > 0
  assert sorted(int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit())[-1] == STEPS
  from coma_jax import plot
  assert plot.main([str(workdir)]) == 0 and (workdir / 'plots' / 'loss.png').stat().st_size > 1000


def test_stage2_starts_from_the_stage1_workdir(stage2_run):
  validation = by_step(records(stage2_run), 'validation')
  assert 0 <= validation[2]['p_at_1'] <= 1 and 'p_at_1/SceneCaption_t2i' in validation[2]


def test_a_workdir_restores_onto_another_mesh(uninterrupted):
  """Trained on one device; loaded onto 4 (fsdp over 4), at the final and at an earlier step."""
  from flax import nnx
  from coma_jax.parallel.mesh import make_mesh
  from coma_jax.training.workdir import load_model
  mesh = make_mesh((1, 4, 1), jax.devices()[:4])
  one = load_model(str(uninterrupted[0]), mesh=make_mesh((1, 1, 1), jax.devices()[:1]))
  final, earlier = load_model(str(uninterrupted[0]), mesh=mesh), load_model(str(uninterrupted[0]), mesh=mesh, step=4)
  a, b, c = (nnx.to_flat_state(nnx.state(m, nnx.Param)) for m in (one, final, earlier))
  for (_, x), (_, y) in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x.value), np.asarray(y.value))
  assert any(len(y.value.sharding.device_set) == 4 for _, y in b)
  assert any(not np.array_equal(np.asarray(x.value), np.asarray(z.value)) for (_, x), (_, z) in zip(a, c))


def test_checkpoints_restore_from_8_devices_onto_4(tmp_path):
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from coma_jax.parallel.mesh import make_mesh
  from coma_jax.training.checkpoint import Checkpoints
  eight, four = make_mesh((1, 8, 1)), make_mesh((1, 4, 1), jax.devices()[:4])
  values = np.arange(64 * 4, dtype=np.float32).reshape(64, 4)
  params = {'w': jax.device_put(values, NamedSharding(eight, P('fsdp', None)))}
  store = Checkpoints(str(tmp_path), keep=2)
  store.save(3, params, {'step': jnp.int32(3)}, {'loop_step': 3})
  store.wait()
  target = NamedSharding(four, P('fsdp', None))
  like = {'w': jax.ShapeDtypeStruct((64, 4), jnp.float32, sharding=target)}
  restored, train, meta = store.restore(3, like, {'step': jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(four, P()))})
  store.close()
  assert restored['w'].sharding == target and len(restored['w'].sharding.device_set) == 4
  np.testing.assert_array_equal(np.asarray(restored['w']), values)
  assert int(train['step']) == 3 and meta == {'loop_step': 3}
