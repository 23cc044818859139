"""Shape-only batches (ShapeDtypeStructs with shardings) for AOT compilation and planning."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from coma_jax.data.batching import Bucket
from coma_jax.model.config import ModelConfig
from coma_jax.model.inputs import ModelInputs
from coma_jax.parallel.rules import batch_sharding


def abstract_stage1_batch(cfg: ModelConfig, batch: int, bucket: Bucket, k: int, mesh, rules,
                          examples_per_group: int = 1) -> dict:
  groups, length, slots = batch // examples_per_group, bucket.seq_len, bucket.vision_slots
  u = cfg.vision.merge_unit

  def s(shape, dtype, axis=0):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(shape, axis, rules, mesh))
  inputs = ModelInputs(
      input_ids=s((batch, length), jnp.int32), token_valid=s((batch, length), jnp.bool_),
      positions=s((3, batch, length), jnp.int32, axis=1), vision_token_index=s((batch, length), jnp.int32),
      pixel_patches=s((groups, slots, cfg.vision.patch_dim), jnp.float32),
      vision_rope_ids=s((groups, slots, 2), jnp.int32), window_index=s((groups, 1, slots // u), jnp.int32),
      window_inverse=s((groups, slots // u), jnp.int32), window_segment_ids=s((groups, 1, slots), jnp.int32),
      full_segment_ids=s((groups, 1, slots), jnp.int32))
  return {'inputs': inputs, 'label_positions': s((batch, bucket.label_slots), jnp.int32),
          'label_targets': s((batch, bucket.label_slots), jnp.int32),
          'compression_positions': s((batch, k), jnp.int32), 'example_valid': s((batch,), jnp.bool_),
          'split_index': s((batch, length), jnp.int32), 'split_slot': s((batch, length), jnp.int32)}
