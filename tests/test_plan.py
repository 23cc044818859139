"""The planner compiles a config's step AOT on fake devices and reports memory and FLOPs."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_planner_on_the_tiny_config():
  env = dict(os.environ, XLA_FLAGS='', PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, '-m', 'coma_jax.plan', '--config', 'configs/tiny.py:stage1',
                        '--devices', '4', '--config.mesh.shape=2,2,1'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  text = out.stdout
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 1} (4 fake CPU devices)" in text
  assert 'per-device memory: arguments' in text and 'FLOPs per step (analytic, training/flops.py): model' in text
  assert 'attention blockwise (from auto)' in text and 'not modelled on CPU' in text
  peak = float(text.split('peak estimate per device: ')[1].split(' GiB')[0])
  assert 0.01 < peak < 10
