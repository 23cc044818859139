"""Shape-only batches (ShapeDtypeStructs with shardings) for AOT compilation and planning."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from coma_jax.data.batching import Bucket
from coma_jax.model.config import ModelConfig
from coma_jax.model.inputs import ModelInputs
from coma_jax.parallel.rules import batch_sharding


def _struct(mesh, rules):
  return lambda shape, dtype, axis=0: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(shape, axis, rules, mesh))


def abstract_inputs(cfg: ModelConfig, batch: int, bucket: Bucket, mesh, rules, examples_per_group: int = 1,
                    pixel_dtype=jnp.float32):
  groups, length, slots = batch // examples_per_group, bucket.seq_len, bucket.vision_slots
  u = cfg.vision.merge_unit
  s = _struct(mesh, rules)
  return ModelInputs(
      input_ids=s((batch, length), jnp.int32), token_valid=s((batch, length), jnp.bool_),
      positions=s((3, batch, length), jnp.int32, axis=1), vision_token_index=s((batch, length), jnp.int32),
      pixel_patches=s((groups, slots, cfg.vision.patch_dim), pixel_dtype),
      vision_rope_ids=s((groups, slots, 2), jnp.int32), window_index=s((groups, 1, slots // u), jnp.int32),
      window_inverse=s((groups, slots // u), jnp.int32), window_segment_ids=s((groups, 1, slots), jnp.int32),
      full_segment_ids=s((groups, 1, slots), jnp.int32))


def abstract_stage1_batch(cfg: ModelConfig, batch: int, bucket: Bucket, k: int, mesh, rules,
                          examples_per_group: int = 1, pixel_dtype=jnp.float32) -> dict:
  s, length = _struct(mesh, rules), bucket.seq_len
  inputs = abstract_inputs(cfg, batch, bucket, mesh, rules, examples_per_group, pixel_dtype)
  return {'inputs': inputs, 'label_positions': s((batch, bucket.label_slots), jnp.int32),
          'label_targets': s((batch, bucket.label_slots), jnp.int32),
          'compression_positions': s((batch, k), jnp.int32), 'example_valid': s((batch,), jnp.bool_),
          'split_index': s((batch, length), jnp.int32), 'split_slot': s((batch, length), jnp.int32)}


def abstract_stage2_batch(cfg: ModelConfig, batch: int, bucket: Bucket, k: int, mesh, rules, sides,
                          pixel_dtype=jnp.float32) -> dict:
  s = _struct(mesh, rules)
  return {side: {'inputs': abstract_inputs(cfg, batch, bucket, mesh, rules, pixel_dtype=pixel_dtype),
                 'compression_positions': s((batch, k), jnp.int32), 'example_valid': s((batch,), jnp.bool_)}
          for side in sides}
