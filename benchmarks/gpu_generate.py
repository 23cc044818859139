"""Generation on a GPU: the fused attention with a query offset against XLA, greedy decoding with
cuDNN prefill against all-XLA attention, and 3B decode throughput.

  python benchmarks/gpu_generate.py --out DIR [--dry-run]

1. `attention(..., q_offset=...)` in bf16, cudnn against xla: one query per row (a decode step:
   the cuDNN kernel with key lengths) and a chunk of 5 (blockwise), forward max relative error.
2. A random 3B model (bf16), batch 4 of mixed-length text prompts: greedy with `attention_impl='auto'`
   (cuDNN prefill); its logits and the all-XLA ones, teacher-forced on its tokens, against an fp32
   XLA copy of the same weights.
3. 3B decode throughput: batch 1 and 16, prompt 512, 128 new tokens, greedy (prefill separately).
Writes DIR/gpu_generate.json. `--dry-run`: a tiny config, on any backend (checks the script runs).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from coma_jax.generate.decode import DecodeSettings, generate  # noqa: E402
from coma_jax.model import ModelConfig, Qwen25VL  # noqa: E402
from coma_jax.model.attention import attention  # noqa: E402
from coma_jax.model.inputs import build_model_inputs  # noqa: E402


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))


def offset_check(impl: str) -> dict:
  rng = np.random.default_rng(0)
  b, s, n, kv, d = 4, 1024, 16, 2, 128
  out = {}
  for t in (1, 5):
    q = jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.normal(size=(b, s, kv, d)), jnp.bfloat16) for _ in range(2))
    offset = jnp.asarray([0, 100, 700, s - t], jnp.int32)
    run = lambda impl: jax.jit(lambda q, k, v: attention(
        q, k, v, q_segment_ids=jnp.ones((b, t), jnp.int32), kv_segment_ids=jnp.ones((b, s), jnp.int32),
        causal=True, q_offset=offset, impl=impl))(q, k, v)
    out[f'queries_{t}'] = {'out_rel_err': rel(run(impl), run('xla'))}
  return out


def model_of(config, dtype, impl: str) -> Qwen25VL:
  cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_json_file(
      os.path.join(ROOT, 'coma_jax', 'model', 'hf_configs', f'qwen2_5_vl_{config}.json'))
  return Qwen25VL(cfg, dtype=dtype, param_dtype=dtype, attention_impl=impl, rngs=nnx.Rngs(0))


def prompts(cfg, b: int, length: int, rng, ragged=True):
  lengths = [length - (37 * i if ragged else 0) for i in range(b)]
  ids = np.zeros((b, length), np.int64)
  mask = np.zeros_like(ids)
  for i, n in enumerate(lengths):
    ids[i, :n], mask[i, :n] = rng.integers(1000, 100_000, n), 1
  return build_model_inputs(cfg, ids, mask, seq_len=length)


def greedy_check(model, steps: int) -> dict:
  """bf16 greedy with cuDNN prefill ('auto') against all-XLA attention, both teacher-forced
  against an fp32 XLA copy of the same weights (the reference); where their tokens part, the
  reference's top-2 margin there."""
  inputs = prompts(model.config, 4, 512, np.random.default_rng(1))
  settings = DecodeSettings(max_new_tokens=steps, return_logits=True)
  model.attention_impl = 'auto'
  auto = generate(model, inputs, settings)
  model.attention_impl = 'xla'
  xla = generate(model, inputs, settings, forced=auto['tokens'])
  model.attention_impl = 'auto'
  graphdef, state = nnx.split(model)
  ref_model = model_of(model.config, jnp.float32, 'xla')
  nnx.update(ref_model, jax.tree.map(lambda x: x.astype(jnp.float32), state))
  ref = generate(ref_model, inputs, settings, forced=auto['tokens'])
  del ref_model
  top2 = np.sort(ref['logits'], axis=-1)[..., -2:]
  margins = top2[..., 1] - top2[..., 0]
  return {'auto_vs_fp32_logits_rel_err': rel(auto['logits'], ref['logits']),
          'xla_vs_fp32_logits_rel_err': rel(xla['logits'], ref['logits']),
          'auto_vs_xla_logits_rel_err': rel(auto['logits'], xla['logits']),
          'fp32_greedy_agrees_steps': [int(np.argmax(np.append(np.argmax(ref['logits'][i], -1) != auto['tokens'][i], True)))
                                       for i in range(4)],
          'fp32_top2_margin_min_median': [float(margins.min()), float(np.median(margins))], 'steps': steps}


def throughput(model, batches, prompt: int, new: int) -> list:
  rows = []
  for b in batches:
    inputs = prompts(model.config, b, prompt, np.random.default_rng(2), ragged=False)

    def timed(settings):
      generate(model, inputs, settings)
      times = []
      for _ in range(3):
        start = time.perf_counter()
        generate(model, inputs, settings)
        times.append(time.perf_counter() - start)
      return statistics.median(times)
    prefill = timed(DecodeSettings(max_new_tokens=1))
    total = timed(DecodeSettings(max_new_tokens=new))
    rows.append({'batch': b, 'prompt': prompt, 'new_tokens': new, 'prefill_s': prefill, 'total_s': total,
                 'decode_tokens_per_s': b * (new - 1) / max(total - prefill, 1e-9)})
    print(rows[-1], flush=True)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', default=os.environ.get('OUT', 'gpu_generate_out'))
  parser.add_argument('--dry-run', action='store_true')
  parser.add_argument('--no-throughput', action='store_true')
  args = parser.parse_args()
  gpu = jax.default_backend() == 'gpu'
  config, dtype = ('tiny', jnp.float32) if args.dry_run else ('3b', jnp.bfloat16)
  result = {'device': f'{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}'}
  result['offset_check'] = offset_check('cudnn' if gpu else 'blockwise')
  print(result, flush=True)
  start = time.perf_counter()
  model = model_of(config, dtype, 'auto')
  result['model_init_s'] = time.perf_counter() - start
  result['greedy'] = greedy_check(model, 8 if args.dry_run else 32)
  print(result['greedy'], flush=True)
  os.makedirs(args.out, exist_ok=True)
  write = lambda: json.dump(result, open(os.path.join(args.out, 'gpu_generate.json'), 'w'), indent=1)
  write()  # what is measured so far survives a timeout
  result['throughput'] = []
  for b in () if args.no_throughput else (1, 2) if args.dry_run else (16, 1):
    result['throughput'] += throughput(model, (b,), 64 if args.dry_run else 512, 8 if args.dry_run else 128)
    write()
  print(json.dumps(result, indent=1))


if __name__ == '__main__':
  main()
