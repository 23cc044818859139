"""Stage 2: contrastive matching with InfoNCE over the global batch, and exact GradCache.

Embedding: the mean of the final-norm hidden states at the K compression positions, L2
normalised; the LM head never runs. The loss is InfoNCE query -> target at temperature tau over
every target of the global batch (one sharded array: the negatives are global by construction),
optionally bidirectional and with hard negatives.

GradCache, inside one jitted step: (1) a chunked forward without gradients gives every
representation; (2) the gradient of the loss with respect to the representations; (3) a chunked
re-forward with a VJP per chunk accumulates the parameter gradients. Chunks are (n_chunks, chunk)
with the chunk axis sharded, so every chunk runs on every device. Dropout keys are per (sequence,
token offset), so both passes, an unchunked and a packed run draw the same masks. A frozen vision tower's
outputs from pass 1 are kept and reused in pass 3 instead of recomputed.

Packing: rows may hold several sequences of any sides (`ROW_SETS`); each sequence's slot scatters
its representation to the global (sides x examples) array the loss reads, and pass 3 gathers each
slot's cotangent back. Chunks are sets of rows.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from coma_jax.data.step_batches import SIDES, rep_index, sequence_id  # noqa: F401 (the layout's ids)
from coma_jax.model.lora import DropoutContext
from coma_jax.training.micro_batches import merge_micro_batches, split_micro_batches
from coma_jax.training.train_state import TrainState
from coma_jax.training.updates import apply_gradients

# A stage-2 batch holds one or more row sets: unpacked, one per side ('query', ...); packed, one
# 'packed' set whose rows mix the sides. Either way each sequence's slot names its representation:
# rep_index = side index * examples + the example's position in the global batch.
ROW_SETS = ('packed',) + SIDES


@dataclasses.dataclass(frozen=True)
class Stage2StepConfig:
  temperature: float = 0.03
  bidirectional: bool = False
  hard_negatives: bool = False
  chunks: int = 1          # GradCache chunks per row set; 1 = one plain full-batch pass
  reuse_frozen_vision: bool = True
  attention_impl: str = 'auto'
  first_trainable_embedding_row: int | None = None


def embed_side(model, rows: dict, ctx, vision=None) -> jax.Array:
  """(B, S, D) fp32 unit vectors: per sequence slot, the mean final hidden state over its K
  compression tokens (an empty slot gives some unit vector; its rep_index is -1)."""
  hidden = model.hidden_states(rows['inputs'], ctx=ctx, vision=vision)
  pos = rows['compression_positions']
  b, slots, k = pos.shape
  picked = jnp.take_along_axis(hidden, pos.reshape(b, slots * k)[..., None], axis=1)
  mean = picked.reshape(b, slots, k, -1).astype(jnp.float32).mean(axis=2)
  return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def info_nce(reps: dict, valid: dict, cfg: Stage2StepConfig) -> jax.Array:
  """Mean over valid queries of -log softmax(q . t / tau)[own target], targets = all valid
  targets of the global batch (+ valid hard negatives). Bidirectional adds target -> query."""
  q, t = reps['query'], reps['positive']
  candidates, cand_valid = t, valid['positive']
  if cfg.hard_negatives:
    candidates = jnp.concatenate([t, reps['negative']])
    cand_valid = jnp.concatenate([valid['positive'], valid['negative']])

  def one_way(a, b, b_valid, a_valid):
    logits = (a @ b.T) / cfg.temperature
    logits = jnp.where(b_valid[None, :], logits, -jnp.inf)
    own = jnp.diagonal(logits[:, :a.shape[0]])
    nll = jax.nn.logsumexp(logits, axis=-1) - own
    rows = a_valid & b_valid[:a.shape[0]]
    return jnp.where(rows, nll, 0.0).sum() / jnp.maximum(rows.sum(), 1)

  loss = one_way(q, candidates, cand_valid, valid['query'])
  if cfg.bidirectional:
    loss = 0.5 * (loss + one_way(t, q, valid['query'], valid['positive']))
  return loss


def _sides(cfg):
  return SIDES if cfg.hard_negatives else SIDES[:2]


def row_sets(batch: dict) -> list[str]:
  return [name for name in ROW_SETS if name in batch]


def scatter_reps(slots, n: int):
  """[(reps (B, S, D), rep_index (B, S)) per row set] -> the global (sides x n, D) representations
  and which of them exist (an empty slot's rep_index is -1; a missing side is never written)."""
  total, dim = len(SIDES) * n, slots[0][0].shape[-1]
  flat, valid = jnp.zeros((total, dim), jnp.float32), jnp.zeros(total, bool)
  for reps, index in slots:
    where = jnp.where(index >= 0, index, total).reshape(-1)
    flat = flat.at[where].set(reps.reshape(-1, dim), mode='drop')
    valid = valid.at[where].set(True, mode='drop')
  return flat, valid


def gather_reps(flat: jax.Array, index: jax.Array) -> jax.Array:
  """(B, S, D): each slot's row of flat (zeros for empty slots)."""
  return jnp.where((index >= 0)[..., None], flat[jnp.maximum(index, 0)], 0.0)


def by_side(flat: jax.Array, sides, n: int) -> dict:
  return {s: flat[SIDES.index(s) * n:(SIDES.index(s) + 1) * n] for s in sides}


def make_stage2_grads(graphdef, cfg: Stage2StepConfig):
  """(params, frozen, batch, key) -> (loss, grads)."""
  sides = _sides(cfg)

  def encode(params, frozen, rows, key, vision=None):
    model = nnx.merge(graphdef, params, frozen)
    return embed_side(model, rows, DropoutContext.for_tokens(key, rows['token_ids'], rows['token_offsets']), vision)

  def loss_of(flat, valid, n):
    return info_nce(by_side(flat, sides, n), by_side(valid, sides, n), cfg)

  def plain(params, frozen, batch, key, n):
    def loss_fn(params):
      sets = [batch[name] for name in row_sets(batch)]
      return loss_of(*scatter_reps([(encode(params, frozen, rows, key), rows['rep_index']) for rows in sets], n), n)
    return jax.value_and_grad(loss_fn)(params)

  def grad_cache(params, frozen, batch, key, n):
    chunks = cfg.chunks
    vision_frozen = cfg.reuse_frozen_vision and 'visual' not in params
    names = row_sets(batch)
    chunked, groups = {}, {}
    for name in names:
      rows = {k: v for k, v in batch[name].items()
              if k in ('inputs', 'compression_positions', 'rep_index', 'token_ids', 'token_offsets')}
      inputs = rows['inputs']
      groups[name] = inputs.pixel_patches.shape[0] if inputs.pixel_patches is not None else inputs.input_ids.shape[0]
      chunked[name] = split_micro_batches(rows, chunks, groups[name])

    # Pass 1: every representation, no gradients; keep a frozen tower's outputs.
    def forward_chunk(carry, chunk):
      model = nnx.merge(graphdef, params, frozen)
      vision = model.visual(chunk['inputs']) if vision_frozen and chunk['inputs'].has_vision else None
      ctx = DropoutContext.for_tokens(key, chunk['token_ids'], chunk['token_offsets'])
      return carry, (jax.lax.stop_gradient(embed_side(model, chunk, ctx, vision)), vision)

    slots, visions = [], {}
    for name in names:
      _, (r, visions[name]) = jax.lax.scan(forward_chunk, None, chunked[name])
      slots.append((merge_micro_batches(r, groups[name], chunks), batch[name]['rep_index']))
    flat, valid = scatter_reps(slots, n)

    # Pass 2: the loss and its gradient with respect to the representations (global batch).
    loss, flat_grad = jax.value_and_grad(lambda f: loss_of(f, valid, n))(flat)

    # Pass 3: re-forward chunk by chunk with a VJP, accumulating parameter gradients.
    grads = jax.tree.map(jnp.zeros_like, params)
    for name in names:
      g = gather_reps(flat_grad, batch[name]['rep_index'])
      cot = split_micro_batches({'inputs': batch[name]['inputs'], 'g': g}, chunks, groups[name])['g']

      def backward_chunk(acc, xs):
        chunk, g, vision = xs
        _, vjp = jax.vjp(lambda p: encode(p, frozen, chunk, key, vision), params)
        return jax.tree.map(jnp.add, acc, vjp(g)[0]), None

      grads, _ = jax.lax.scan(backward_chunk, grads, (chunked[name], cot, visions[name]))
    return loss, grads

  impl = plain if cfg.chunks == 1 else grad_cache

  def grads(params, frozen, batch, key):
    return impl(params, frozen, batch, key, batch['example_ids'].shape[0])
  return grads


def make_stage2_step(graphdef, tx: optax.GradientTransformation, cfg: Stage2StepConfig):
  grads_of = make_stage2_grads(graphdef, cfg)

  def step(state: TrainState, batch: dict, key: jax.Array):
    loss, grads = grads_of(state.params, state.frozen, batch, key)
    return apply_gradients(state, loss, grads, tx, cfg.first_trainable_embedding_row)

  return step


def prepare_stage2_model(stage1_model, adapter_cfg, rngs: nnx.Rngs):
  """Stage 2 starts from the merged stage-1 weights with a fresh adapter of the same shape."""
  from coma_jax.model.lora import apply_adapters, merge_adapters
  merge_adapters(stage1_model)
  apply_adapters(stage1_model, adapter_cfg, rngs)
  return stage1_model
