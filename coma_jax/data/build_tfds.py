"""Build the TFDS ArrayRecord datasets from local raw files (no TensorFlow needed).

  python -m coma_jax.data.build_tfds stage1_qa --input qa.jsonl --image-root IMAGES --data-dir OUT
  python -m coma_jax.data.build_tfds mmeb_train --input-dir MMEB-train --image-root IMAGES --data-dir OUT
  python -m coma_jax.data.build_tfds mmeb_eval --input-dir MMEB-eval --image-root IMAGES --data-dir OUT
  python -m coma_jax.data.build_tfds convert_qa --input qa_generation.jsonl --output qa.jsonl

stage1_qa has a 'train' split and, with `--validation-input val.jsonl` (repeatable), a 'validation' split.
mmeb_train / mmeb_eval take one folder (or file) per subset/dataset under --input-dir, holding
parquet or JSONL files; `--split-prefix original` keeps MMEB-train's `original-*.parquet` only.

Bad records are skipped and counted by reason (`--on-bad-record error` stops at the first, naming
it). The build stops before writing when more than --max-bad-fraction of the records are bad, or
when a subset has no good record (`--allow-empty-subsets` reports it and builds the others).
A dataset already built from the same input is reused; from a different input it is refused
(`--overwrite` rebuilds it).
"""
from __future__ import annotations

import argparse
import collections
import glob
import hashlib
import json
import logging
import os
import shutil
import sys

from coma_jax.data.bad_records import BadDataError, BadRecord
from coma_jax.data.formats import convert_qa_generation, read_jsonl

log = logging.getLogger('coma_jax.data')

RAW_SUFFIXES = ('.parquet', '.jsonl')


def discover_splits(input_dir: str, prefix: str = '') -> dict[str, list[str]]:
  """Subset name -> its raw files: sub-folders, or files named after the subset."""
  splits = {}
  for entry in sorted(os.listdir(input_dir)):
    path = os.path.join(input_dir, entry)
    try:
      entry.encode('utf-8')
    except UnicodeEncodeError:
      raise BuildInputError(f'subset {entry!r} under {input_dir}: the name is not UTF-8; rename it') from None
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


class BuildInputError(ValueError):
  """The build's own input is wrong (a missing argument, a subset folder name): not a record."""


class DatasetMismatch(BuildInputError):
  """A dataset already built in the data folder from other input or other builder arguments."""


def file_digest(path: str) -> dict:
  sha = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      sha.update(block)
  return {'file': os.path.basename(path), 'bytes': os.path.getsize(path), 'sha256': sha.hexdigest()}


def fingerprint(kind: str, version: str, splits: dict[str, list[str]], image_root: str | None,
                allow_empty_subsets: bool) -> dict:
  """What the dataset's content depends on: the raw files (size and content hash, not the
  images), the builder arguments and the builder version. JSON-normalised."""
  return json.loads(json.dumps({
      'builder': kind, 'version': version, 'image_root': image_root and os.path.abspath(image_root),
      'allow_empty_subsets': allow_empty_subsets,
      'splits': {name: [file_digest(f) for f in files] for name, files in sorted(splits.items())}}))


def _differences(old: dict, new: dict) -> list[str]:
  keys = sorted(set(old) | set(new))
  return [f'{k}: built {old.get(k)!r:.200}, now {new.get(k)!r:.200}' for k in keys if old.get(k) != new.get(k)]


def build(kind: str, data_dir: str, *, inputs=None, validation_inputs=None, input_dir=None, image_root=None,
          on_bad_record='skip', split_prefix='', max_bad_fraction=0.05, allow_empty_subsets=False,
          overwrite=False):
  """Builds the dataset, or reuses one built from the same input; returns the builder. The
  skip report (records, kept, skipped by reason, per split) is in its metadata['bad_records']."""
  from coma_jax.data.tfds_builders.mmeb import MmebEval, MmebTrain
  from coma_jax.data.tfds_builders.stage1_qa import Stage1Qa
  if kind == 'stage1_qa':
    if not inputs:
      raise BuildInputError('stage1_qa needs --input (a LLaVA-style JSONL file)')
    cls, splits = Stage1Qa, {'train': list(inputs)}
    if validation_inputs:
      splits['validation'] = list(validation_inputs)
  else:
    if validation_inputs:
      raise BuildInputError(f'{kind} takes no --validation-input: its splits are its subsets')
    if not input_dir:
      raise BuildInputError(f'{kind} needs --input-dir (one folder or file per subset)')
    cls = {'mmeb_train': MmebTrain, 'mmeb_eval': MmebEval}[kind]
    splits = discover_splits(input_dir, split_prefix)
  from coma_jax.data.tfds_builders.base import split_name
  names = collections.defaultdict(list)
  for name in splits:
    names[split_name(name)].append(name)
  clashes = [group for group in names.values() if len(group) > 1]
  if clashes:
    raise BuildInputError(f'subsets {clashes} would share a TFDS split name; rename one of each')
  for files in splits.values():
    for f in files:
      if not os.path.isfile(f):
        raise FileNotFoundError(f'input file {f} does not exist')
  expected = fingerprint(kind, str(cls.VERSION), splits, image_root, allow_empty_subsets)
  make = lambda: cls(splits=splits, image_root=image_root, on_bad_record=on_bad_record,
                     max_bad_fraction=max_bad_fraction, allow_empty_subsets=allow_empty_subsets,
                     fingerprint=expected, data_dir=data_dir)
  builder = make()
  if os.path.exists(os.path.join(builder.data_dir, 'dataset_info.json')):
    built = dict(builder.info.metadata.get('fingerprint') or {})
    if built == expected:
      log.info('reusing %s, built from the same input', builder.data_dir)
      return builder
    if not overwrite:
      raise DatasetMismatch(f'{builder.data_dir} was built from other input or arguments; rebuild it with '
                            '--overwrite (overwrite=True) or build into another --data-dir. Differences:\n  '
                            + '\n  '.join(_differences(built, expected) or ['no fingerprint (an older build)']))
    return _replace(builder.data_dir, make)
  builder.download_and_prepare()
  return builder


def _replace(version_dir: str, make):
  """Rebuilds a dataset; the old one is kept aside until the new one is complete, and restored
  if the build fails (a wrong image root must not cost the good dataset)."""
  previous = version_dir.rstrip('/') + '.previous'  # not a version folder: loaders never pick it
  shutil.rmtree(previous, ignore_errors=True)
  os.rename(version_dir, previous)
  try:
    builder = make()
    builder.download_and_prepare()
  except BaseException:
    if not os.path.exists(version_dir):
      os.rename(previous, version_dir)
    raise
  log.warning('rebuilt %s from changed input', version_dir)
  shutil.rmtree(previous)
  return builder


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('kind', choices=['stage1_qa', 'mmeb_train', 'mmeb_eval', 'convert_qa'])
  parser.add_argument('--input', action='append', help='raw JSONL file (repeatable)')
  parser.add_argument('--validation-input', action='append',
                      help="stage1_qa: raw JSONL file of the 'validation' split (repeatable)")
  parser.add_argument('--input-dir')
  parser.add_argument('--image-root')
  parser.add_argument('--data-dir')
  parser.add_argument('--output', help='convert_qa: the LLaVA JSONL to write')
  parser.add_argument('--on-bad-record', default='skip', choices=['skip', 'error'])
  parser.add_argument('--split-prefix', default='')
  parser.add_argument('--max-bad-fraction', type=float, default=0.05,
                      help='stop, writing nothing, when more of the records are bad (default 0.05)')
  parser.add_argument('--allow-empty-subsets', action='store_true',
                      help='leave out and report a subset with no good record, instead of stopping')
  parser.add_argument('--overwrite', action='store_true', help='rebuild a dataset built from other input')
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
  if not args.data_dir:
    parser.error('--data-dir is required')
  try:
    builder = build(args.kind, args.data_dir, inputs=args.input, validation_inputs=args.validation_input,
                    input_dir=args.input_dir, image_root=args.image_root, on_bad_record=args.on_bad_record,
                    split_prefix=args.split_prefix, max_bad_fraction=args.max_bad_fraction,
                    allow_empty_subsets=args.allow_empty_subsets, overwrite=args.overwrite)
  except (BadRecord, BadDataError, BuildInputError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    report = getattr(e, 'report', None)
    if report:
      print(f'skip report: {json.dumps({k: v for k, v in report.items() if k != "first"})}', file=sys.stderr)
    return 1
  bad = builder.info.metadata.get('bad_records', {})
  counts = {k: v.num_examples for k, v in builder.info.splits.items()}
  print(f'{builder.name}: {counts} examples in {builder.data_dir}; {bad.get("records", 0)} records, '
        f'skipped {bad.get("skipped", 0)} bad records {bad.get("by_reason", {})}')
  if bad.get('empty_subsets'):
    print(f'  left out, no good record: {bad["empty_subsets"]}')
  for line in bad.get('first', []):
    print('  ', line)
  return 0


if __name__ == '__main__':
  sys.exit(main())
