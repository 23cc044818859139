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
  vision = dict(
      pixel_patches=s((groups, slots, cfg.vision.patch_dim), pixel_dtype),
      vision_rope_ids=s((groups, slots, 2), jnp.int32), window_index=s((groups, 1, slots // u), jnp.int32),
      window_inverse=s((groups, slots // u), jnp.int32), window_segment_ids=s((groups, 1, slots), jnp.int32),
      full_segment_ids=s((groups, 1, slots), jnp.int32)) if slots else {}
  return ModelInputs(
      input_ids=s((batch, length), jnp.int32), token_valid=s((batch, length), jnp.bool_),
      positions=s((3, batch, length), jnp.int32, axis=1), vision_token_index=s((batch, length), jnp.int32),
      segment_ids=s((batch, length), jnp.int32), **vision)


def _rows(cfg, batch, bucket, k, mesh, rules, examples_per_group, pixel_dtype, slots_per_row) -> dict:
  """What `collate_rows` returns, as shapes (roles and labels stay on the host)."""
  s, length, p = _struct(mesh, rules), bucket.seq_len, bucket.label_slots
  i32 = lambda *shape: s(shape, jnp.int32)
  return {'inputs': abstract_inputs(cfg, batch, bucket, mesh, rules, examples_per_group, pixel_dtype),
          'label_positions': i32(batch, p), 'label_targets': i32(batch, p), 'label_counts': i32(batch, p),
          'labelled_examples': i32(batch), 'compression_positions': i32(batch, slots_per_row, k),
          'rep_index': i32(batch, slots_per_row), 'example_valid': s((batch,), jnp.bool_),
          'split_index': i32(batch, length), 'split_slot': i32(batch, length), 'split_segment': i32(batch, length),
          'token_ids': i32(batch, length), 'token_offsets': i32(batch, length)}


def abstract_stage1_batch(cfg: ModelConfig, batch: int, bucket: Bucket, k: int, mesh, rules,
                          examples_per_group: int = 1, pixel_dtype=jnp.float32, slots_per_row: int = 1,
                          examples: int | None = None) -> dict:
  """`batch` rows holding `examples` examples (default: one per row); packed rows pass
  `examples_per_group=1` and their `slots_per_row`."""
  rows = _rows(cfg, batch, bucket, k, mesh, rules, examples_per_group, pixel_dtype, slots_per_row)
  return dict(rows, example_ids=_struct(mesh, rules)((examples or batch,), jnp.int32))


def abstract_stage2_batch(cfg: ModelConfig, batch: int, bucket: Bucket, k: int, mesh, rules, sides,
                          pixel_dtype=jnp.float32, packed_rows: int | None = None, slots_per_row: int = 1) -> dict:
  """Unpacked: one row set per side, `batch` rows each. Packed: one 'packed' set of `packed_rows`
  rows of `slots_per_row` sequences (`bucket` per row)."""
  s = _struct(mesh, rules)
  if packed_rows is None:
    out = {side: _rows(cfg, batch, bucket, k, mesh, rules, 1, pixel_dtype, 1) for side in sides}
  else:
    out = {'packed': _rows(cfg, packed_rows, bucket, k, mesh, rules, 1, pixel_dtype, slots_per_row)}
  return dict(out, example_ids=s((batch,), jnp.int32))
