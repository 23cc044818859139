"""Generation throughput of `coma_jax.generate` (KV-cache decoding): prefill and decode tokens/s.

  python benchmarks/decode_throughput.py [--config tiny|demo] [--batch 1,8] [--prompt 256] [--new 64]

A random model of the given config (tiny: hidden 256, 4 layers, the real 151,936-row vocabulary),
text-only prompts of `--prompt` tokens, greedy, `--new` new tokens per row with no end token (every
row runs to the limit). Prefill time is a run with one new token; decode tokens/s counts the
(new - 1) decode steps of every row over the rest of the time. Median of `--repeats` timed runs
after a compile run. Prints measured numbers; not a test.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from coma_jax.generate.decode import DecodeSettings, generate  # noqa: E402
from coma_jax.model import ModelConfig, Qwen25VL  # noqa: E402
from coma_jax.model.inputs import build_model_inputs  # noqa: E402


def timed(fn, repeats: int) -> float:
  fn()  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', default='tiny', choices=['tiny', 'demo'])
  parser.add_argument('--batch', default='1,8')
  parser.add_argument('--prompt', type=int, default=256)
  parser.add_argument('--new', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  cfg = ModelConfig.from_json_file(os.path.join(ROOT, 'coma_jax', 'model', 'hf_configs', f'qwen2_5_vl_{args.config}.json'))
  model = Qwen25VL(cfg, rngs=nnx.Rngs(0))
  t = cfg.text
  print(f'{jax.devices()[0].device_kind} ({jax.default_backend()}, {os.cpu_count()} cores), jax {jax.__version__}; '
        f'{args.config}: hidden {t.hidden_size}, {t.num_hidden_layers} layers, vocab {t.vocab_size}; fp32, greedy; '
        f'prompt {args.prompt}, {args.new} new tokens')
  print('| batch | prefill s | decode s | decode tokens/s | end-to-end new tokens/s |')
  print('|---|---|---|---|---|')
  rng = np.random.default_rng(0)
  for b in (int(x) for x in args.batch.split(',')):
    ids = rng.integers(1000, 100_000, (b, args.prompt))
    inputs = build_model_inputs(cfg, ids, np.ones_like(ids), seq_len=args.prompt)
    settings = DecodeSettings(max_new_tokens=args.new)
    prefill = timed(lambda: generate(model, inputs, DecodeSettings(max_new_tokens=1)), args.repeats)
    total = timed(lambda: generate(model, inputs, settings), args.repeats)
    decode = max(total - prefill, 1e-9)
    print(f'| {b} | {prefill:.3f} | {decode:.3f} | {b * (args.new - 1) / decode:.1f} | {b * args.new / total:.1f} |',
          flush=True)


if __name__ == '__main__':
  main()
