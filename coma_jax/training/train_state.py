"""The train state: fp32 master copies of the trainable params, frozen params (bf16 or fp32) with
no optimizer state, the optimizer state, the step and the count of skipped (non-finite) updates."""
from __future__ import annotations

import jax
from flax import nnx, struct


@struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State       # trainable, fp32
  frozen: nnx.State       # frozen, in the frozen dtype
  opt_state: object
  skipped: jax.Array


def split_model(model: nnx.Module, trainable_filter):
  """graphdef, trainable params (fp32), frozen params; raises if nothing would train."""
  graphdef, params, frozen = nnx.split(model, trainable_filter, ...)
  if not jax.tree.leaves(params):
    raise ValueError('no parameter is trainable: add an adapter or make embeddings/vision trainable')
  return graphdef, params, frozen
