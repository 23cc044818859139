"""Stage-1 compression QA (LLaVA-instruct JSONL) as a TFDS ArrayRecord dataset, images embedded."""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from coma_jax.data.bad_records import BadRecord
from coma_jax.data.formats import Stage1Record, check_stage1, check_text, parse_llava
from coma_jax.data.image import decode_image
from coma_jax.data.tfds_builders.base import RawFilesBuilder


def read_image_bytes(ref, record_id: str, validated: bool = False) -> bytes:
  """The original bytes of an image reference, checked by `decode_image` (the loaders' check)
  unless this row was already validated."""
  if not validated:
    decode_image(ref, record_id)  # missing / empty / corrupt / bomb / aspect ratio -> BadRecord
  if isinstance(ref, str):
    with open(ref, 'rb') as f:
      return f.read()
  return ref


class Stage1Qa(RawFilesBuilder):
  """Features: id, images (encoded bytes), questions, answers, input_text."""

  def features(self):
    return tfds.features.FeaturesDict({
        'id': tfds.features.Text(),
        'images': tfds.features.Sequence(tfds.features.Scalar(dtype=np.object_)),
        'questions': tfds.features.Sequence(tfds.features.Text()),
        'answers': tfds.features.Sequence(tfds.features.Text()),
        'input_text': tfds.features.Text(),
    })

  def example(self, row, split, index, location, validated=False):
    record = parse_llava(row, self.image_root, record_id=location)
    images = [read_image_bytes(ref, record.id, validated) for ref in record.images]
    return {'id': record.id, 'images': images, 'questions': [q for q, _ in record.turns],
            'answers': [a for _, a in record.turns], 'input_text': record.input_text}


def record_from_features(features: dict) -> Stage1Record:
  """A decoded ArrayRecord example (as the data source returns it) -> a checked Stage1Record."""
  rid = check_text(features['id'], 'unnamed record', 'id') or 'unnamed record'
  questions = [check_text(q, rid, 'questions') for q in features['questions']]
  answers = [check_text(a, rid, 'answers') for a in features['answers']]
  if len(questions) != len(answers):
    raise BadRecord(rid, 'malformed record', f'{len(questions)} questions for {len(answers)} answers')
  return check_stage1(Stage1Record(id=rid, images=tuple(bytes(i) for i in features['images']),
                                   turns=tuple(zip(questions, answers)),
                                   input_text=check_text(features['input_text'], rid, 'input_text')))
