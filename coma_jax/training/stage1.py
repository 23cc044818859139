"""Stage 1, compression pre-training: the loss and the jitted train step.

Loss: cross-entropy at the supervised positions only. The LM head runs only on hidden states
gathered at `label_positions`, in chunks under `jax.checkpoint`, so neither full-vocabulary logits
for every token nor all chunks' logits at once are ever held. It is returned as (numerator,
denominator) so that micro-batches add up.

Step: a pure function (state, batch, key) -> (state, metrics). Gradient accumulation runs as a
`scan` over micro-batches inside the step. A non-finite loss or gradient skips the update and is
counted. The attention mask is `stage1_attention.py`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from coma_jax.model.lora import DropoutContext
from coma_jax.training.micro_batches import split_micro_batches
from coma_jax.training.stage1_attention import stage1_attend
from coma_jax.training.train_state import TrainState
from coma_jax.training.updates import apply_gradients


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


def compact_labels(targets: jax.Array, budget: int) -> tuple[jax.Array, jax.Array]:
  """The flat slots (N,) of the first `budget` real labels (targets >= 0), in order, and their
  targets (-1 past the real ones). Exact only when at most `budget` labels are real."""
  index = jnp.nonzero(targets >= 0, size=budget, fill_value=0)[0]
  return index, jnp.where(jnp.arange(budget) < (targets >= 0).sum(), targets[index], -1)


def stage1_loss_terms(model, hidden: jax.Array, batch: dict, normalisation: str, chunk: int = 512,
                      remat: bool = True, label_budget: int = 0):
  """(numerator, denominator, token count) of the batch's CE under the chosen normalisation.

  example_mean (the reference): the mean over examples of each example's mean token loss (each
  label weighs 1 / its example's label count, so packed rows need no per-example reduction);
  token_mean: the mean over all supervised tokens (what transformers' loss does).

  `label_budget` > 0: the LM head runs on that many positions, the batch's real labels gathered
  out of its (rows x label_slots) slots, instead of on every slot. Rows sized for the longest
  answer (a caption among short answers) are mostly empty slots, and the head over the full
  vocabulary is what a small model's step costs. A batch with more real labels than the budget
  takes the every-slot branch (`lax.cond`; see `label_budget_fallbacks`): exact either way.
  """
  if normalisation not in NORMALISATIONS:
    raise ValueError(f'loss normalisation must be one of {NORMALISATIONS}, got {normalisation!r}')
  label_positions, label_targets = batch['label_positions'], batch['label_targets']
  b, p = label_positions.shape
  mask = label_positions >= 0
  h = gather_positions(hidden, label_positions).reshape(b * p, -1)
  targets = jnp.where(mask, label_targets, -1).reshape(-1)
  weights = (1.0 / jnp.maximum(batch['label_counts'], 1) if normalisation == 'example_mean'
             else jnp.ones((b, p), jnp.float32)).reshape(-1)

  def every_slot(remat=remat):
    return (chunked_token_nll(h, targets, model.logits, chunk, remat) * weights).sum()

  def budgeted():
    index, picked = compact_labels(targets, label_budget)
    return (chunked_token_nll(h[index], picked, model.logits, chunk, remat) * weights[index]).sum()

  denominator = loss_denominator(batch, normalisation).astype(jnp.float32)
  if not label_budget or label_budget >= b * p:
    return every_slot(), denominator, mask.sum()
  # The rare branch recomputes its logits: the gradient of a cond keeps (zero-filled) residuals
  # for the branch not taken, and every slot's logits would be a large buffer filled every step.
  return jax.lax.cond(mask.sum() > label_budget, lambda: every_slot(True), budgeted), denominator, mask.sum()


def label_budget_fallbacks(batch: dict, micro_batches: int, label_budget: int) -> jax.Array:
  """How many of the batch's micro-batches hold more real labels than the budget (took every slot)."""
  if not label_budget:
    return jnp.zeros((), jnp.int32)
  positions = split_micro_batches({k: batch[k] for k in ('inputs', 'label_positions')}, micro_batches)['label_positions']
  return ((positions >= 0).reshape(micro_batches, -1).sum(-1) > label_budget).sum().astype(jnp.int32)


def loss_denominator(batch: dict, normalisation: str) -> jax.Array:
  """The whole batch's: supervised tokens (token_mean) or examples with labels (example_mean)."""
  if normalisation == 'token_mean':
    return (batch['label_positions'] >= 0).sum()
  return batch['labelled_examples'].sum()


@dataclasses.dataclass(frozen=True)
class Stage1StepConfig:
  mask: str = 'paper'
  normalisation: str = 'example_mean'
  micro_batches: int = 1
  loss_chunk: int = 512
  loss_remat: bool = True  # recompute each chunk's logits in the backward pass (memory for time)
  attention_impl: str = 'auto'
  first_trainable_embedding_row: int | None = None  # set for embeddings='new_tokens_only'
  label_budget: int = 0  # LM-head positions per micro-batch (0: every label slot); see stage1_loss_terms


def make_stage1_grads(graphdef, cfg: Stage1StepConfig):
  """(params, frozen, batch, key) -> (loss, supervised tokens, grads) over the whole global batch,
  accumulated over micro-batches; the loss and grads are already normalised."""
  def loss_fn(params, frozen, mb, key):
    model = nnx.merge(graphdef, params, frozen)
    ctx = DropoutContext.for_tokens(key, mb['token_ids'], mb['token_offsets'])
    hidden = model.hidden_states(mb['inputs'], stage1_attend(cfg.mask, mb, cfg.attention_impl), ctx)
    numerator, _, tokens = stage1_loss_terms(model, hidden, mb, cfg.normalisation, cfg.loss_chunk, cfg.loss_remat,
                                             cfg.label_budget)
    return numerator, tokens

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def grads_of(params, frozen, batch: dict, key: jax.Array):
    batch = {k: v for k, v in batch.items() if k not in ('labels', 'roles', 'example_ids')}
    denominator = jnp.maximum(loss_denominator(batch, cfg.normalisation), 1).astype(jnp.float32)
    micro = split_micro_batches(batch, cfg.micro_batches)
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

    def body(acc, mb):
      (numerator, tokens), grads = grad_fn(params, frozen, mb, key)
      return (acc[0] + numerator, acc[1] + tokens, jax.tree.map(jnp.add, acc[2], grads)), None

    (numerator, tokens, grads), _ = jax.lax.scan(body, (jnp.zeros(()), jnp.zeros((), jnp.int32), zeros), micro)
    return numerator / denominator, tokens, jax.tree.map(lambda g: g / denominator, grads)

  return grads_of


def make_stage1_eval(graphdef, cfg: Stage1StepConfig):
  """(params, frozen, batch) -> (numerator, denominator) of the loss without dropout: summed over
  validation batches, numerator / denominator is the validation loss."""
  def evaluate(params, frozen, batch: dict):
    model = nnx.merge(graphdef, params, frozen)
    hidden = model.hidden_states(batch['inputs'], stage1_attend(cfg.mask, batch, cfg.attention_impl), None)
    numerator, denominator, _ = stage1_loss_terms(model, hidden, batch, cfg.normalisation, cfg.loss_chunk,
                                                  remat=False, label_budget=cfg.label_budget)
    return numerator, denominator
  return evaluate


def make_stage1_step(graphdef, tx: optax.GradientTransformation, cfg: Stage1StepConfig):
  grads_of = make_stage1_grads(graphdef, cfg)

  def step(state: TrainState, batch: dict, key: jax.Array):
    loss, tokens, grads = grads_of(state.params, state.frozen, batch, key)
    new_state, metrics = apply_gradients(state, loss, grads, tx, cfg.first_trainable_embedding_row)
    fallbacks = label_budget_fallbacks(batch, cfg.micro_batches, cfg.label_budget)
    return new_state, dict(metrics, tokens=tokens, label_budget_fallbacks=fallbacks)

  return step
