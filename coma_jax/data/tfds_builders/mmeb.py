"""MMEB-train pairs and MMEB-eval records as TFDS ArrayRecord datasets (one split per subset)."""
from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from coma_jax.data.bad_records import BadRecord
from coma_jax.data.formats import Side, Stage2Record, check_text, parse_mmeb_eval, parse_mmeb_train
from coma_jax.data.image import decode_image
from coma_jax.data.tfds_builders.base import RawFilesBuilder
from coma_jax.data.tfds_builders.stage1_qa import read_image_bytes

SIDES = (('qry', 'query'), ('pos', 'positive'), ('neg', 'negative'))


class MmebTrain(RawFilesBuilder):
  """Features per side (qry, pos, neg): text and image bytes (b'' = no image); has_neg."""

  def features(self):
    feats = {'id': tfds.features.Text(), 'has_neg': tfds.features.Scalar(dtype=np.bool_)}
    for short, _ in SIDES:
      feats[f'{short}_text'] = tfds.features.Text()
      feats[f'{short}_image'] = tfds.features.Scalar(dtype=np.object_)
    return tfds.features.FeaturesDict(feats)

  def example(self, row, split, index, location, validated=False):
    record = parse_mmeb_train(row, split, index, self.image_root)
    out = {'id': record.id, 'has_neg': record.negative is not None}
    for short, name in SIDES:
      side = getattr(record, name) or Side('')
      out[f'{short}_text'] = side.text
      out[f'{short}_image'] = b'' if side.image is None else read_image_bytes(side.image, record.id, validated)
    return out


def pair_from_features(features: dict, subset: str) -> Stage2Record:
  """A decoded ArrayRecord example -> a Stage2Record; its sides are checked by the sequence builder."""
  rid = check_text(features['id'], f'{subset}/unnamed', 'id') or f'{subset}/unnamed'
  sides = {}
  for short, name in SIDES:
    image = bytes(features[f'{short}_image']) or None
    sides[name] = Side(check_text(features[f'{short}_text'], rid, f'{short}_text'), image)
  return Stage2Record(id=rid, subset=subset, query=sides['query'], positive=sides['positive'],
                      negative=sides['negative'] if bool(features['has_neg']) else None)


class MmebEval(RawFilesBuilder):
  """Features: query text and image path, candidate texts and image paths (index 0 positive).

  Images stay paths (relative to the eval image root): candidates share images across queries,
  so each distinct image is checked (`decode_image`, as the loaders do) once per build.
  """

  def _check_image_once(self, path: str, record_id: str) -> None:
    checked = self.__dict__.setdefault('_checked_images', {})  # path -> None (good) or the BadRecord
    if path not in checked:
      try:
        decode_image(path, record_id)
        checked[path] = None
      except BadRecord as e:
        checked[path] = e
    if checked[path] is not None:  # named by this record, whichever record found it first
      raise BadRecord(record_id, checked[path].reason, checked[path].detail)

  def features(self):
    return tfds.features.FeaturesDict({
        'id': tfds.features.Text(), 'qry_text': tfds.features.Text(), 'qry_img_path': tfds.features.Text(),
        'tgt_text': tfds.features.Sequence(tfds.features.Text()),
        'tgt_img_path': tfds.features.Sequence(tfds.features.Text()),
    })

  def example(self, row, split, index, location, validated=False):
    record = parse_mmeb_eval(row, split, index, self.image_root)
    if not validated:
      for side in (record.query,) + record.candidates:
        if side.image is not None:
          self._check_image_once(side.image, record.id)
    rel = lambda p: '' if p is None else (os.path.relpath(p, self.image_root) if self.image_root else p)
    return {'id': record.id, 'qry_text': record.query.text, 'qry_img_path': rel(record.query.image),
            'tgt_text': [c.text for c in record.candidates],
            'tgt_img_path': [rel(c.image) for c in record.candidates]}

