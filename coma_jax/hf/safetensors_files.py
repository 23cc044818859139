"""Reading and writing (sharded) safetensors checkpoints, tensor by tensor. No pickle, ever."""
from __future__ import annotations

import json
import os
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'


class CheckpointReader:
  """Key -> file map of a local checkpoint; reads one tensor at a time (bf16 via ml_dtypes)."""

  def __init__(self, path: str):
    self.path = path
    index = os.path.join(path, INDEX_FILE)
    single = os.path.join(path, SINGLE_FILE)
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f).get('weight_map')
      if not isinstance(weight_map, dict):
        raise ValueError(f'{index} has no weight_map')
      self.files = {k: os.path.join(path, v) for k, v in weight_map.items()}
      for file in sorted(set(self.files.values())):
        if not os.path.exists(file):
          raise FileNotFoundError(f'{index} names {os.path.basename(file)}, which is missing')
    elif os.path.exists(single):
      with safe_open(single, framework='numpy') as f:
        self.files = {k: single for k in f.keys()}
    else:
      found = [n for n in os.listdir(path) if n.endswith(('.bin', '.pt', '.pth', '.ckpt'))]
      hint = f' (found {found}: only safetensors are read, never pickle)' if found else ''
      raise FileNotFoundError(f'{path} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}')
    self._open: dict[str, object] = {}

  def keys(self) -> list[str]:
    return list(self.files)

  def get(self, key: str) -> np.ndarray:
    file = self.files[key]
    if file not in self._open:
      self._open[file] = safe_open(file, framework='numpy')
    return self._open[file].get_tensor(key)

  def close(self) -> None:
    self._open.clear()


class ShardedWriter:
  """Writes tensors into shards of at most `max_shard_bytes`, then the index (HF layout)."""

  def __init__(self, path: str, max_shard_bytes: int):
    self.path, self.max_bytes = path, max_shard_bytes
    self.current: dict[str, np.ndarray] = {}
    self.current_bytes, self.shards, self.total = 0, [], 0
    os.makedirs(path, exist_ok=True)

  def add(self, key: str, value: np.ndarray) -> None:
    if self.current and self.current_bytes + value.nbytes > self.max_bytes:
      self._flush()
    self.current[key] = np.ascontiguousarray(value)
    self.current_bytes += value.nbytes
    self.total += value.nbytes

  def _flush(self) -> None:
    name = f'shard-{len(self.shards):05d}.tmp'
    save_file(self.current, os.path.join(self.path, name), metadata={'format': 'pt'})
    self.shards.append((name, list(self.current)))
    self.current, self.current_bytes = {}, 0

  def finish(self) -> list[str]:
    """Renames the shards to their final names and writes the index; returns the file names."""
    if self.current:
      self._flush()
    n = len(self.shards)
    names = [SINGLE_FILE] if n == 1 else [f'model-{i + 1:05d}-of-{n:05d}.safetensors' for i in range(n)]
    weight_map = {}
    for (tmp, keys), name in zip(self.shards, names):
      os.replace(os.path.join(self.path, tmp), os.path.join(self.path, name))
      weight_map.update({k: name for k in keys})
    if n > 1:
      index = {'metadata': {'total_size': self.total}, 'weight_map': dict(sorted(weight_map.items()))}
      with open(os.path.join(self.path, INDEX_FILE), 'w') as f:
        json.dump(index, f, indent=2)
    return names

