"""A TFDS ArrayRecord builder over local raw files: no TensorFlow, no downloads.

Subclasses give the features and turn one raw row into a TFDS example (validating it, images
decoded once so a bad image never reaches training). Bad records are skipped and counted (or
raise, with on_bad_record='error'); the counts land in the dataset's metadata.
"""
from __future__ import annotations

import re
from typing import Iterator, Mapping, Sequence

import tensorflow_datasets as tfds

from coma_jax.data.bad_records import BadRecord, BadRecordLog
from coma_jax.data.formats import read_rows


def split_name(name: str) -> str:
  """TFDS split names are word characters only ('OK-VQA' -> 'OK_VQA')."""
  return re.sub(r'\W', '_', name)


class RawFilesBuilder(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version('1.0.0')

  def __init__(self, *, splits: Mapping[str, Sequence[str]], image_root: str | None = None,
               on_bad_record: str = 'skip', **kwargs):
    """splits: original split name (a subset or dataset name) -> its raw parquet/JSONL files."""
    self.raw_splits = {name: list(files) for name, files in splits.items()}
    self.image_root = image_root
    self.bad = BadRecordLog(on_bad_record)
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  def features(self) -> tfds.features.FeaturesDict:
    raise NotImplementedError

  def example(self, row: dict, split: str, index: int) -> dict:
    """One raw row -> a TFDS example dict; raises BadRecord."""
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=self.features(), metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    self.info.metadata['split_names'] = {split_name(n): n for n in self.raw_splits}
    return {split_name(name): self._generate_examples(name, files) for name, files in self.raw_splits.items()}

  def _generate_examples(self, name: str, files: Sequence[str]) -> Iterator[tuple[str, dict]]:
    index = 0
    for file in files:
      for rid, row in read_rows(file):
        try:
          if isinstance(row, BadRecord):
            raise row
          yield f'{index:09d}', self.example(row, name, index)
        except BadRecord as e:
          self.bad.handle(e)
        index += 1
    self.info.metadata['bad_records'] = self.bad.summary()
