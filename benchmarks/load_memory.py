"""Peak host memory of `load_pretrained` on a full-size checkpoint, against the bf16 parameter bytes.

  python benchmarks/load_memory.py [--config 3b|7b] [--dir DIR] [--keep]

Writes a random Qwen2.5-VL checkpoint in the transformers layout (bf16 safetensors shards with an
index, the config.json of `coma_jax/model/hf_configs`) without building a torch model, then loads
it with `load_pretrained(dtype=bfloat16)` on the CPU backend in a fresh subprocess and prints that
child's peak RSS, its RSS after imports, the bf16 parameter bytes, the ratio and the load seconds.
On the CPU backend the loaded parameters are host memory too, so 1.0x is the floor.
The checkpoint is deleted afterwards unless --keep (a kept one is reused). Not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, 'coma_jax', 'model', 'hf_configs')

# Runs in the child: RSS after imports, then the load, then the load seconds.
CHILD = """
import sys, time
import jax.numpy as jnp
from coma_jax.hf import load_pretrained
def rss_kb():
  return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1])
print('baseline_kb', rss_kb(), flush=True)
start = time.perf_counter()
model = load_pretrained(sys.argv[1], dtype=jnp.bfloat16)
print('load_s', time.perf_counter() - start, flush=True)
"""


def write_checkpoint(config_file: str, path: str) -> int:
  """Random bf16 tensors (a repeated N(0, 0.02) pool) under the HF names; returns the bytes."""
  import ml_dtypes
  from coma_jax.hf.io import checkpoint_shapes
  from coma_jax.hf.safetensors_files import ShardedWriter
  from coma_jax.model.config import ModelConfig
  config = ModelConfig.from_json_file(config_file)
  rng = np.random.default_rng(0)
  pool = (rng.standard_normal(1 << 22, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
  writer = ShardedWriter(path, max_shard_bytes=2 * 1024**3)
  for key, shape in checkpoint_shapes(config).items():
    values = np.resize(np.roll(pool, int(rng.integers(pool.size))), int(np.prod(shape)))
    writer.add(key, values.reshape(shape))
  writer.finish()
  shutil.copy(config_file, os.path.join(path, 'config.json'))
  return writer.total


def checkpoint_bytes(path: str) -> int:
  with open(os.path.join(path, 'model.safetensors.index.json')) as f:
    return json.load(f)['metadata']['total_size']


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='3b', choices=['3b', '7b'])
  parser.add_argument('--dir', default=None, help='checkpoint directory (default: under the temp dir)')
  parser.add_argument('--keep', action='store_true', help='keep the checkpoint, and reuse a kept one')
  args = parser.parse_args()
  path = args.dir or os.path.join(tempfile.gettempdir(), f'coma_jax_load_memory_{args.config}')
  config_file = os.path.join(CONFIGS, f'qwen2_5_vl_{args.config}.json')
  if args.keep and os.path.exists(os.path.join(path, 'config.json')):
    print(f'reusing {path}')
    param_bytes = checkpoint_bytes(path)
  else:
    shutil.rmtree(path, ignore_errors=True)
    param_bytes = write_checkpoint(config_file, path)
  # The bf16 parameter bytes equal the checkpoint's: every tensor is one parameter (or one layer of one).
  try:
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    env.pop('XLA_FLAGS', None)
    out = subprocess.run([sys.executable, '-c', CHILD, path], env=env, cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
  finally:
    if not args.keep:
      shutil.rmtree(path, ignore_errors=True)
  values = dict(line.split() for line in out.splitlines() if line.split()[0] in ('baseline_kb', 'load_s'))
  peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kB on Linux
  baseline = int(values['baseline_kb']) * 1024
  print(f'machine: {platform.machine()}, {os.cpu_count()} CPUs; config {args.config}')
  print(f'bf16 parameter bytes:   {param_bytes / 1e9:.2f} GB')
  print(f'child RSS after import: {baseline / 1e9:.2f} GB')
  print(f'child peak RSS:         {peak / 1e9:.2f} GB')
  print(f'peak / parameter bytes: {peak / param_bytes:.2f}x')
  print(f'load seconds:           {float(values["load_s"]):.1f}')


if __name__ == '__main__':
  main()
