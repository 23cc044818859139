"""Tiny training runs through `python -m coma_jax.train`, as a user runs them (used by conftest's
session fixtures and the training-program tests)."""
import os
import subprocess
import sys

from coma_jax.plot import run_records as records  # noqa: F401  (the tests' name for it)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 5  # a SIGTERM after step 3 always leaves a step boundary to stop at


def command(workdir, data_dir, variant='stage1', *overrides):
  return [sys.executable, '-m', 'coma_jax.train', '--config', f'configs/tiny.py:{variant}', '--workdir', str(workdir),
          f'--config.data.data_dir={data_dir}', f'--config.train.steps={STEPS}', '--config.checkpoint.every=2',
          '--config.validation.every=2', '--config.data.num_workers=2', *overrides]


def env():
  return dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS='')  # one device: the 8 fake ones are slow on 2 cores


def run_to_end(cmd, timeout=600):
  proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stderr
