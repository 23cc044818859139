"""Real multi-process training through launch/local.py (the pod launchers' env contract): two JAX
processes with 4 fake CPU devices each, gloo collectives on localhost, against one process with 8.
Tiny stage 2 (cross-process negatives, GradCache) on the smoke demo data."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.train_runs import ROOT, records

sys.path.insert(0, os.path.join(ROOT, 'launch'))
import local  # noqa: E402  (launch/local.py)

STEPS = 3


def train_args(workdir, data_dir, variant='stage2', *extra):
  return ['-m', 'coma_jax.train', '--config', f'configs/tiny.py:{variant}', '--workdir', str(workdir),
          f'--config.data.data_dir={data_dir}', f'--config.train.steps={STEPS}', '--config.validation.every=0',
          '--config.data.num_workers=0', '--config.checkpoint.every=1', f'--config.checkpoint.keep={STEPS}', *extra]


def one_process(args, timeout=600):
  env = {k: v for k, v in os.environ.items() if not k.startswith('COMA_')}
  env.update(XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]


def two_processes(args, timeout=600):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'launch', 'local.py'), '-n', '2',
                         '--devices_per_process', '4', '--', *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
  return proc.stdout


def losses(workdir) -> dict:
  return {r['step']: r['loss'] for r in records(workdir) if 'split' not in r}


def assert_close(a: dict, b: dict, steps):
  for step in steps:  # reductions across processes sum in another order
    assert abs(a[step] - b[step]) <= 1e-6 * abs(b[step]), (step, a[step], b[step])


@pytest.fixture(scope='module')
def runs(demo_data_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp('multihost')
  validated = '--config.validation.every=1'  # the evaluation's Embedder on the training mesh
  one_process(train_args(root / 'one', demo_data_dir, 'stage2', validated))
  out = two_processes(train_args(root / 'two', demo_data_dir, 'stage2', validated))
  return root, out


def test_two_processes_train_as_one_with_eight_devices(runs):
  root, out = runs
  assert '[process 0]' in out and '[process 1]' in out
  assert len(losses(root / 'two')) == STEPS
  assert_close(losses(root / 'two'), losses(root / 'one'), range(1, STEPS + 1))
  # Only process 0 writes metrics and plots; both took part in every checkpoint.
  assert sorted(int(d) for d in os.listdir(root / 'two' / 'checkpoints')) == list(range(1, STEPS + 1))
  assert (root / 'two' / 'plots').is_dir() and len([r for r in records(root / 'two') if 'split' not in r]) == STEPS
  validation = lambda w: {r['step']: {k: v for k, v in r.items() if k.startswith('p_at_1')}
                          for r in records(w) if r.get('split') == 'validation'}
  assert validation(root / 'two') == validation(root / 'one') and len(validation(root / 'one')) == STEPS


@pytest.mark.parametrize('saved_by, resumed_by', [
    ('two', one_process), pytest.param('one', two_processes, marks=pytest.mark.slow)], ids=['2to1', '1to2'])
def test_a_checkpoint_continues_on_another_process_count(runs, demo_data_dir, saved_by, resumed_by):
  """A run cut back to its step STEPS - 1 checkpoint resumes, on the other process count, to the
  identical step STEPS."""
  root, _ = runs
  target = root / f'{saved_by}_resumed'
  shutil.copytree(root / saved_by, target)
  shutil.rmtree(target / 'checkpoints' / str(STEPS))
  resumed_by(train_args(target, demo_data_dir))
  assert_close(losses(target), losses(root / 'one'), [STEPS])


@pytest.mark.slow
def test_stage1_two_processes_train_as_one(demo_data_dir, tmp_path):
  one_process(train_args(tmp_path / 'one', demo_data_dir, 'stage1'))
  two_processes(train_args(tmp_path / 'two', demo_data_dir, 'stage1'))
  assert_close(losses(tmp_path / 'two'), losses(tmp_path / 'one'), range(1, STEPS + 1))


def _start_pair(workdir, data_dir, *extra, heartbeat_s=None):
  """Two processes started with local.py's environment, each in its own process group."""
  args = train_args(workdir, data_dir, 'stage2', '--config.train.steps=200', '--config.checkpoint.every=100', *extra)
  port, procs = local.free_port(), []
  for i in range(2):
    env = local.process_env(i, 2, 4, port)
    if heartbeat_s:
      env['COMA_HEARTBEAT_TIMEOUT_S'] = str(heartbeat_s)
    log = open(os.path.join(str(workdir) + f'.process{i}.log'), 'w')
    procs.append(subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True))
  return procs


def _wait_for_steps(workdir, n, procs, timeout=300):
  start = time.monotonic()
  while len(losses(workdir)) < n:
    assert all(p.poll() is None for p in procs), 'a process ended early'
    assert time.monotonic() - start < timeout, 'no progress'
    time.sleep(0.5)


def test_a_dead_process_makes_the_other_exit_non_zero(demo_data_dir, tmp_path):
  workdir = tmp_path / 'run'
  procs = _start_pair(workdir, demo_data_dir, heartbeat_s=5)
  try:
    _wait_for_steps(workdir, 2, procs)
    os.killpg(procs[1].pid, signal.SIGKILL)
    killed = time.monotonic()
    code = procs[0].wait(timeout=60)  # documented: about COMA_HEARTBEAT_TIMEOUT_S, bounded
    assert code != 0 and time.monotonic() - killed < 60
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)


@pytest.mark.slow
def test_sigterm_to_both_groups_saves_the_same_step_and_exits_zero(demo_data_dir, tmp_path):
  workdir = tmp_path / 'run'
  procs = _start_pair(workdir, demo_data_dir, '--config.data.num_workers=1')  # grain workers running
  try:
    _wait_for_steps(workdir, 2, procs)
    for p in procs:
      os.killpg(p.pid, signal.SIGTERM)
    codes = [p.wait(timeout=120) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
  assert codes == [0, 0]
  saved = sorted(int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit())
  assert saved and saved[-1] == max(losses(workdir)) and saved[-1] < 200
  meta = json.load(open(workdir / 'checkpoints' / str(saved[-1]) / 'meta' / 'metadata'))
  assert meta['loop_step'] == saved[-1]
