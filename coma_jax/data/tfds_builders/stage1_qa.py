"""Stage-1 compression QA (LLaVA-instruct JSONL) as a TFDS ArrayRecord dataset, images embedded."""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from coma_jax.data.bad_records import BadRecord
from coma_jax.data.formats import Stage1Record, parse_llava
from coma_jax.data.image import decode_image
from coma_jax.data.tfds_builders.base import RawFilesBuilder


def read_image_bytes(ref, record_id: str) -> bytes:
  """Validated original bytes of an image reference (decoded once here to catch bad images)."""
  data = ref
  if isinstance(ref, str):
    decode_image(ref, record_id)  # missing / empty / corrupt / bomb -> BadRecord
    with open(ref, 'rb') as f:
      data = f.read()
  else:
    decode_image(ref, record_id)
  return data


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

  def example(self, row, split, index):
    record = parse_llava(row, self.image_root, record_id=f'{split}/{index}')
    images = [read_image_bytes(ref, record.id) for ref in record.images]
    return {'id': record.id, 'images': images, 'questions': [q for q, _ in record.turns],
            'answers': [a for _, a in record.turns], 'input_text': record.input_text}


def record_from_features(features: dict) -> Stage1Record:
  """A decoded ArrayRecord example (as the data source returns it) -> Stage1Record."""
  text = lambda v: v.decode('utf-8') if isinstance(v, bytes) else str(v)
  rid = text(features['id'])
  questions, answers = [text(q) for q in features['questions']], [text(a) for a in features['answers']]
  if not questions or len(questions) != len(answers):
    raise BadRecord(rid, 'no conversation')
  return Stage1Record(id=rid, images=tuple(bytes(i) for i in features['images']),
                      turns=tuple(zip(questions, answers)), input_text=text(features['input_text']))
