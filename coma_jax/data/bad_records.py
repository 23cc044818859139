"""Bad input: one exception type that names the record, a counted and logged skip policy, and
the guards that stop a build or a run whose data is mostly bad."""
from __future__ import annotations

import collections
import dataclasses
import logging
import math

log = logging.getLogger('coma_jax.data')

POLICIES = ('skip', 'error')


class BadRecord(ValueError):
  """A record that cannot become a correct example. The message names the record."""

  def __init__(self, record_id: str, reason: str, detail: str = ''):
    self.record_id, self.reason, self.detail = str(record_id), reason, detail
    super().__init__(f'bad record {self.record_id!r}: {reason}' + (f' ({detail})' if detail else ''))

  def __reduce__(self):  # picklable with its fields: grain workers hand errors to the main process
    return type(self), (self.record_id, self.reason, self.detail)


class BadDataError(ValueError):
  """The data as a whole is unusable (too many bad records, an empty subset); has the report."""

  def __init__(self, message: str, report: dict):
    self.report = report
    super().__init__(message)

  def __reduce__(self):
    return type(self), (str(self), self.report)


@dataclasses.dataclass
class BadRecordLog:
  """Counts kept and skipped records (by reason) and keeps the first offenders for the summary."""
  policy: str = 'skip'
  keep_first: int = 10
  kept: int = 0
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

  @property
  def records(self) -> int:
    return self.kept + self.total

  def merge(self, other: 'BadRecordLog') -> None:
    self.kept += other.kept
    self.counts.update(other.counts)
    self.first.extend(other.first[:max(0, self.keep_first - len(self.first))])

  def summary(self) -> dict:
    """records = kept + skipped; skipped = the sum of by_reason."""
    return {'records': self.records, 'kept': self.kept, 'skipped': self.total,
            'by_reason': dict(self.counts.most_common()), 'first': list(self.first)}


def check_bad_fraction(report: dict, max_fraction: float, what: str, knob: str, min_records: int = 1) -> None:
  """Raises BadDataError naming the top reasons when more than `max_fraction` of the records
  are bad (a wrong image root skips them all), once at least `min_records` were seen."""
  records, skipped = report['records'], report['skipped']
  if records < max(1, min_records) or skipped <= max_fraction * records:
    return
  top = ', '.join(f'{reason}: {n}' for reason, n in collections.Counter(report['by_reason']).most_common(3))
  first = ''.join(f'\n  {line}' for line in report.get('first', [])[:3])
  raise BadDataError(f'{what}: {skipped} of {records} records are bad ({skipped / records:.1%} > {knob} '
                     f'{max_fraction:g}); top reasons: {top}. First offenders:{first}', report)


def guard_min_records(max_fraction: float) -> int:
  """How many records a load sees before its bad-fraction guard applies: enough that a few bad
  records early on do not stop a run (10 bad records' worth at the limit)."""
  return 1 if max_fraction <= 0 else math.ceil(10 / max_fraction)
