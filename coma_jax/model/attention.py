"""The one attention dispatch point of the model.

Every attention call (vision windows, vision full attention, the LLM, the stage-1 split calls)
goes through `attention`. Masking is described by segment ids (a query sees keys of the same
segment) and a causal flag, the form fused kernels take. Implementations:
  xla        the reference: builds the fp32 (T x S) scores;
  blockwise  pure-JAX flash attention with its own VJP (`attention_blockwise.py`), any backend;
  cudnn      GPU, bf16/fp16: cuDNN flash attention on right-padded rows, blockwise otherwise;
  splash     TPU splash attention (`attention_kernels.py`);
  auto       by backend, dtype and shape (below); it logs its choice once per call kind.
A query row that sees no key gives zeros under xla and blockwise (the model never makes one: its
queries and keys share segment ids). Outputs at padding rows are unspecified with cudnn (zeros).

Queries after a KV cache (generation) give their `q_offset`: query t of row b is at key position
q_offset[b] + t. One query per row (a decode step) turns causality into a bound on the keys, which
every implementation takes as segment ids; several (a chunk) run under xla and blockwise, and
cudnn and splash hand them to blockwise (their masks are static).
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from coma_jax.model.attention_blockwise import blockwise_attention
from coma_jax.model.attention_kernels import cudnn_attention, splash_attention
from coma_jax.parallel import activations
from coma_jax.parallel.rules import mesh_axes_for

IMPLEMENTATIONS = ('auto', 'xla', 'blockwise', 'cudnn', 'splash')
# `auto` keeps small calls on XLA: the vision tower's 64-slot windows (64 x 64 scores) and short
# rows are below the kernels' block sizes, and XLA is fastest there.
SMALL_SCORES = 128 * 128
CPU_BLOCKWISE_FROM = 1024 * 1024  # CPU: blockwise once one (T x S) score matrix is this big
_FUSED_DTYPES = (jnp.bfloat16, jnp.float16)
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: a fully masked row gives no NaN

log = logging.getLogger('coma_jax.attention')
_logged: set = set()


def choose_implementation(impl: str, q: jax.Array, k: jax.Array, backend: str | None = None) -> str:
  """The implementation `impl` resolves to for these shapes on `backend` (default: JAX's)."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f'Unknown attention implementation {impl!r}; available: {IMPLEMENTATIONS}')
  backend = backend or jax.default_backend()
  if impl in ('cudnn', 'splash') and backend != {'cudnn': 'gpu', 'splash': 'tpu'}[impl]:
    raise ValueError(f'model.attention={impl!r} needs a {"GPU" if impl == "cudnn" else "TPU"}; this '
                     f'backend is {backend}: use auto, blockwise or xla')
  if impl == 'cudnn' and q.dtype not in _FUSED_DTYPES:  # cuDNN flash attention is bf16/fp16 only
    return 'blockwise'
  if impl != 'auto':
    return impl
  scores = q.shape[1] * k.shape[1]
  if scores <= SMALL_SCORES:
    return 'xla'
  if backend == 'gpu':
    return 'cudnn' if q.dtype in _FUSED_DTYPES else 'blockwise'
  if backend == 'tpu':
    return 'splash'
  return 'blockwise' if scores >= CPU_BLOCKWISE_FROM else 'xla'


def _log_choice(call: str, requested: str, chosen: str, q, k) -> None:
  key = (call, requested, chosen, q.shape[1], k.shape[1], str(q.dtype))
  if key not in _logged:
    _logged.add(key)
    log.info('attention %s: %s -> %s (queries %d, keys %d, %s)', call, requested, chosen, q.shape[1],
             k.shape[1], q.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids: jax.Array | None = None,
              kv_segment_ids: jax.Array | None = None, causal: bool = False, impl: str = 'xla',
              mask: jax.Array | None = None, call: str = 'attention', q_offset=None) -> jax.Array:
  """Scaled dot-product attention with grouped KV heads.

  q: (B, T, N, D); k, v: (B, S, K, D) with N % K == 0; segment ids: (B, T) and (B, S) ints >= 0
  (None: one segment). Query t may attend key s iff their segment ids are equal (and s <= t when
  causal). `mask` (B, 1, T, S) bool replaces segments and causality: the explicit-mask CPU
  reference only (XLA). `call` names the call kind in `auto`'s log. `q_offset` (int or (B,) ints):
  the queries' position among the keys (causal only; None = 0). Returns (B, T, N, D) in q's dtype.
  """
  n, kv_heads = q.shape[2], k.shape[2]
  if n % kv_heads:
    raise ValueError(f'{n} query heads are not a multiple of {kv_heads} KV heads')
  if mask is not None:
    return xla_attention(q, k, v, mask=mask[:, 0])
  if q_segment_ids is None:
    q_segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
  if kv_segment_ids is None:
    kv_segment_ids = jnp.zeros(k.shape[:2], jnp.int32)
  if q_offset is not None and causal:
    q_offset = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), q.shape[:1])
    if q.shape[1] == 1:  # one query: keys past it get an id unlike the query's (0, or -1 for a 0 query)
      hidden = jnp.where(q_segment_ids[:, :1] == 0, -1, 0)
      kv_segment_ids = jnp.where(jnp.arange(k.shape[1])[None] <= q_offset[:, None], kv_segment_ids, hidden)
      q_offset, causal = None, False
  elif not causal:
    q_offset = None
  chosen = choose_implementation(impl, q, k)
  if impl == 'auto':
    _log_choice(call, impl, chosen, q, k)
  if chosen == 'xla':
    return xla_attention(q, k, v, mask=segment_mask(q_segment_ids, kv_segment_ids, causal, q_offset))
  if chosen == 'blockwise' or q_offset is not None:
    return blockwise_attention(q, k, v, q_segment_ids, kv_segment_ids, causal=causal, q_offset=q_offset)
  if chosen == 'cudnn':
    return cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids, causal=causal)
  # Splash runs under shard_map over the batch's mesh axes while a train step is traced.
  mesh, batch_axes = None, None
  if (step := activations.active()) is not None:
    mesh, rules = step
    batch_axes = mesh_axes_for(('batch',), q.shape[:1], rules, mesh)[0]
  return splash_attention(q, k, v, q_segment_ids, kv_segment_ids, causal=causal, mesh=mesh, batch_axes=batch_axes)


def segment_mask(q_segment_ids, kv_segment_ids, causal: bool, q_offset=None) -> jax.Array:
  """(B, T, S) bool: equal segments, and key <= query (at q_offset + t) when causal."""
  mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  if causal:
    rows = jnp.arange(q_segment_ids.shape[1])[None]
    rows = rows if q_offset is None else rows + q_offset[:, None]
    mask = mask & (rows[:, :, None] >= jnp.arange(kv_segment_ids.shape[1])[None, None, :])
  return mask


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array) -> jax.Array:
  """The reference: explicit fp32 scores under a (B, T, S) mask; rows with no key give zeros."""
  b, t, n, d = q.shape
  kv_heads = k.shape[2]
  qg = q.reshape(b, t, kv_heads, n // kv_heads, d)
  logits = jnp.einsum('btkgd,bskd->bkgts', qg, k, preferred_element_type=jnp.float32)
  logits = logits * (d ** -0.5)
  logits = jnp.where(mask[:, None, None], logits, _MASKED)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(mask.any(-1)[:, None, None, :, None], probs, 0.0).astype(v.dtype)
  out = jnp.einsum('bkgts,bskd->btkgd', probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, n, d).astype(q.dtype)
