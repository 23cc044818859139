"""Test-wide JAX settings: fp32 matmuls at highest precision, a persistent compile cache,
eight fake CPU devices."""
import os

os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(os.path.dirname(os.path.dirname(__file__)), '.cache', 'jax'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
# Eight fake CPU devices for the sharding tests; unsharded tests run on the first.
if '--xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()

import jax  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')

import pytest  # noqa: E402

from tests import train_runs  # noqa: E402


@pytest.fixture(scope='session')
def demo_data_dir(tmp_path_factory) -> str:
  """A `data.data_dir` of smoke demo data (coma_jax.data.demo), built once per test run."""
  from coma_jax.data.demo import build_demo_data
  return build_demo_data(str(tmp_path_factory.mktemp('demo_data')), size='smoke', seed=0)['data_dir']


# Tiny training runs through the CLI, shared by the training, embedding and evaluation tests.
@pytest.fixture(scope='session')
def uninterrupted(demo_data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('runs') / 'uninterrupted'
  err = train_runs.run_to_end(train_runs.command(workdir, demo_data_dir))
  return workdir, err


@pytest.fixture(scope='session')
def stage2_run(uninterrupted, demo_data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('runs') / 'stage2'
  train_runs.run_to_end(train_runs.command(workdir, demo_data_dir, 'stage2', f'--config.init_from={uninterrupted[0]}',
                     '--config.train.steps=2', '--config.data.num_workers=0'))
  return workdir


