"""Reading MMEB-eval for the evaluation: the published layout or the built TFDS `mmeb_eval`.

Published: one folder per dataset holding parquet (or one `<dataset>.parquet` file each) with
`qry_text, qry_img_path, tgt_text, tgt_img_path`, images under `DIR/eval_images` unless
`image_root` says otherwise. TFDS: a data_dir holding `mmeb_eval/` (python -m coma_jax.data.build_tfds
mmeb_eval), images under the root it was built with.

Nothing is skipped, because a skip would change the score: a malformed row, a tag without an
image (or an image without a tag) or a missing image is an error naming the dataset and row.
"""
from __future__ import annotations

import glob
import os

from coma_jax.data.bad_records import BadRecord
from coma_jax.data.formats import EvalRecord, Side, check_side, check_text, parse_mmeb_eval, read_rows


class EvalDataError(ValueError):
  """The evaluation data is not usable as it is; the message names the dataset and row."""


def _published_files(root: str) -> dict[str, list[str]]:
  out = {}
  for entry in sorted(os.listdir(root)):
    path = os.path.join(root, entry)
    if os.path.isdir(path):
      files = sorted(glob.glob(os.path.join(path, '**', '*.parquet'), recursive=True))
      if files:
        out[entry] = files
    elif entry.endswith('.parquet'):
      out[entry[:-len('.parquet')]] = [path]
  return out


def _read_published(root: str, image_root: str) -> dict[str, list[EvalRecord]]:
  files = _published_files(root)
  if not files:
    raise EvalDataError(f'{root}: expected MMEB-eval in its published layout (one folder of parquet, or one '
                        '<dataset>.parquet, per dataset) or a data_dir with a built mmeb_eval; found neither')
  out = {}
  for name, paths in files.items():
    records = []
    for path in paths:
      for location, row in read_rows(path):
        index = len(records)
        try:
          if isinstance(row, BadRecord):
            raise row
          records.append(parse_mmeb_eval(row, name, index, image_root))
        except BadRecord as e:
          raise EvalDataError(f'{name}, row {index} ({location}): {e.reason} ({e.detail})') from None
    out[name] = records
  return out


def _read_tfds(data_dir: str, image_root: str | None) -> dict[str, list[EvalRecord]]:
  from coma_jax.data.loaders import open_builder
  builder = open_builder(data_dir, 'mmeb_eval')
  root = image_root or (builder.info.metadata.get('fingerprint') or {}).get('image_root')
  names = builder.info.metadata.get('split_names', {})
  out = {}
  for split, source in sorted(builder.as_data_source().items()):
    name = names.get(split, split)
    records = []
    for i in range(len(source)):
      r = source[i]
      side = lambda t, p: Side(check_text(t, name, 'text'), _join(root, check_text(p, name, 'image')))
      query = side(r['qry_text'], r['qry_img_path'])
      candidates = tuple(side(t, p) for t, p in zip(r['tgt_text'], r['tgt_img_path']))
      try:
        for label, s in [('query', query)] + [(f'candidate {j}', c) for j, c in enumerate(candidates)]:
          check_side(s, f'{name}/{i}', label)
      except BadRecord as e:
        raise EvalDataError(f'{name}, row {i}: {e.reason} ({e.detail})') from None
      records.append(EvalRecord(id=f'{name}/{i}', dataset=name, query=query, candidates=candidates))
    out[name] = records
  return out


def _join(root, path):
  if not path:
    return None
  return path if root is None or os.path.isabs(path) else os.path.join(root, path)


def read_mmeb_eval(mmeb_dir: str, image_root: str | None = None,
                   datasets: list[str] | None = None) -> dict[str, list[EvalRecord]]:
  """Dataset name -> its records (candidate 0 of each is the positive); every image checked to exist."""
  if os.path.isdir(os.path.join(mmeb_dir, 'mmeb_eval')):
    data = _read_tfds(mmeb_dir, image_root)
  else:
    data = _read_published(mmeb_dir, image_root or os.path.join(mmeb_dir, 'eval_images'))
  if datasets:
    unknown = [d for d in datasets if d not in data]
    if unknown:
      raise EvalDataError(f'{mmeb_dir} has no dataset {unknown}; it has {sorted(data)}')
    data = {d: data[d] for d in datasets}
  for name, records in data.items():
    for i, record in enumerate(records):
      for side in (record.query,) + record.candidates:
        if side.image is not None and not os.path.isfile(side.image):
          raise EvalDataError(f'{name}, row {i}: missing image {side.image}')
  return data
