"""Demo data: writes synthetic raw files and builds them, so that the output folder is a
`data.data_dir` (stage1_qa with train and validation splits, mmeb_train, mmeb_eval).

  python -m coma_jax.data.demo --out DIR [--size smoke|full] [--seed N] [--overwrite]

DIR/raw/ holds the stage-1 JSONL and the MMEB-train subsets with their images;
DIR/mmeb_eval_raw/ is MMEB-eval in its published layout (a parquet per dataset, images/).
The raw files are deterministic by size and seed, so a rerun reuses the built datasets.
`--size smoke` builds in seconds (the tests share it); `full` has a few thousand records.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys

from coma_jax.data import demo_data


@dataclasses.dataclass(frozen=True)
class DemoSize:
  stage1_train: int
  stage1_validation: int
  mmeb_train_scale: int  # MMEB-train subsets hold 24, 16 and 20 pairs times this
  eval_queries: int  # per MMEB-eval dataset, 5 candidates each
  photos: int  # distinct photos per image folder
  image_sizes: tuple[int, int]  # width and height in [low, high) pixels


SIZES = {
    # Stage-2 smoke configs take global batch 8 in blocks of 4: every subset has two blocks.
    'smoke': DemoSize(stage1_train=32, stage1_validation=8, mmeb_train_scale=1, eval_queries=8, photos=10,
                      image_sizes=(60, 200)),
    'full': DemoSize(stage1_train=2000, stage1_validation=200, mmeb_train_scale=40, eval_queries=200, photos=60,
                     image_sizes=(60, 420)),
}
STAMP = 'demo.json'  # what the raw files were written for


class DemoMismatch(ValueError):
  """The folder holds demo data of another size or seed."""


def _check_stamp(out: str, stamp: dict, overwrite: bool) -> None:
  """Refuses, before anything is written, to mix demo data of other arguments into `out`."""
  path = os.path.join(out, 'raw', STAMP)
  if not os.path.exists(path):
    return
  with open(path) as f:
    built = json.load(f)
  if built == stamp:
    return
  if not overwrite:
    raise DemoMismatch(f'{out} holds demo data for {built}, not {stamp}; write another folder, or replace '
                       'it with overwrite=True (--overwrite)')
  for folder in ('raw', 'mmeb_eval_raw'):  # stale images of a larger size must not linger
    shutil.rmtree(os.path.join(out, folder), ignore_errors=True)


def write_raw(out: str, size: DemoSize, seed: int) -> dict:
  """The raw files of the three datasets; returns the build inputs."""
  stage1 = os.path.join(out, 'raw', 'stage1')
  images = os.path.join(stage1, 'images')
  os.makedirs(images, exist_ok=True)
  photos = demo_data.write_photos(images, size.photos, seed=seed, sizes=size.image_sizes)
  # Distinct record streams for the two splits over the same photos.
  train = demo_data.write_qa_jsonl(os.path.join(stage1, 'train.jsonl'), photos, size.stage1_train,
                                   seed=seed, prefix='train')
  validation = demo_data.write_qa_jsonl(os.path.join(stage1, 'validation.jsonl'), photos, size.stage1_validation,
                                        seed=seed + 1, prefix='validation')
  mmeb_train = os.path.join(out, 'raw', 'mmeb_train')
  subsets = demo_data.write_mmeb_train(mmeb_train, seed=seed, sizes=size.image_sizes, scale=size.mmeb_train_scale)
  eval_raw = demo_data.write_mmeb_eval(os.path.join(out, 'mmeb_eval_raw'), seed=seed, sizes=size.image_sizes,
                                       queries=size.eval_queries, photo_count=size.photos)
  return {
      'stage1_qa': dict(inputs=[train], validation_inputs=[validation], image_root=images),
      'mmeb_train': dict(input_dir=subsets, image_root=os.path.join(mmeb_train, 'images')),
      'mmeb_eval': dict(input_dir=eval_raw, image_root=os.path.join(eval_raw, 'images')),
  }


def build_demo_data(out: str, size: str = 'smoke', seed: int = 0, overwrite: bool = False) -> dict:
  """Writes the raw files and builds the datasets into `out` (reused when built from the same
  size and seed). Returns the paths: data_dir, raw, mmeb_eval_raw, mmeb_eval_images, and each
  dataset's built version folder."""
  from coma_jax.data import build_tfds
  if size not in SIZES:
    raise ValueError(f'size must be one of {sorted(SIZES)}, not {size!r}')
  stamp = {'size': size, 'seed': seed}
  _check_stamp(out, stamp, overwrite)
  inputs = write_raw(out, SIZES[size], seed)
  with open(os.path.join(out, 'raw', STAMP), 'w') as f:
    json.dump(stamp, f)
  paths = {'data_dir': out, 'raw': os.path.join(out, 'raw'), 'mmeb_eval_raw': inputs['mmeb_eval']['input_dir'],
           'mmeb_eval_images': inputs['mmeb_eval']['image_root']}
  for kind, kw in inputs.items():
    paths[kind] = build_tfds.build(kind, out, overwrite=overwrite, **kw).data_dir
  return paths


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', required=True, help='the folder to write: it becomes a data.data_dir')
  parser.add_argument('--size', default='smoke', choices=sorted(SIZES))
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--overwrite', action='store_true', help='replace demo data of another size or seed')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
  from coma_jax.data.loaders import open_builder
  try:
    paths = build_demo_data(args.out, args.size, args.seed, args.overwrite)
  except DemoMismatch as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'demo data ({args.size}, seed {args.seed}) in {args.out}; use it as data.data_dir')
  for name in ('stage1_qa', 'mmeb_train', 'mmeb_eval'):
    splits = open_builder(args.out, name).info.splits
    print(f'  {name}: {", ".join(f"{k} {v.num_examples}" for k, v in splits.items())}')
  print(f'  raw files: {paths["raw"]}\n  MMEB-eval raw (published layout): {paths["mmeb_eval_raw"]}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
