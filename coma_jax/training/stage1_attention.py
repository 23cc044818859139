"""The stage-1 compression mask: causal, and dialogue rows never see prefix columns.

`paper` runs it as two plain causal attention calls per layer, the form fused kernels take:
  call 1: the row as is (prefix and compression rows are right; dialogue rows are discarded);
  call 2: the row gathered from its first compression token on ([compression + dialogue]);
dialogue rows come from call 2, scattered back with host-made indices (`data.batching.collate_rows`).
q and k carry their rotary positions already, so the gather keeps relative positions. A packed row
holds several examples: call 1 separates them by segment ids, call 2 gathers each example's tail
as its own segment (equal query and key segment ids, the form the GPU kernels take).
`causal` is what the released code ran. `reference_mask` is the explicit (B, 1, L, L) CPU check.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from coma_jax.data.sequences import ROLE_DIALOGUE, ROLE_PREFIX
from coma_jax.model.attention import attention

MASK_MODES = ('paper', 'causal')


def _take_rows(x: jax.Array, index: jax.Array) -> jax.Array:
  """x (B, L, ...) gathered along L by index (B, L'), -1 -> position 0 (masked by the caller)."""
  idx = jnp.maximum(index, 0).reshape(index.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def paper_attend(segments, split_index, split_slot, split_segment, impl: str = 'auto'):
  seg, seg2 = segments, split_segment

  def attend(layer, q, k, v):
    full = attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True, impl=impl, call='stage1_full_row')
    q2, k2, v2 = (_take_rows(a, split_index) for a in (q, k, v))
    tail = attention(q2, k2, v2, q_segment_ids=seg2, kv_segment_ids=seg2, causal=True, impl=impl,
                     call='stage1_dialogue_tail')
    back = _take_rows(tail, split_slot)
    return jnp.where((split_slot >= 0)[:, :, None, None], back, full)
  return attend


def reference_mask(roles: jax.Array, segments: jax.Array) -> jax.Array:
  """(B, 1, L, L) bool: causal within a segment (an example), valid keys, and no dialogue-row ->
  prefix-column attention."""
  length = roles.shape[1]
  causal = jnp.arange(length)[:, None] >= jnp.arange(length)[None, :]
  same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)
  blocked = (roles[:, :, None] == ROLE_DIALOGUE) & (roles[:, None, :] == ROLE_PREFIX)
  return (causal & same & ~blocked)[:, None]


def reference_attend(roles, segments):
  mask = reference_mask(roles, segments)
  return lambda layer, q, k, v: attention(q, k, v, mask=mask)


def stage1_attend(mode: str, batch: dict, impl: str = 'auto'):
  inputs = batch['inputs']
  if mode == 'paper':
    return paper_attend(inputs.segments, batch['split_index'], batch['split_slot'], batch['split_segment'], impl)
  if mode == 'causal':
    seg = inputs.segments
    return lambda layer, q, k, v: attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True, impl=impl, call='text')
  raise ValueError(f'stage-1 mask mode must be one of {MASK_MODES}, got {mode!r}')
