"""Bad input: one exception type that names the record, and a counted, logged skip policy."""
from __future__ import annotations

import collections
import dataclasses
import logging

log = logging.getLogger('coma_jax.data')

POLICIES = ('skip', 'error')


class BadRecord(ValueError):
  """A record that cannot become a correct example. The message names the record."""

  def __init__(self, record_id: str, reason: str, detail: str = ''):
    self.record_id, self.reason, self.detail = str(record_id), reason, detail
    super().__init__(f'bad record {self.record_id!r}: {reason}' + (f' ({detail})' if detail else ''))


@dataclasses.dataclass
class BadRecordLog:
  """Counts skipped records by reason and keeps the first offenders for the summary."""
  policy: str = 'skip'
  keep_first: int = 10
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  first: list = dataclasses.field(default_factory=list)

  def __post_init__(self):
    if self.policy not in POLICIES:
      raise ValueError(f'on_bad_record must be one of {POLICIES}, got {self.policy!r}')

  def handle(self, error: BadRecord) -> None:
    """Raises under 'error'; under 'skip' counts it and logs the first offenders."""
    if self.policy == 'error':
      raise error
    self.counts[error.reason] += 1
    if len(self.first) < self.keep_first:
      self.first.append(str(error))
      log.warning('skipping %s', error)

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def merge(self, other: 'BadRecordLog') -> None:
    self.counts.update(other.counts)
    self.first.extend(other.first[:max(0, self.keep_first - len(self.first))])

  def summary(self) -> dict:
    return {'skipped': self.total, 'by_reason': dict(self.counts), 'first': list(self.first)}
