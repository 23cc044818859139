"""Reading and writing (sharded) safetensors checkpoints, tensor by tensor. No pickle, ever."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import struct

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


# safetensors dtype names -> numpy (bf16 and fp8 via ml_dtypes).
DTYPES = {'BOOL': np.bool_, 'U8': np.uint8, 'I8': np.int8, 'I16': np.int16, 'U16': np.uint16,
          'I32': np.int32, 'U32': np.uint32, 'I64': np.int64, 'U64': np.uint64, 'F16': np.float16,
          'F32': np.float32, 'F64': np.float64, 'BF16': ml_dtypes.bfloat16,
          'F8_E4M3': ml_dtypes.float8_e4m3fn, 'F8_E5M2': ml_dtypes.float8_e5m2}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  file: str
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int  # of the first byte, from the start of the file


def read_header(file: str) -> dict[str, TensorInfo]:
  """The tensors a safetensors file holds, from its JSON header alone."""
  with open(file, 'rb') as f:
    size = struct.unpack('<Q', f.read(8))[0]
    if size > MAX_HEADER_BYTES:
      raise ValueError(f'{file}: a {size}-byte header is not a safetensors file')
    header = json.loads(f.read(size))
  out = {}
  for key, entry in header.items():
    if key == '__metadata__':
      continue
    if entry['dtype'] not in DTYPES:
      raise ValueError(f'{file}: {key} has dtype {entry["dtype"]}, which is not read')
    begin, end = entry['data_offsets']
    info = TensorInfo(file, np.dtype(DTYPES[entry['dtype']]), tuple(entry['shape']), 8 + size + begin)
    if end - begin != math.prod(info.shape) * info.dtype.itemsize:
      raise ValueError(f'{file}: {key} holds {end - begin} bytes, not those of {info.shape} {info.dtype}')
    out[key] = info
  return out


class CheckpointReader:
  """Key -> file map of a local checkpoint; reads tensors, or row ranges of them, with plain reads.

  Nothing is memory-mapped: mapped file pages count in the resident set for as long as a file
  stays mapped, so a whole-checkpoint load would hold the checkpoint twice.
  """

  def __init__(self, path: str):
    self.path = path
    index = os.path.join(path, INDEX_FILE)
    single = os.path.join(path, SINGLE_FILE)
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f).get('weight_map')
      if not isinstance(weight_map, dict):
        raise ValueError(f'{index} has no weight_map')
      headers = {}
      for name in sorted(set(weight_map.values())):
        if not os.path.exists(os.path.join(path, name)):
          raise FileNotFoundError(f'{index} names {name}, which is missing')
        headers[name] = read_header(os.path.join(path, name))
      self.infos = {}
      for key, name in weight_map.items():
        if key not in headers[name]:
          raise ValueError(f'{index} puts {key} in {name}, which does not hold it')
        self.infos[key] = headers[name][key]
    elif os.path.exists(single):
      self.infos = read_header(single)
    else:
      found = [n for n in os.listdir(path) if n.endswith(('.bin', '.pt', '.pth', '.ckpt'))]
      hint = f' (found {found}: only safetensors are read, never pickle)' if found else ''
      raise FileNotFoundError(f'{path} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}')
    self._fds: dict[str, int] = {}

  def keys(self) -> list[str]:
    return list(self.infos)

  def info(self, key: str) -> TensorInfo:
    return self.infos[key]

  def read_rows(self, key: str, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the tensor's first axis, as a fresh array."""
    info = self.infos[key]
    if not 0 <= start <= stop <= (info.shape[0] if info.shape else 1):
      raise IndexError(f'rows [{start}, {stop}) of {key}, which has shape {info.shape}')
    out = np.empty((stop - start,) + info.shape[1:], info.dtype)
    row_bytes = out.itemsize * math.prod(info.shape[1:])
    self._read_into(info.file, info.offset + start * row_bytes, memoryview(out.reshape(-1).view(np.uint8)))
    return out

  def get(self, key: str) -> np.ndarray:
    shape = self.infos[key].shape
    if not shape:
      return self.read_rows(key, 0, 1).reshape(())
    return self.read_rows(key, 0, shape[0])

  def _read_into(self, file: str, offset: int, buffer: memoryview) -> None:
    if file not in self._fds:
      self._fds[file] = os.open(file, os.O_RDONLY)
    done = 0
    while done < len(buffer):
      n = os.preadv(self._fds[file], [buffer[done:]], offset + done)
      if n == 0:
        raise ValueError(f'{file} ends before the tensor it claims to hold')
      done += n

  def close(self) -> None:
    for fd in self._fds.values():
      os.close(fd)
    self._fds.clear()


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

