"""A TFDS ArrayRecord builder over local raw files: no TensorFlow, no downloads.

Subclasses give the features and turn one raw row into a TFDS example, validating it with the
same functions the loaders use (images decoded once, so a bad image never reaches training).

The build runs in two passes. The first validates every row and counts the bad ones by reason;
it stops before anything is written when a subset ends up empty (unless empty subsets are
allowed: then it is reported and left out) or when more than `max_bad_fraction` of the rows are
bad. The second writes the good rows, reading their images without decoding them again. The
report (records = kept + skipped, by reason, per split) and the input's fingerprint land in the
dataset's metadata.
"""
from __future__ import annotations

import logging
import re
from typing import Iterator, Mapping, Sequence

import tensorflow_datasets as tfds

from coma_jax.data.bad_records import BadDataError, BadRecord, BadRecordLog, check_bad_fraction
from coma_jax.data.formats import read_rows

log = logging.getLogger('coma_jax.data')


def split_name(name: str) -> str:
  """TFDS split names are word characters only ('OK-VQA' -> 'OK_VQA')."""
  return re.sub(r'\W', '_', name)


class RawFilesBuilder(tfds.core.GeneratorBasedBuilder):
  # 1.1.0: the build runs every config-independent check (aspect ratio, tags, all text fields).
  VERSION = tfds.core.Version('1.1.0')

  def __init__(self, *, splits: Mapping[str, Sequence[str]], image_root: str | None = None,
               on_bad_record: str = 'skip', max_bad_fraction: float = 0.05, allow_empty_subsets: bool = False,
               fingerprint: dict | None = None, **kwargs):
    """splits: original split name (a subset or dataset name) -> its raw parquet/JSONL files."""
    self.raw_splits = {name: list(files) for name, files in splits.items()}
    self.image_root = image_root
    self.on_bad_record, self.max_bad_fraction = on_bad_record, max_bad_fraction
    self.allow_empty_subsets = allow_empty_subsets
    self.fingerprint = fingerprint or {}
    BadRecordLog(on_bad_record)  # checks the policy name now, not after a long first pass
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  def features(self) -> tfds.features.FeaturesDict:
    raise NotImplementedError

  def example(self, row: dict, split: str, index: int, location: str, validated: bool = False) -> dict:
    """One raw row -> a TFDS example dict; raises BadRecord. `location` (file:line) names a
    record whose id is unusable. `validated`: the first pass checked this row, skip re-decoding."""
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=self.features(), metadata=tfds.core.MetadataDict())

  def _rows(self, files: Sequence[str]) -> Iterator[tuple[int, str, dict | BadRecord]]:
    index = 0
    for file in files:
      for location, row in read_rows(file):
        yield index, location, row
        index += 1

  def _validate(self) -> tuple[dict[str, list[int]], dict]:
    """First pass: the good row indices of each split, and the skip report."""
    good, logs = {}, {}
    for name, files in self.raw_splits.items():
      bad = logs[name] = BadRecordLog(self.on_bad_record)
      good[name] = []
      for index, location, row in self._rows(files):
        try:
          if isinstance(row, BadRecord):
            raise row
          self.example(row, name, index, location)
          good[name].append(index)
          bad.kept += 1
        except BadRecord as e:
          bad.handle(e)
        except Exception as e:  # a bug, not data: it stops the build, naming the row
          e.add_note(f'coma_jax: while checking {location} of {name!r}')
          raise
    total = BadRecordLog(self.on_bad_record)
    for bad in logs.values():
      total.merge(bad)
    report = total.summary()
    report['splits'] = {name: {k: v for k, v in bad.summary().items() if k != 'first'} for name, bad in logs.items()}
    report['empty_subsets'] = [name for name in self.raw_splits if not good[name]]
    log.info('%s: %d records, %d kept, %d skipped %s', self.name, report['records'], report['kept'],
             report['skipped'], report['by_reason'])
    return good, report

  def _split_generators(self, dl_manager):
    good, report = self._validate()
    empty = report['empty_subsets']
    if empty and (not self.allow_empty_subsets or len(empty) == len(self.raw_splits)):
      raise BadDataError(f'{self.name}: no good record in {empty}' + (
          '' if self.allow_empty_subsets else ' (--allow-empty-subsets builds the others and reports these)'),
          report)
    check_bad_fraction(report, self.max_bad_fraction, f'{self.name} build', '--max-bad-fraction')
    for name in empty:
      log.warning('%s: subset %r has no good record and is left out: %s', self.name, name,
                  report['splits'][name]['by_reason'])
    kept = [name for name in self.raw_splits if good[name]]
    self.info.metadata['split_names'] = {split_name(n): n for n in kept}
    self.info.metadata['bad_records'] = report
    self.info.metadata['fingerprint'] = self.fingerprint
    return {split_name(name): self._generate_examples(name, self.raw_splits[name], good[name]) for name in kept}

  def _generate_examples(self, name: str, files: Sequence[str], good: Sequence[int]) -> Iterator[tuple[str, dict]]:
    """Second pass: the rows the first pass kept (a row that turns bad now means the input changed)."""
    wanted = set(good)
    for index, location, row in self._rows(files):
      if index in wanted:
        yield f'{index:09d}', self.example(row, name, index, location, validated=True)
