"""The input pipeline: global sampler -> this process's records -> examples (grain workers) ->
bucketed static batches -> global jax.Arrays.

Workers (grain `mp_prefetch`) read, decode, preprocess and tokenize the examples of a step.
The main process agrees with the other processes on the bucket (an element-wise max of what
each needs), pads into the static batch, and assembles global arrays with
`jax.make_array_from_process_local_data`. The state is the next step: see `sampler.py`.
"""
from __future__ import annotations

import dataclasses
import logging
import signal
import time
from typing import Any, Callable, Iterator, Sequence

import grain
import jax
import numpy as np

from coma_jax.data.bad_records import BadRecord, BadRecordLog, check_bad_fraction, guard_min_records
from coma_jax.data.sampler import process_slice
from coma_jax.data.step_batches import BatchSpec, global_max, step_batch  # noqa: F401 (re-exported)
from coma_jax.model.inputs import BATCH_AXIS

log = logging.getLogger('coma_jax.data')


class ConcatSource:
  """Random access over several sources (e.g. one per MMEB subset) by global id."""

  def __init__(self, sources: Sequence):
    self.sources = list(sources)
    self.offsets = np.concatenate([[0], np.cumsum([len(s) for s in self.sources])])

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def __getitem__(self, global_id: int):
    s = int(np.searchsorted(self.offsets, global_id, side='right') - 1)
    return self.sources[s][int(global_id - self.offsets[s])]


@dataclasses.dataclass
class StepReader:
  """Runs in a worker: the examples of this process's slice of one global step.

  `make_example(raw_record, global_id)` returns an Example (or a dict of them, one per side) or
  raises BadRecord, which becomes an all-padding row under the 'skip' policy. Any other error is
  a bug: it propagates (from a worker too), with a note naming the record.
  """
  source: Any
  sampler: Any
  make_example: Callable
  process_index: int
  process_count: int
  on_bad_record: str = 'skip'

  def __call__(self, step: int) -> dict:
    bad = BadRecordLog(self.on_bad_record)
    examples = []
    ids = process_slice(self.sampler.batch_ids(step), self.process_index, self.process_count)
    for gid in ids:
      try:
        examples.append(self.make_example(self.source[int(gid)], int(gid)))
        bad.kept += 1
      except BadRecord as e:
        bad.handle(e)
        examples.append(None)
      except Exception as e:
        e.add_note(f'coma_jax: while making the example of record {int(gid)} (global id) at step {step}')
        raise
    return {'step': step, 'examples': examples, 'ids': ids, 'bad': bad}


@dataclasses.dataclass
class BatchInfo:
  """What the host knows of a batch and the device never sees: the bucket, statistics (padding
  waste, truncation cuts) and the bad records skipped so far. Stage 2 unpacked: bucket and stats
  per side; packed: one PackedBucket and one stats dict."""
  step: int
  bucket: Any
  stats: dict
  bad_records: int


class GlobalBatchIterator:
  """Yields (step, batch, info): `batch` holds NumPy arrays only, in a structure fixed by the
  bucket (it goes into a jitted step as it is; see `step_batches`); `info` is a BatchInfo.
  `state()` is {'step': next step} to checkpoint.
  Steps run from `start_step` up to, not including, `end_step`."""

  def __init__(self, reader: StepReader, spec: BatchSpec, *, start_step: int = 0, end_step: int,
               num_workers: int = 0, prefetch: int = 2, log_every: int = 100, max_bad_fraction: float = 0.05):
    """`max_bad_fraction`: stop (BadDataError naming the top reasons) when more of this process's
    records are bad, once `guard_min_records` of them were read."""
    self.reader, self.spec, self.next_step = reader, spec, start_step
    self.bad = BadRecordLog(reader.on_bad_record)
    self.max_bad_fraction = max_bad_fraction
    self.log_every = log_every
    dataset = grain.MapDataset.range(start_step, end_step).map(reader).to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=prefetch))
    if num_workers > 0:
      _mark_flags_parsed()
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                                 per_worker_buffer_size=prefetch),
                                    worker_init_fn=_ignore_sigterm)
    self._it = iter(dataset)
    self._start_time, self._examples = time.perf_counter(), 0

  def state(self) -> dict:
    return {'step': self.next_step}

  def report(self) -> dict:
    """This process's records so far: records = kept + skipped, skipped by reason."""
    return self.bad.summary()

  def restore_report(self, report: dict) -> None:
    """Continues a checkpointed report (a resumed run counts from where it stopped)."""
    self.bad.kept += report.get('kept', 0)
    self.bad.counts.update(report.get('by_reason', {}))
    self.bad.first.extend(report.get('first', [])[:self.bad.keep_first])

  def __iter__(self) -> Iterator[tuple[int, dict, BatchInfo]]:
    return self

  def __next__(self) -> tuple[int, dict, BatchInfo]:
    item = next(self._it)
    step, examples = item['step'], item['examples']
    self.bad.merge(item['bad'])
    check_bad_fraction(self.bad.summary(), self.max_bad_fraction, 'data loading (this process)',
                       'data.max_bad_fraction', guard_min_records(self.max_bad_fraction))
    batch, bucket, stats = step_batch(self.spec, examples, item['ids'])
    self.next_step = step + 1
    self._examples += len(examples)
    if self.log_every and self.next_step % self.log_every == 0:
      rate = self._examples / (time.perf_counter() - self._start_time)
      log.info('data step %d: %.1f examples/s (this process), %d bad records skipped',
               step, rate, self.bad.total)
    return step, batch, BatchInfo(step, bucket, stats, self.bad.total)


def _ignore_sigterm(worker_index: int, worker_count: int) -> None:
  """In a worker: a SIGTERM to the process group is the training loop's to handle (it saves and
  closes the loader, which stops the workers). A worker killed mid-write would leave a partial
  message that hangs the loader's close."""
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _mark_flags_parsed() -> None:
  # grain's worker processes read absl flags; outside absl.app.run they must be marked parsed.
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def to_global(batch: dict, sharding_for: Callable[[str, tuple], jax.sharding.Sharding],
              processes: int | None = None) -> dict:
  """Process-local numpy batch -> global jax.Arrays.

  `sharding_for(name, global_shape)`: each process holds an equal slice of the batch axis, so the
  global shape is the local one with that axis times the number of processes the sharding spans
  (`processes`: default all; 1 for a mesh of this process's devices only).
  """
  processes = jax.process_count() if processes is None else processes

  def put(name, value):
    if value is None or not isinstance(value, np.ndarray):
      return value
    axis = BATCH_AXIS.get(name, 0)
    global_shape = value.shape[:axis] + (value.shape[axis] * processes,) + value.shape[axis + 1:]
    return jax.make_array_from_process_local_data(sharding_for(name, global_shape), value, global_shape)

  out = {}
  for key, value in batch.items():
    if isinstance(value, dict):
      out[key] = to_global(value, sharding_for, processes)
    elif dataclasses.is_dataclass(value):
      out[key] = value.replace(**{f.name: put(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)})
    else:
      out[key] = put(key, value)
  return out
