"""Next-token choice per row: greedy, temperature and top-p (nucleus) sampling, seeded per request.

Each row has its own seed (`request_seed`: a pure function of the run's seed, the request id and
the turn), so a row draws the same tokens whatever batch it lands in, and a resumed run asks the
same. Temperature 0 is greedy.
"""
from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp


def request_seed(seed: int, request_id: str, turn: int = 0) -> int:
  """A 31-bit seed from (run seed, request id, turn)."""
  return zlib.crc32(f'{int(seed)}\x1f{request_id}\x1f{int(turn)}'.encode()) & 0x7FFFFFFF


def top_p_mask(logits: jax.Array, top_p: jax.Array) -> jax.Array:
  """(B, V) bool: the smallest set of most likely tokens whose probability reaches top_p (B,)
  (always at least the most likely one)."""
  order = jnp.argsort(-logits, axis=-1)
  sorted_probs = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), order, axis=-1)
  before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of the strictly likelier tokens
  keep_sorted = before < top_p[:, None]
  keep_sorted = keep_sorted.at[:, 0].set(True)
  return jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)


def choose_tokens(logits: jax.Array, seeds: jax.Array, step: jax.Array | int, temperature: jax.Array,
                  top_p: jax.Array) -> jax.Array:
  """logits (B, V) fp32; seeds (B,) int; temperature, top_p (B,) -> tokens (B,) int32. The sort
  that top-p needs runs only when a row asks for top-p, sampling only when a row samples."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def sample(_):
    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), step))(seeds.astype(jnp.uint32))
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    nucleus = jnp.any((top_p < 1) & (temperature > 0))
    scaled = jax.lax.cond(nucleus, lambda x: jnp.where(top_p_mask(x, top_p), x, -jnp.inf), lambda x: x, scaled)
    return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)

  sampled = jax.lax.cond(jnp.any(temperature > 0), sample, lambda _: greedy, None)
  return jnp.where(temperature > 0, sampled, greedy)
