"""Demo data: writes synthetic raw files and builds them, so that the output folder is a
`data.data_dir` (stage1_qa with train and validation splits, mmeb_train, mmeb_eval).

  python -m coma_jax.data.demo --out DIR [--size smoke|full] [--seed N] [--overwrite]

The content is learnable: drawn scenes of coloured shapes and crops of real photos, with
captions, questions and labels computed from the pixels (demo_scenes, demo_records).
DIR/raw/ holds the stage-1 JSONL and the MMEB-train subsets with their images;
DIR/mmeb_eval_raw/ is the held-out eval set in MMEB-eval's published layout (a parquet per
dataset, images/) with task_table.json (dataset -> meta_task, chance) for `evaluate --task_table`.
The raw files are deterministic by size and seed, and a rerun reuses them and the built datasets.
`--size smoke` builds in seconds (the tests share it); `full` is what `make demo` trains on.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys

import numpy as np

from coma_jax.data import demo_records


@dataclasses.dataclass(frozen=True)
class DemoSize:
  stage1_train: int
  stage1_validation: int
  pairs_per_task: int  # MMEB-train pairs of each of the seven tasks
  eval_queries: int  # per eval dataset
  two_images_every: int = 0  # stage-1 records showing two scenes (the tests' multi-image rows)


SIZES = {
    # Stage-2 smoke configs take global batch 8 in blocks of 4: every task has two blocks.
    'smoke': DemoSize(stage1_train=32, stage1_validation=8, pairs_per_task=8, eval_queries=8, two_images_every=7),
    # What `make demo` trains on (configs/demo.py).
    'full': DemoSize(stage1_train=6000, stage1_validation=256, pairs_per_task=1500, eval_queries=200),
}
STAMP = 'demo.json'  # what the raw files were written for
CONTENT_VERSION = 3  # bump when the generated content changes: older folders are then refused


class DemoMismatch(ValueError):
  """The folder holds demo data of another size or seed."""


def _check_stamp(out: str, stamp: dict, overwrite: bool) -> bool:
  """Whether `out` already holds the raw files for `stamp` (the stamp is written last). Refuses,
  before anything is written, to mix demo data of other arguments into `out`."""
  path = os.path.join(out, 'raw', STAMP)
  if not os.path.exists(path):
    return False
  with open(path) as f:
    built = json.load(f)
  if built == stamp:
    return True
  if not overwrite:
    raise DemoMismatch(f'{out} holds demo data for {built}, not {stamp}; write another folder, or replace '
                       'it with overwrite=True (--overwrite)')
  for folder in ('raw', 'mmeb_eval_raw'):  # stale images of a larger size must not linger
    shutil.rmtree(os.path.join(out, folder), ignore_errors=True)
  return False


def raw_inputs(out: str) -> dict:
  """Where the raw files of the three datasets are: the build inputs."""
  stage1 = os.path.join(out, 'raw', 'stage1')
  mmeb_train, eval_raw = os.path.join(out, 'raw', 'mmeb_train'), os.path.join(out, 'mmeb_eval_raw')
  return {
      'stage1_qa': dict(inputs=[os.path.join(stage1, 'train.jsonl')],
                        validation_inputs=[os.path.join(stage1, 'validation.jsonl')],
                        image_root=os.path.join(stage1, 'images')),
      'mmeb_train': dict(input_dir=os.path.join(mmeb_train, 'subsets'), image_root=os.path.join(mmeb_train, 'images')),
      'mmeb_eval': dict(input_dir=eval_raw, image_root=os.path.join(eval_raw, 'images')),
  }


def write_raw(out: str, size: DemoSize, seed: int) -> dict:
  """Writes the raw files of the three datasets (see demo_records); returns the build inputs."""
  inputs = raw_inputs(out)
  s1 = inputs['stage1_qa']
  for k, (path, n) in enumerate(((s1['inputs'][0], size.stage1_train),
                                 (s1['validation_inputs'][0], size.stage1_validation))):
    split = ('train', 'validation')[k]
    rng = np.random.default_rng([seed, 1, k])  # distinct images and questions per split
    rows = demo_records.stage1_records(n, rng, demo_records.ImageWriter(s1['image_root'], split), prefix=split,
                                        two_images_every=size.two_images_every)
    demo_records.write_jsonl(path, rows)
  demo_records.write_mmeb_train(os.path.dirname(inputs['mmeb_train']['input_dir']), size.pairs_per_task, seed)
  demo_records.write_mmeb_eval(inputs['mmeb_eval']['input_dir'], size.eval_queries, seed)
  return inputs


def build_demo_data(out: str, size: str = 'smoke', seed: int = 0, overwrite: bool = False) -> dict:
  """Writes the raw files and builds the datasets into `out` (reused when built from the same
  size and seed). Returns the paths: data_dir, raw, mmeb_eval_raw, mmeb_eval_images, task_table,
  each dataset's built version folder, and reused_raw (whether the raw files were already there)."""
  from coma_jax.data import build_tfds
  if size not in SIZES:
    raise ValueError(f'size must be one of {sorted(SIZES)}, not {size!r}')
  stamp = {'size': size, 'seed': seed, 'version': CONTENT_VERSION}
  reused = _check_stamp(out, stamp, overwrite)
  if reused:
    inputs = raw_inputs(out)
  else:
    inputs = write_raw(out, SIZES[size], seed)
    with open(os.path.join(out, 'raw', STAMP), 'w') as f:
      json.dump(stamp, f)
  paths = {'data_dir': out, 'raw': os.path.join(out, 'raw'), 'mmeb_eval_raw': inputs['mmeb_eval']['input_dir'],
           'mmeb_eval_images': inputs['mmeb_eval']['image_root'],
           'task_table': os.path.join(inputs['mmeb_eval']['input_dir'], demo_records.TASK_TABLE),
           'reused_raw': reused}
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
