"""Build the TFDS ArrayRecord datasets from local raw files (no TensorFlow needed).

  python -m coma_jax.data.build_tfds stage1_qa --input qa.jsonl --image-root IMAGES --data-dir OUT
  python -m coma_jax.data.build_tfds mmeb_train --input-dir MMEB-train --image-root IMAGES --data-dir OUT
  python -m coma_jax.data.build_tfds mmeb_eval --input-dir MMEB-eval --image-root IMAGES --data-dir OUT
  python -m coma_jax.data.build_tfds convert_qa --input qa_generation.jsonl --output qa.jsonl

mmeb_train / mmeb_eval take one folder (or file) per subset/dataset under --input-dir, holding
parquet or JSONL files; `--split-prefix original` keeps MMEB-train's `original-*.parquet` only.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys

from coma_jax.data.formats import convert_qa_generation, read_jsonl

RAW_SUFFIXES = ('.parquet', '.jsonl')


def discover_splits(input_dir: str, prefix: str = '') -> dict[str, list[str]]:
  """Subset name -> its raw files: sub-folders, or files named after the subset."""
  splits = {}
  for entry in sorted(os.listdir(input_dir)):
    path = os.path.join(input_dir, entry)
    if os.path.isdir(path):
      files = sorted(f for f in glob.glob(os.path.join(path, '**', '*'), recursive=True)
                     if f.endswith(RAW_SUFFIXES) and os.path.basename(f).startswith(prefix))
      if files:
        splits[entry] = files
    elif entry.endswith(RAW_SUFFIXES):
      splits[os.path.splitext(entry)[0]] = [path]
  if not splits:
    raise FileNotFoundError(f'no parquet or JSONL files under {input_dir}')
  return splits


def build(kind: str, data_dir: str, *, inputs=None, input_dir=None, image_root=None,
          on_bad_record='skip', split_prefix=''):
  """Builds (or reuses) the dataset; returns the builder. Bad-record counts are in its metadata."""
  from coma_jax.data.tfds_builders.mmeb import MmebEval, MmebTrain
  from coma_jax.data.tfds_builders.stage1_qa import Stage1Qa
  if kind == 'stage1_qa':
    cls, splits = Stage1Qa, {'train': list(inputs)}
  else:
    cls = {'mmeb_train': MmebTrain, 'mmeb_eval': MmebEval}[kind]
    splits = discover_splits(input_dir, split_prefix)
  builder = cls(splits=splits, image_root=image_root, on_bad_record=on_bad_record, data_dir=data_dir)
  builder.download_and_prepare()
  return builder


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('kind', choices=['stage1_qa', 'mmeb_train', 'mmeb_eval', 'convert_qa'])
  parser.add_argument('--input', action='append', help='raw JSONL file (repeatable)')
  parser.add_argument('--input-dir')
  parser.add_argument('--image-root')
  parser.add_argument('--data-dir')
  parser.add_argument('--output', help='convert_qa: the LLaVA JSONL to write')
  parser.add_argument('--on-bad-record', default='skip', choices=['skip', 'error'])
  parser.add_argument('--split-prefix', default='')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
  if args.kind == 'convert_qa':
    n = 0
    with open(args.output, 'w') as out:
      for file in args.input:
        for i, (rid, obj) in enumerate(read_jsonl(file)):
          if isinstance(obj, Exception):
            raise obj
          out.write(json.dumps(convert_qa_generation(obj, i), ensure_ascii=False) + '\n')
          n += 1
    print(f'wrote {n} records to {args.output}')
    return
  builder = build(args.kind, args.data_dir, inputs=args.input, input_dir=args.input_dir,
                  image_root=args.image_root, on_bad_record=args.on_bad_record, split_prefix=args.split_prefix)
  bad = builder.info.metadata.get('bad_records', {})
  counts = {k: v.num_examples for k, v in builder.info.splits.items()}
  print(f'{builder.name}: {counts} examples in {builder.data_dir}; skipped {bad.get("skipped", 0)} '
        f'bad records {bad.get("by_reason", {})}')
  for line in bad.get('first', []):
    print('  ', line)


if __name__ == '__main__':
  sys.exit(main())
