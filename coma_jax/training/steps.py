"""The jitted stage-1 train step: a pure function (state, batch, key) -> (state, metrics).

Gradient accumulation runs as a `scan` over micro-batches inside the step. A micro-batch takes
every M-th vision group (with its rows), so each micro-batch stays spread over the data-sharded
devices. A non-finite loss or gradient skips the update and is counted.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from coma_jax.model.inputs import BATCH_AXIS
from coma_jax.model.lora import DropoutContext
from coma_jax.training.losses import stage1_loss_terms
from coma_jax.training.stage1_attention import stage1_attend
from coma_jax.training.state import TrainState



@dataclasses.dataclass(frozen=True)
class Stage1StepConfig:
  mask: str = 'paper'
  normalisation: str = 'example_mean'
  micro_batches: int = 1
  loss_chunk: int = 512
  loss_remat: bool = True  # recompute each chunk's logits in the backward pass (memory for time)
  attention_impl: str = 'xla'
  first_trainable_embedding_row: int | None = None  # set for embeddings='new_tokens_only'


def split_micro_batches(batch: dict, num_micro: int, groups: int | None = None) -> dict:
  """Leading micro-batch axis: micro m holds vision groups m, m+M, ... and their rows (so each
  micro-batch stays spread over the data-sharded devices). `groups` defaults to the batch's."""
  inputs = batch['inputs']
  rows = inputs.input_ids.shape[0]
  if groups is None:
    groups = inputs.pixel_patches.shape[0] if inputs.pixel_patches is not None else rows
  if groups % num_micro or rows % groups:
    raise ValueError(f'{groups} vision groups of {rows} rows do not split into {num_micro} micro-batches')

  def split(path, x):
    name = getattr(path[-1], 'name', getattr(path[-1], 'key', None))
    axis = BATCH_AXIS.get(name, 0)
    n = x.shape[axis]
    per_group = n // groups  # rows per group on row axes, 1 on group axes
    x = x.reshape(x.shape[:axis] + (groups // num_micro, num_micro, per_group) + x.shape[axis + 1:])
    x = jnp.moveaxis(x, axis + 1, 0)
    return x.reshape(x.shape[:axis + 1] + (n // num_micro,) + x.shape[axis + 3:])
  return jax.tree_util.tree_map_with_path(split, batch)


def merge_micro_batches(x: jax.Array, groups: int, num_micro: int) -> jax.Array:
  """The inverse of `split_micro_batches` for a per-row array (M, B/M, ...) -> (B, ...)."""
  m, per_micro = x.shape[:2]
  per_group = per_micro * m // groups
  x = x.reshape((m, groups // m, per_group) + x.shape[2:])
  return jnp.moveaxis(x, 0, 1).reshape((m * per_micro,) + x.shape[3:])


def _is_embedding(path) -> bool:
  keys = [getattr(p, 'key', getattr(p, 'name', None)) for p in path]
  return 'embed_tokens' in keys and 'embedding' in keys


def make_stage1_grads(graphdef, cfg: Stage1StepConfig):
  """(params, frozen, batch, key) -> (loss, supervised tokens, grads) over the whole global batch,
  accumulated over micro-batches; the loss and grads are already normalised."""
  def loss_fn(params, frozen, mb, key):
    model = nnx.merge(graphdef, params, frozen)
    ctx = DropoutContext.for_rows(key, mb['example_ids'])
    hidden = model.hidden_states(mb['inputs'], stage1_attend(cfg.mask, mb, cfg.attention_impl), ctx)
    numerator, _, tokens = stage1_loss_terms(model, hidden, mb['label_positions'], mb['label_targets'],
                                             cfg.normalisation, cfg.loss_chunk, cfg.loss_remat)
    return numerator, tokens

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def grads_of(params, frozen, batch: dict, key: jax.Array):
    batch = with_example_ids({k: v for k, v in batch.items() if k not in ('labels', 'roles')})
    has_labels = batch['label_positions'] >= 0
    if cfg.normalisation == 'token_mean':
      denominator = has_labels.sum()
    else:
      denominator = has_labels.any(axis=1).sum()
    denominator = jnp.maximum(denominator, 1).astype(jnp.float32)
    micro = split_micro_batches(batch, cfg.micro_batches)
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

    def body(acc, mb):
      (numerator, tokens), grads = grad_fn(params, frozen, mb, key)
      return (acc[0] + numerator, acc[1] + tokens, jax.tree.map(jnp.add, acc[2], grads)), None

    (numerator, tokens, grads), _ = jax.lax.scan(body, (jnp.zeros(()), jnp.zeros((), jnp.int32), zeros), micro)
    return numerator / denominator, tokens, jax.tree.map(lambda g: g / denominator, grads)

  return grads_of


def with_example_ids(batch: dict) -> dict:
  """Dropout keys derive from (seed, step, global example id): loaders give `example_ids`; a
  hand-made batch falls back to its row numbers."""
  if 'example_ids' not in batch:
    batch = dict(batch, example_ids=jnp.arange(batch['example_valid'].shape[0], dtype=jnp.int32))
  return batch


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


def make_stage1_eval(graphdef, cfg: Stage1StepConfig):
  """(params, frozen, batch) -> (numerator, denominator) of the loss without dropout: summed over
  validation batches, numerator / denominator is the validation loss."""
  def evaluate(params, frozen, batch: dict):
    model = nnx.merge(graphdef, params, frozen)
    hidden = model.hidden_states(batch['inputs'], stage1_attend(cfg.mask, batch, cfg.attention_impl), None)
    numerator, denominator, _ = stage1_loss_terms(model, hidden, batch['label_positions'], batch['label_targets'],
                                                  cfg.normalisation, cfg.loss_chunk, remat=False)
    return numerator, denominator
  return evaluate


def make_stage1_step(graphdef, tx: optax.GradientTransformation, cfg: Stage1StepConfig):
  grads_of = make_stage1_grads(graphdef, cfg)

  def step(state: TrainState, batch: dict, key: jax.Array):
    loss, tokens, grads = grads_of(state.params, state.frozen, batch, key)
    new_state, metrics = apply_gradients(state, loss, grads, tx, cfg.first_trainable_embedding_row)
    return new_state, dict(metrics, tokens=tokens)

  return step
