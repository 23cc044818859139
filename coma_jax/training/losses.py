"""Stage-1 compression loss: cross-entropy at the supervised positions only.

The LM head runs only on hidden states gathered at `label_positions`, in chunks under
`jax.checkpoint`, so neither full-vocabulary logits for every token nor all chunks' logits at
once are ever held. The loss is returned as (numerator, denominator) so that micro-batches add up.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NORMALISATIONS = ('example_mean', 'token_mean')


def chunked_token_nll(hidden: jax.Array, targets: jax.Array, head, chunk: int, remat: bool = True) -> jax.Array:
  """hidden (N, D), targets (N,) (-1 = none) -> per-position NLL (N,) fp32, 0 where none.

  With `remat`, each chunk's logits are recomputed in the backward pass instead of kept: memory
  for one chunk of (chunk x vocab) logits, at the cost of one more head matmul.
  """
  n, d = hidden.shape
  chunk = min(chunk, n)
  pad = (-n) % chunk
  h = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(-1, chunk, d)
  t = jnp.pad(targets, (0, pad), constant_values=-1).reshape(-1, chunk)

  def one(args):
    hc, tc = args
    logits = head(hc).astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.maximum(tc, 0)[:, None], axis=-1)[:, 0]
    return jnp.where(tc >= 0, logz - picked, 0.0)
  return jax.lax.map(jax.checkpoint(one) if remat else one, (h, t)).reshape(-1)[:n]


def gather_positions(hidden: jax.Array, positions: jax.Array) -> jax.Array:
  """hidden (B, L, D) at positions (B, P) (-1 -> position 0; mask it) -> (B, P, D)."""
  return jnp.take_along_axis(hidden, jnp.maximum(positions, 0)[..., None], axis=1)


def stage1_loss_terms(model, hidden: jax.Array, label_positions: jax.Array, label_targets: jax.Array,
                      normalisation: str, chunk: int = 512, remat: bool = True):
  """(numerator, denominator, token count) of the batch's CE under the chosen normalisation.

  example_mean (the reference): the mean over examples of each example's mean token loss;
  token_mean: the mean over all supervised tokens (what transformers' loss does).
  """
  if normalisation not in NORMALISATIONS:
    raise ValueError(f'loss normalisation must be one of {NORMALISATIONS}, got {normalisation!r}')
  b, p = label_positions.shape
  mask = label_positions >= 0
  h = gather_positions(hidden, label_positions).reshape(b * p, -1)
  nll = chunked_token_nll(h, jnp.where(mask, label_targets, -1).reshape(-1), model.logits, chunk, remat).reshape(b, p)
  per_example = nll.sum(axis=1)
  count = mask.sum(axis=1)
  if normalisation == 'token_mean':
    return per_example.sum(), count.sum().astype(jnp.float32), count.sum()
  has = count > 0
  means = jnp.where(has, per_example / jnp.maximum(count, 1), 0.0)
  return means.sum(), has.sum().astype(jnp.float32), count.sum()
