"""The device mesh ('data', 'fsdp', 'tensor') from config; -1 takes the remaining devices."""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

AXES = ('data', 'fsdp', 'tensor')


def resolve_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  shape = list(shape)
  if len(shape) != len(AXES):
    raise ValueError(f'mesh shape {shape} must give one size per axis {AXES}')
  free = [i for i, s in enumerate(shape) if s == -1]
  if len(free) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f'mesh shape {shape}: sizes must be positive, with at most one -1')
  fixed = int(np.prod([s for s in shape if s != -1]))
  if free:
    if num_devices % fixed:
      raise ValueError(f'mesh shape {shape} does not divide {num_devices} devices')
    shape[free[0]] = num_devices // fixed
  if int(np.prod(shape)) != num_devices:
    raise ValueError(f'mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, there are {num_devices}')
  return tuple(shape)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  resolved = resolve_shape(shape, len(devices))
  return Mesh(np.asarray(devices).reshape(resolved), AXES)
