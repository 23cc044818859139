"""The one attention dispatch point of the model.

Every attention call (vision windows, vision full attention, the LLM, the stage-1 split calls)
goes through `attention`. The masking is described by segment ids (a query sees keys of the same
segment) and a causal flag, which is exactly what fused kernels (cuDNN via
`jax.nn.dot_product_attention`, TPU splash attention) take, so they can plug in here later.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ('xla',)
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: a fully masked row gives no NaN


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids: jax.Array | None = None,
              kv_segment_ids: jax.Array | None = None, causal: bool = False, impl: str = 'xla',
              mask: jax.Array | None = None) -> jax.Array:
  """Scaled dot-product attention with grouped KV heads.

  q: (B, T, N, D); k, v: (B, S, K, D) with N % K == 0; segment ids: (B, T) and (B, S) ints.
  Query t may attend key s iff their segment ids are equal (and s <= t when causal).
  `mask` (B, 1, T, S) bool replaces segments and causality: the explicit-mask CPU reference only.
  Returns (B, T, N, D) in q's dtype.
  """
  if impl != 'xla':
    raise ValueError(f'Unknown attention implementation {impl!r}; available: {IMPLEMENTATIONS}')
  b, t, n, d = q.shape
  kv_heads = k.shape[2]
  if n % kv_heads:
    raise ValueError(f'{n} query heads are not a multiple of {kv_heads} KV heads')
  qg = q.reshape(b, t, kv_heads, n // kv_heads, d)
  logits = jnp.einsum('btkgd,bskd->bkgts', qg, k, preferred_element_type=jnp.float32)
  logits = logits * (d ** -0.5)
  if mask is None:
    mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]  # (B, T, S)
    if causal:
      mask = mask & (jnp.arange(t)[:, None] >= jnp.arange(k.shape[1])[None, :])
  else:
    mask = mask[:, 0]
  logits = jnp.where(mask[:, None, None], logits, _MASKED)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum('bkgts,bskd->btkgd', probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, n, d).astype(q.dtype)
