"""Append-only JSONL output keyed by id: a rerun skips what is done.

Each record is one `os.write` of a whole line on an O_APPEND file, so a kill loses at most the
record being written; a partial last line (a kill mid-write, a full disk) is cut off when the
file is opened again. Permanent failures go to `<output>.failures.jsonl` and are not asked again.
"""
from __future__ import annotations

import json
import logging
import os

log = logging.getLogger('coma_jax.datagen')


def _repair(path: str) -> None:
  """Cuts a partial last line."""
  if not os.path.exists(path) or os.path.getsize(path) == 0:
    return
  with open(path, 'rb+') as f:
    f.seek(-1, os.SEEK_END)
    if f.read(1) == b'\n':
      return
    f.seek(0)
    data = f.read()
    keep = data.rfind(b'\n') + 1
    f.truncate(keep)
  log.warning('%s: cut a partial last line (%d bytes) left by an interrupted run', path, len(data) - keep)


def read_ids(path: str) -> set[str]:
  ids = set()
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      for n, line in enumerate(f, 1):
        if line.strip():
          try:
            ids.add(json.loads(line)['id'])
          except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f'{path} line {n} is not a record with an id: not an output of this pipeline?') from None
  return ids


class JsonlStore:

  def __init__(self, path: str):
    self.path, self.failures_path = path, path + '.failures.jsonl'
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for p in (self.path, self.failures_path):
      _repair(p)
    self.done, self.failed = read_ids(self.path), read_ids(self.failures_path)
    self._fds = {p: os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) for p in (self.path, self.failures_path)}

  def _write(self, path: str, record: dict) -> None:
    line = (json.dumps(record, ensure_ascii=False) + '\n').encode('utf-8')
    written = os.write(self._fds[path], line)
    if written != len(line):
      raise OSError(f'{path}: wrote {written} of {len(line)} bytes (disk full?)')

  def append(self, record: dict) -> None:
    self._write(self.path, record)
    self.done.add(record['id'])

  def fail(self, record_id: str, reason: str, detail: str = '') -> None:
    self._write(self.failures_path, {'id': record_id, 'reason': reason, 'detail': detail[:500]})
    self.failed.add(record_id)

  def close(self) -> None:
    for fd in self._fds.values():
      os.close(fd)
