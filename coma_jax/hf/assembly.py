"""Builds the host blocks of one parameter from its per-layer HF tensors, with bounded scratch.

Each distinct block the local devices hold is allocated once and filled in place, one pass over
the layers, reading HF rows a chunk at a time: the host holds this parameter's blocks plus one
chunk, never per-layer copies of the parameter and a stack of them.
"""
from __future__ import annotations

import math

import numpy as np

from coma_jax.hf import mapping
from coma_jax.hf.safetensors_files import CheckpointReader

CHUNK_BYTES = 32 * 1024**2  # the most read into a temporary at once
BlockKey = tuple[tuple[int, int], ...]  # (start, stop) per axis


def block_key(index: tuple[slice, ...], shape: tuple[int, ...]) -> BlockKey:
  """The global index of a device's block, with its slices spelled out."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  out = []
  for s, n in zip(index, shape):
    start, stop, step = s.indices(n)
    if step != 1:
      raise NotImplementedError(f'strided block index {index}')
    out.append((start, max(start, stop)))
  return tuple(out)


def transformed_shape(rule: mapping.Rule, hf_shape: tuple[int, ...]) -> tuple[int, ...]:
  """Our shape of an HF tensor of `hf_shape`, through the rule's transform, without its data."""
  dummy = np.broadcast_to(np.zeros((), np.int8), hf_shape)  # zero strides: nothing allocated
  return tuple(mapping.TRANSFORMS[rule.transform][0](dummy, None).shape)


def aligned_empty(shape: list[int], dtype: np.dtype, alignment: int = 64) -> np.ndarray:
  """On the CPU backend a 64-byte aligned host array becomes the device buffer itself (no copy),
  so a loaded parameter exists once in host memory, not twice while it is handed over."""
  nbytes = math.prod(shape) * dtype.itemsize
  raw = np.empty(nbytes + alignment, np.uint8)
  start = -raw.ctypes.data % alignment
  return raw[start:start + nbytes].view(dtype).reshape(shape)


def assemble(reader: CheckpointReader, rule: mapping.Rule, keys: list[str], shape: tuple[int, ...],
             dtype: np.dtype, blocks: list[BlockKey]) -> dict[BlockKey, np.ndarray]:
  """One host array per distinct block of the parameter at `rule.path`, in `dtype`.

  keys: the checkpoint key of each layer (one key for an unstacked parameter).
  """
  stacked = rule.stack is not None
  layer_shape = shape[1:] if stacked else shape
  out = {key: aligned_empty([stop - start for start, stop in key], dtype) for key in dict.fromkeys(blocks)}
  axis = mapping.ROW_AXIS[rule.transform]
  transform = mapping.TRANSFORMS[rule.transform][0]
  for i, hf_key in enumerate(keys):
    targets = []  # (this layer's part of a block, the block's per-layer index)
    for key, block in out.items():
      if not stacked:
        targets.append((block, key))
      elif key[0][0] <= i < key[0][1]:
        targets.append((block[i - key[0][0]], key[1:]))
    if not targets:
      continue
    info = reader.info(hf_key)
    rows = max(1, CHUNK_BYTES // (info.dtype.itemsize * math.prod(info.shape[1:])))
    first = min(index[axis][0] for _, index in targets)
    last = max(index[axis][1] for _, index in targets)
    for r0 in range(first, last, rows):
      r1 = min(last, r0 + rows)
      value = transform(reader.read_rows(hf_key, r0, r1), layer_shape)
      for dest, index in targets:
        start, stop = max(index[axis][0], r0), min(index[axis][1], r1)
        if start >= stop:
          continue
        src = tuple(slice(start - r0, stop - r0) if d == axis else slice(*ends) for d, ends in enumerate(index))
        dst = tuple(slice(start - index[axis][0], stop - index[axis][0]) if d == axis else slice(None)
                    for d in range(len(index)))
        np.copyto(dest[dst], value[src], casting='unsafe')
  return out
