"""Blockwise (flash) attention in pure JAX: never materialises the (T x S) scores.

Forward: for each query block, an online softmax over key blocks (running max, sum and output,
fp32). The custom VJP saves only the output and the log-sum-exp per query row and recomputes each
(query block x key block) tile in the backward pass (FlashAttention-2's scheme). Memory is
linear in the sequence length: one tile of scores at a time plus fp32 accumulators of q/k/v's size.

Only tiles that can hold a visible pair are visited (`block_ranges`): causal calls stop at the
diagonal, and packed rows skip the tiles between their examples (dynamic loop bounds are fine: the
loops are never differentiated, the VJP is ours). Masking follows the dispatch's contract:
query t sees key s iff their segment ids are equal (and s <= t when causal). A query row that sees
no key gives zeros. Blocks pad the sequence; padded queries and keys get segment ids no real row
uses (-1 and -2; real segment ids are >= 0).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

DEFAULT_BLOCK = 512
_PAD_Q, _PAD_KV = -1, -2


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def block_sizes(t: int, s: int, block: int | None = None) -> tuple[int, int]:
  """Query and key block sizes: `block`, or the whole (8-rounded) length when shorter."""
  block = block or DEFAULT_BLOCK
  return min(block, _round_up(t, 8)), min(block, _round_up(s, 8))


def pad_rows(x: jax.Array, length: int, value) -> jax.Array:
  """x (B, L, ...) padded along L to `length` with `value`."""
  extra = length - x.shape[1]
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def _tile_mask(q_seg, k_seg, q_start, k_start, causal: bool, q_off):
  """(B, bq, bk) bool for one tile; q_off (B,): the queries' offset among the keys."""
  mask = q_seg[:, :, None] == k_seg[:, None, :]
  if causal:
    rows = q_off[:, None] + q_start + jnp.arange(q_seg.shape[1])[None]
    cols = k_start + jnp.arange(k_seg.shape[1])
    mask = mask & (rows[:, :, None] >= cols[None, None, :])
  return mask


def _scores(q_blk, k_blk, scale):
  # q_blk (B, bq, K, G, D), k_blk (B, bk, K, D) -> (B, K, G, bq, bk) fp32
  return jnp.einsum('bqkgd,bskd->bkgqs', q_blk, k_blk, preferred_element_type=jnp.float32) * scale


def block_ranges(q_seg, k_seg, bq: int, bk: int, causal: bool, q_off=None):
  """Which tiles can hold a visible (query, key) pair, as contiguous loop ranges: per query block
  its key blocks [lo, hi), per key block its query blocks [q_lo, q_hi). A tile is needed when, in
  some row, its query and key segment-id ranges overlap (and, causal, it is not above the
  diagonal). Skipping the others is exact: a tile with no visible pair changes nothing. Packed rows
  (segments in order) then cost about the sum of their examples' tiles, not the whole row's."""
  b, t = q_seg.shape
  nq, nk = t // bq, k_seg.shape[1] // bk
  big = jnp.iinfo(jnp.int32).max

  def summary(seg, blk):  # per row and block: the least and greatest real segment id (pads are < 0)
    x = seg.reshape(b, -1, blk)
    return jnp.where(x >= 0, x, big).min(-1), jnp.where(x >= 0, x, -big).max(-1)
  q_min, q_max = summary(q_seg, bq)
  k_min, k_max = summary(k_seg, bk)
  need = jnp.any((q_min[:, :, None] <= k_max[:, None, :]) & (k_min[:, None, :] <= q_max[:, :, None]), axis=0)
  if causal:
    shift = 0 if q_off is None else q_off.max()
    need &= (jnp.arange(nk)[None, :] * bk) <= (jnp.arange(nq)[:, None] * bq + bq - 1 + shift)

  def first_last(x, n):  # along the last axis: [first True, last True + 1), or an empty range
    some = x.any(-1)
    return (jnp.where(some, jnp.argmax(x, -1), n).astype(jnp.int32),
            jnp.where(some, n - jnp.argmax(x[..., ::-1], -1), 0).astype(jnp.int32))
  lo, hi = first_last(need, nk)
  q_lo, q_hi = first_last(need.T, nq)
  return lo, hi, q_lo, q_hi


def _forward(q, k, v, q_seg, k_seg, q_off, causal, bq, bk, scale):
  """q (B, T, K, G, D), k/v (B, S, K, D), padded to whole blocks -> out (B, T, K, G, D), lse (B, K, G, T)."""
  b, t, kh, g, d = q.shape
  lo, hi, _, _ = block_ranges(q_seg, k_seg, bq, bk, causal, q_off)

  def query_block(qi):
    q_blk = jax.lax.dynamic_slice_in_dim(q, qi * bq, bq, axis=1)
    q_seg_blk = jax.lax.dynamic_slice_in_dim(q_seg, qi * bq, bq, axis=1)

    def step(kj, carry):
      m, l, acc = carry
      k_blk = jax.lax.dynamic_slice_in_dim(k, kj * bk, bk, axis=1)
      v_blk = jax.lax.dynamic_slice_in_dim(v, kj * bk, bk, axis=1)
      k_seg_blk = jax.lax.dynamic_slice_in_dim(k_seg, kj * bk, bk, axis=1)
      mask = _tile_mask(q_seg_blk, k_seg_blk, qi * bq, kj * bk, causal, q_off)[:, None, None]
      s = jnp.where(mask, _scores(q_blk, k_blk, scale), -jnp.inf)
      m_new = jnp.maximum(m, s.max(-1))
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # an all-masked row so far stays at zero
      p = jnp.exp(s - m_safe[..., None])
      correction = jnp.exp(m - m_safe)
      l = l * correction + p.sum(-1)
      pv = jnp.einsum('bkgqs,bskd->bkgqd', p.astype(v.dtype), v_blk, preferred_element_type=jnp.float32)
      return m_new, l, acc * correction[..., None] + pv

    init = (jnp.full((b, kh, g, bq), -jnp.inf, jnp.float32), jnp.zeros((b, kh, g, bq), jnp.float32),
            jnp.zeros((b, kh, g, bq, d), jnp.float32))
    m, l, acc = jax.lax.fori_loop(lo[qi], hi[qi], step, init)
    seen = l > 0
    out = acc / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)  # inf: the backward's p is 0
    return out, lse

  out, lse = jax.lax.map(query_block, jnp.arange(t // bq))  # (nq, B, K, G, bq, D), (nq, B, K, G, bq)
  out = jnp.moveaxis(out, 0, 3).reshape(b, kh, g, t, d).transpose(0, 3, 1, 2, 4)
  lse = jnp.moveaxis(lse, 0, 3).reshape(b, kh, g, t)
  return out.astype(q.dtype), lse


def _backward(q, k, v, q_seg, k_seg, q_off, out, lse, d_out, causal, bq, bk, scale):
  b, t, kh, g, d = q.shape
  s_len = k.shape[1]
  nk = s_len // bk
  _, _, q_lo, q_hi = block_ranges(q_seg, k_seg, bq, bk, causal, q_off)
  # delta_t = sum_d dO * O: the softmax backward's row term, (B, K, G, T).
  delta = jnp.einsum('btkgd,btkgd->bkgt', d_out.astype(jnp.float32), out.astype(jnp.float32))

  def key_block(kj, carry):
    dq, dk, dv = carry
    k_blk = jax.lax.dynamic_slice_in_dim(k, kj * bk, bk, axis=1)
    v_blk = jax.lax.dynamic_slice_in_dim(v, kj * bk, bk, axis=1)
    k_seg_blk = jax.lax.dynamic_slice_in_dim(k_seg, kj * bk, bk, axis=1)

    def step(qi, inner):
      dq, dk_blk, dv_blk = inner
      q_blk = jax.lax.dynamic_slice_in_dim(q, qi * bq, bq, axis=1)
      do_blk = jax.lax.dynamic_slice_in_dim(d_out, qi * bq, bq, axis=1)
      q_seg_blk = jax.lax.dynamic_slice_in_dim(q_seg, qi * bq, bq, axis=1)
      lse_blk = jax.lax.dynamic_slice_in_dim(lse, qi * bq, bq, axis=3)
      delta_blk = jax.lax.dynamic_slice_in_dim(delta, qi * bq, bq, axis=3)
      mask = _tile_mask(q_seg_blk, k_seg_blk, qi * bq, kj * bk, causal, q_off)[:, None, None]
      p = jnp.where(mask, jnp.exp(_scores(q_blk, k_blk, scale) - lse_blk[..., None]), 0.0)
      dv_blk = dv_blk + jnp.einsum('bkgqs,bqkgd->bskd', p.astype(d_out.dtype), do_blk,
                                   preferred_element_type=jnp.float32)
      dp = jnp.einsum('bqkgd,bskd->bkgqs', do_blk, v_blk, preferred_element_type=jnp.float32)
      ds = (p * (dp - delta_blk[..., None])).astype(q.dtype)
      dq_blk = jnp.einsum('bkgqs,bskd->bqkgd', ds, k_blk, preferred_element_type=jnp.float32) * scale
      dq = jax.lax.dynamic_update_slice_in_dim(
          dq, jax.lax.dynamic_slice_in_dim(dq, qi * bq, bq, axis=1) + dq_blk, qi * bq, axis=1)
      dk_blk = dk_blk + jnp.einsum('bkgqs,bqkgd->bskd', ds, q_blk, preferred_element_type=jnp.float32) * scale
      return dq, dk_blk, dv_blk

    zeros = jnp.zeros((b, bk, kh, d), jnp.float32)
    dq, dk_blk, dv_blk = jax.lax.fori_loop(q_lo[kj], q_hi[kj], step, (dq, zeros, zeros))
    dk = jax.lax.dynamic_update_slice_in_dim(dk, dk_blk, kj * bk, axis=1)
    dv = jax.lax.dynamic_update_slice_in_dim(dv, dv_blk, kj * bk, axis=1)
    return dq, dk, dv

  init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dq, dk, dv = jax.lax.fori_loop(0, nk, key_block, init)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _flash(q, k, v, q_seg, k_seg, q_off, causal, bq, bk, scale):
  return _forward(q, k, v, q_seg, k_seg, q_off, causal, bq, bk, scale)[0]


def _flash_fwd(q, k, v, q_seg, k_seg, q_off, causal, bq, bk, scale):
  out, lse = _forward(q, k, v, q_seg, k_seg, q_off, causal, bq, bk, scale)
  return out, (q, k, v, q_seg, k_seg, q_off, out, lse)


def _flash_bwd(causal, bq, bk, scale, residuals, d_out):
  q, k, v, q_seg, k_seg, q_off, out, lse = residuals
  dq, dk, dv = _backward(q, k, v, q_seg, k_seg, q_off, out, lse, d_out, causal, bq, bk, scale)
  return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array,
                        kv_segment_ids: jax.Array, *, causal: bool, block: int | None = None,
                        q_offset: jax.Array | None = None) -> jax.Array:
  """q (B, T, N, D), k/v (B, S, K, D), segment ids (B, T) / (B, S) -> (B, T, N, D) in q's dtype.
  q_offset (B,): query t of row b sits at key position q_offset[b] + t (causal; None = 0)."""
  b, t, n, d = q.shape
  s_len, kv_heads = k.shape[1], k.shape[2]
  bq, bk = block_sizes(t, s_len, block)
  t_pad, s_pad = _round_up(t, bq), _round_up(s_len, bk)
  qg = pad_rows(q.reshape(b, t, kv_heads, n // kv_heads, d), t_pad, 0)
  k, v = pad_rows(k, s_pad, 0), pad_rows(v, s_pad, 0)
  q_seg = pad_rows(q_segment_ids.astype(jnp.int32), t_pad, _PAD_Q)
  k_seg = pad_rows(kv_segment_ids.astype(jnp.int32), s_pad, _PAD_KV)
  q_off = jnp.zeros((b,), jnp.int32) if q_offset is None else jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (b,))
  out = _flash(qg, k, v, q_seg, k_seg, q_off, causal, bq, bk, d ** -0.5)
  return out[:, :t].reshape(b, t, n, d)
