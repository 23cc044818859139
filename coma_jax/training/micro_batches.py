"""Splitting a global batch into micro-batches (stage-1 accumulation) or GradCache chunks (stage 2).

Micro-batch m takes vision groups m, m+M, ... with their rows, so each micro-batch stays spread
over the data-sharded devices.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from coma_jax.model.inputs import BATCH_AXIS


def split_micro_batches(batch: dict, num_micro: int, groups: int | None = None) -> dict:
  """Leading micro-batch axis: micro m holds vision groups m, m+M, ... and their rows (so each
  micro-batch stays spread over the data-sharded devices). `groups` defaults to the batch's."""
  inputs = batch['inputs']
  rows = inputs.input_ids.shape[0]
  if groups is None:
    groups = inputs.pixel_patches.shape[0] if inputs.pixel_patches is not None else rows
  if groups % num_micro or rows % groups:
    raise ValueError(f'{groups} vision groups of {rows} rows do not split into {num_micro} micro-batches')

  def split(path, x):
    name = getattr(path[-1], 'name', getattr(path[-1], 'key', None))
    axis = BATCH_AXIS.get(name, 0)
    n = x.shape[axis]
    per_group = n // groups  # rows per group on row axes, 1 on group axes
    x = x.reshape(x.shape[:axis] + (groups // num_micro, num_micro, per_group) + x.shape[axis + 1:])
    x = jnp.moveaxis(x, axis + 1, 0)
    return x.reshape(x.shape[:axis + 1] + (n // num_micro,) + x.shape[axis + 3:])
  return jax.tree_util.tree_map_with_path(split, batch)


def merge_micro_batches(x: jax.Array, groups: int, num_micro: int) -> jax.Array:
  """The inverse of `split_micro_batches` for a per-row array (M, B/M, ...) -> (B, ...)."""
  m, per_micro = x.shape[:2]
  per_group = per_micro * m // groups
  x = x.reshape((m, groups // m, per_group) + x.shape[2:])
  return jnp.moveaxis(x, 0, 1).reshape((m * per_micro,) + x.shape[3:])
