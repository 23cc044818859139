"""The optimizer update shared by both stages: frozen embedding rows masked before clipping,
and non-finite updates skipped and counted."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from coma_jax.training.train_state import TrainState


def _is_embedding(path) -> bool:
  keys = [getattr(p, 'key', getattr(p, 'name', None)) for p in path]
  return 'embed_tokens' in keys and 'embedding' in keys


def mask_frozen_embedding_rows(tree, first_trainable_row: int | None):
  """Zeroes the embedding rows below `first_trainable_row` (embeddings='new_tokens_only')."""
  if first_trainable_row is None:
    return tree

  def mask_rows(path, u):
    if not _is_embedding(path):
      return u
    return u * (jnp.arange(u.shape[0]) >= first_trainable_row)[:, None].astype(u.dtype)
  return jax.tree_util.tree_map_with_path(mask_rows, tree)


def apply_gradients(state: TrainState, loss, grads, tx: optax.GradientTransformation,
                    first_trainable_embedding_row: int | None = None):
  """The optimiser update, skipped (and counted) when the loss or a gradient is not finite.

  Frozen embedding rows are masked out of the gradient before clipping (and before the reported
  norm): otherwise the whole vocabulary's gradient would shrink the real updates. The update is
  masked again, as AdamW's weight decay would move those rows.
  """
  grads = mask_frozen_embedding_rows(grads, first_trainable_embedding_row)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  updates = mask_frozen_embedding_rows(updates, first_trainable_embedding_row)
  params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  new_state = TrainState(step=state.step + finite.astype(jnp.int32), params=keep(params, state.params),
                         frozen=state.frozen, opt_state=keep(opt_state, state.opt_state),
                         skipped=state.skipped + (~finite).astype(jnp.int32))
  return new_state, {'loss': loss, 'grad_norm': grad_norm, 'skipped': new_state.skipped, 'finite': finite}
