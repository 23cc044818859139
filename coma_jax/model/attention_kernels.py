"""Fused attention kernels behind the dispatch: cuDNN (GPU) and splash (TPU).

cuDNN (`jax.nn.dot_product_attention(implementation='cudnn')`) takes causal masks and per-row
lengths, in bf16/fp16 only. Our calls describe masking by segment ids; a row whose query and key
ids are one segment followed by padding (0) is exactly "length n", which is what collation makes.
A packed row (segments 1, 2, ..., n in contiguous runs, then padding; queries and keys alike) is
cuDNN's packed layout: per-segment offsets and lengths (`PACKED_SEGMENTS` at most per row; JAX's
cuDNN call with q/kv offsets, Hopper and later), behind `PACKED_CUDNN` (see there). Any
other row layout (left padding, more segments), or a packed row while that is off, is checked on
the device and goes to the blockwise path instead (`lax.cond`), so the kernel can never give a
wrong answer. Query rows on padding come back as zeros (nothing reads them).

Splash (TPU Pallas) takes separate query and key segment ids and causal or full masks; it pads to
whole 128-blocks with a segment id no real row uses and runs under `shard_map` over the batch when
a train step's mesh is active (a Pallas call cannot be partitioned by XLA). `interpret=True` runs
it on CPU (tests).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from coma_jax.model.attention_blockwise import blockwise_attention, pad_rows

_SPLASH_BLOCK = 128


def _prefix_lengths(seg: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per row: (length, ok). ok when the row is one nonzero segment id then zeros (length = its
  count), or all zeros (length = the row: padding rows attend each other, as with segment ids)."""
  first = seg[:, :1]
  nonzero = seg != 0
  length = jnp.where(first[:, 0] != 0, nonzero.sum(1), seg.shape[1]).astype(jnp.int32)
  expected = jnp.where(jnp.arange(seg.shape[1])[None] < length[:, None], first, 0)
  return length, jnp.all(seg == expected, axis=1)


PACKED_SEGMENTS = 16  # the most segments of a row the packed cuDNN call takes (data.max_per_row's default)
# On an H100 (jax 0.11.2, benchmarks/gpu_step.py's check) the packed call matches XLA in bf16
# (forward 0.4-0.5 %, gradients 0.4-0.8 %; causal GQA and MHA, full) once the rows outside every
# segment get zero inputs: without that its gradients were NaN / 4.4x off. Making the padding one
# more segment also passed, and is not needed. False sends packed rows to the blockwise path.
PACKED_CUDNN = True


def packed_runs(seg: jax.Array, max_segments: int = PACKED_SEGMENTS):
  """Per row: (offsets (B, M+1), lengths (B, M), ok (B,)) of segments 1..n laid out as contiguous
  runs in order, then zeros: each segment's start and length, -1 past the row's last segment (the
  layout JAX's packed cuDNN call takes). An all-zero row is one segment (its
  padding attends itself, as with segment ids). ok is False for any other layout or n > M."""
  b, length = seg.shape
  seg = seg.astype(jnp.int32)
  count = (seg != 0).sum(1)
  n = jnp.where(count > 0, seg.max(1), 1)
  steps = seg[:, 1:] - seg[:, :-1]
  inside = jnp.arange(1, length)[None] < count[:, None]  # both neighbours are real tokens
  ok = ((seg[:, 0] == 1) | (count == 0)) & jnp.all(jnp.where(inside, (steps == 0) | (steps == 1), True), axis=1)
  ok &= jnp.all((seg != 0) == (jnp.arange(length)[None] < count[:, None]), axis=1) & (n <= max_segments)
  ids = jnp.where(count[:, None] > 0, seg, 1)
  lengths = (ids[:, :, None] == jnp.arange(1, max_segments + 1)[None, None]).sum(1).astype(jnp.int32)
  present = jnp.arange(max_segments)[None] < n[:, None]
  starts = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), jnp.cumsum(lengths, axis=1)], axis=1)
  offsets = jnp.where(jnp.arange(max_segments + 1)[None] < n[:, None], starts, -1).astype(jnp.int32)
  return offsets, jnp.where(present, lengths, -1), ok


def packed_cudnn_call():
  """JAX's cuDNN attention with packed offsets (a private entry point); None where it is absent or
  `PACKED_CUDNN` is off."""
  if not PACKED_CUDNN:
    return None
  try:
    from jax._src.cudnn import fused_attention_stablehlo as fused
  except ImportError:
    return None
  import inspect
  if 'q_offsets' not in inspect.signature(fused.dot_product_attention).parameters:
    return None
  return fused


def cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids, *, causal: bool) -> jax.Array:
  q_len, q_ok = _prefix_lengths(q_segment_ids)
  kv_len, kv_ok = _prefix_lengths(kv_segment_ids)
  same_segment = q_segment_ids[:, 0] == kv_segment_ids[:, 0]
  fits = jnp.all(q_ok & kv_ok & same_segment)

  def fused(q, k, v):
    out = jax.nn.dot_product_attention(q, k, v, is_causal=causal, query_seq_lengths=q_len,
                                       key_value_seq_lengths=kv_len, implementation='cudnn')
    return jnp.where((jnp.arange(q.shape[1])[None] < q_len[:, None])[:, :, None, None], out, 0).astype(q.dtype)

  def fallback(q, k, v):
    return blockwise_attention(q, k, v, q_segment_ids, kv_segment_ids, causal=causal)

  kernel = packed_cudnn_call()
  if kernel is None or q.shape[1] != k.shape[1]:
    return jax.lax.cond(fits, fused, fallback, q, k, v)
  offsets, lengths, runs_ok = packed_runs(q_segment_ids)
  packed_fits = jnp.all(runs_ok) & jnp.all(q_segment_ids == kv_segment_ids)

  def fused_packed(q, k, v):
    mask = kernel.MaskType.CAUSAL if causal else kernel.MaskType.NO_MASK  # as JAX's own packed test
    # Rows outside every segment are undefined in the kernel: zero inputs keep its gradients finite.
    real = (q_segment_ids != 0)[:, :, None, None]
    q, k, v = (jnp.where(real, x, 0) for x in (q, k, v))
    out = kernel.dot_product_attention(q, k, v, None, None, lengths, lengths, offsets, offsets,
                                       scale=q.shape[-1] ** -0.5, mask_type=mask)
    return jnp.where((q_segment_ids != 0)[:, :, None, None], out, 0).astype(q.dtype)

  return jax.lax.cond(fits, fused, lambda q, k, v: jax.lax.cond(packed_fits, fused_packed, fallback, q, k, v),
                      q, k, v)


def _splash_kernel(num_heads: int, t: int, s: int, causal: bool, interpret: bool):
  # Built per trace, not cached: the kernel holds arrays, and one made under a trace must not leak.
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
  one = masks.CausalMask((t, s)) if causal else masks.FullMask((t, s))
  # The largest block that divides the (128-padded) length: splash refuses any other.
  bq, bkv = (next(b for b in (512, 256, 128) if n % b == 0) for n in (t, s))
  sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                            block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
  return splash.make_splash_mha(masks.MultiHeadMask([one] * num_heads), head_shards=1, q_seq_shards=1,
                                block_sizes=sizes, interpret=interpret)


def _splash_local(q, k, v, q_seg, kv_seg, *, causal: bool, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds
  kernel = _splash_kernel(q.shape[2], q.shape[1], k.shape[1], causal, interpret)
  heads_first = lambda x: x.transpose(0, 2, 1, 3)
  per_row = lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=SegmentIds(qs, ks))
  out = jax.vmap(per_row)(heads_first(q), heads_first(k), heads_first(v), q_seg, kv_seg)
  return heads_first(out)


def splash_attention(q, k, v, q_segment_ids, kv_segment_ids, *, causal: bool, interpret: bool = False,
                     mesh=None, batch_axes=None) -> jax.Array:
  b, t, n, d = q.shape
  s = k.shape[1]
  t_pad, s_pad = (-(-x // _SPLASH_BLOCK) * _SPLASH_BLOCK for x in (t, s))
  # Padding rows and columns share segment -1: padded queries see padded keys, so no row of the
  # kernel is empty (an empty row's 0/0 would poison the backward pass); real ids are >= 0.
  q_seg = pad_rows(q_segment_ids.astype(jnp.int32), t_pad, -1)
  kv_seg = pad_rows(kv_segment_ids.astype(jnp.int32), s_pad, -1)
  q = pad_rows(q * jnp.asarray(d ** -0.5, q.dtype), t_pad, 0)
  k, v = pad_rows(k, s_pad, 0), pad_rows(v, s_pad, 0)
  local = functools.partial(_splash_local, causal=causal, interpret=interpret)
  if mesh is not None and batch_axes:
    spec4, spec2 = P(batch_axes, None, None, None), P(batch_axes, None)
    local = jax.shard_map(local, mesh=mesh, in_specs=(spec4, spec4, spec4, spec2, spec2), out_specs=spec4,
                          check_vma=False)
  return local(q, k, v, q_seg, kv_seg)[:, :t].astype(q.dtype)
