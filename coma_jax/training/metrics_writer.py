"""Training metrics on disk: one JSON object per line in `metrics.jsonl` and TensorBoard scalars
in `tensorboard/`, both of which survive a resume without duplicated steps (`truncate_after`).

TensorBoard goes through tensorboardX, so TensorFlow is never imported. Only process 0 of a
multi-host run should write: the others pass `enabled=False` and every method does nothing."""
import json
import math
import os
import tempfile
import time
from numbers import Number

import numpy as np

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'
TRAIN_SPLIT = 'train'
_RESERVED_KEYS = ('step', 'split')


def to_json_value(value):
  """A metric value as JSON can hold it: scalars (Python, NumPy, JAX) become numbers, NaN/inf and
  None become null (never the bare NaN token), arrays become lists, anything else a string."""
  if value is None or isinstance(value, (bool, str)):
    return value
  if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, '__array__'):
    return to_json_value(np.asarray(value).tolist())  # pulls a JAX array to the host
  if isinstance(value, (list, tuple)):
    return [to_json_value(v) for v in value]
  if isinstance(value, int):
    return int(value)
  if isinstance(value, Number):
    value = float(value)
    return value if math.isfinite(value) else None
  return str(value)


def _scalar_for_tensorboard(value):
  """The float TensorBoard gets, or None when the value is not a single number. NaN and inf are
  kept: a diverging run should show in the curves."""
  if isinstance(value, (str, type(None))):
    return None
  try:
    array = np.asarray(value)
    # dtype kind 'V' is bfloat16 (ml_dtypes), which float() reads; objects and text are not numbers
    return float(array.reshape(())) if array.size == 1 and array.dtype.kind not in 'OSUM' else None
  except (TypeError, ValueError):
    return None


def _read_complete_records(path):
  """(step, line) for each line of a metrics file that is whole and parses; a line cut off by a
  crash, or one that does not parse, is dropped."""
  with open(path, 'rb') as f:
    lines = f.read().split(b'\n')
  records = []
  for raw in lines[:-1]:  # the last piece has no newline: empty or a torn write
    try:
      record = json.loads(raw)
      records.append((int(record['step']), raw))
    except (ValueError, KeyError, TypeError):
      continue
  return records


class MetricsWriter:
  """Owns `workdir/metrics.jsonl` and `workdir/tensorboard/`. Use as a context manager or call
  `close()`."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.workdir = workdir
    self.jsonl_path = os.path.join(workdir, METRICS_FILE)
    self.tensorboard_dir = os.path.join(workdir, TENSORBOARD_DIR)
    self._jsonl = None
    self._tensorboard = None
    self._purge_step = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._open_jsonl()

  def write(self, step: int, metrics: dict, split: str = TRAIN_SPLIT):
    """Appends `{"step": step, **metrics}` (plus `"split"` unless it is 'train') as one line, flushed
    at once, and logs each numeric metric as the TensorBoard scalar `f'{split}/{name}'`."""
    if not self.enabled:
      return
    clashes = [k for k in _RESERVED_KEYS if k in metrics]
    if clashes:
      raise ValueError(f'metric names {clashes} are reserved by the metrics file')
    step = int(step)
    record = {'step': step}
    if split != TRAIN_SPLIT:
      record['split'] = split
    record.update({str(name): to_json_value(value) for name, value in metrics.items()})
    self._jsonl.write(json.dumps(record, allow_nan=False) + '\n')
    self._jsonl.flush()
    tensorboard = self._tensorboard_writer()
    for name, value in metrics.items():
      scalar = _scalar_for_tensorboard(value)
      if scalar is not None:
        tensorboard.add_scalar(f'{split}/{name}', scalar, global_step=step)

  def truncate_after(self, step: int):
    """Forgets everything logged after `step` (the checkpoint a resumed run restarts from):
    metrics.jsonl is rewritten atomically with the lines of step <= `step`, and the next TensorBoard
    file tells readers to discard the events of later steps."""
    if not self.enabled:
      return
    step = int(step)
    self._close_jsonl()
    if os.path.exists(self.jsonl_path):
      kept = [line for line_step, line in _read_complete_records(self.jsonl_path) if line_step <= step]
      self._replace_jsonl(kept)
    self._open_jsonl()
    self._close_tensorboard()
    self._purge_step = step + 1  # applied by the writer opened at the next write

  def flush(self):
    if not self.enabled:
      return
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._tensorboard is not None:
      self._tensorboard.flush()

  def close(self):
    if not self.enabled:
      return
    self._close_jsonl()
    self._close_tensorboard()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()

  def _open_jsonl(self):
    self._jsonl = open(self.jsonl_path, 'a', encoding='utf-8')
    # A line torn by a crash must not swallow the next one: start on a fresh line.
    if self._jsonl.tell() > 0:
      with open(self.jsonl_path, 'rb') as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b'\n':
          self._jsonl.write('\n')

  def _close_jsonl(self):
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None

  def _replace_jsonl(self, lines):
    fd, tmp_path = tempfile.mkstemp(prefix=METRICS_FILE + '.', suffix='.tmp', dir=self.workdir)
    try:
      with os.fdopen(fd, 'wb') as f:
        f.writelines(line + b'\n' for line in lines)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp_path, self.jsonl_path)
    except BaseException:
      if os.path.exists(tmp_path):
        os.remove(tmp_path)
      raise

  def _tensorboard_writer(self):
    if self._tensorboard is None:
      from tensorboardX import SummaryWriter  # only the writing process pays for the import
      # tensorboardX names files by the second; the nanosecond suffix keeps a writer reopened in
      # the same second from overwriting the last one, and keeps the files in order.
      self._tensorboard = SummaryWriter(self.tensorboard_dir, purge_step=self._purge_step,
                                        filename_suffix=f'.{time.time_ns()}')
      self._purge_step = None
    return self._tensorboard

  def _close_tensorboard(self):
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None
