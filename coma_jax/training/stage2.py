"""Stage 2: contrastive matching with InfoNCE over the global batch, and exact GradCache.

Embedding: the mean of the final-norm hidden states at the K compression positions, L2
normalised; the LM head never runs. The loss is InfoNCE query -> target at temperature tau over
every target of the global batch (one sharded array: the negatives are global by construction),
optionally bidirectional and with hard negatives.

GradCache, inside one jitted step: (1) a chunked forward without gradients gives every
representation; (2) the gradient of the loss with respect to the representations; (3) a chunked
re-forward with a VJP per chunk accumulates the parameter gradients. Chunks are (n_chunks, chunk)
with the chunk axis sharded, so every chunk runs on every device. Dropout keys are per global
example, so both passes (and an unchunked run) draw the same masks. A frozen vision tower's
outputs from pass 1 are kept and reused in pass 3 instead of recomputed.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from coma_jax.model.lora import DropoutContext
from coma_jax.training.micro_batches import merge_micro_batches, split_micro_batches
from coma_jax.training.train_state import TrainState
from coma_jax.training.updates import apply_gradients, with_example_ids

SIDES = ('query', 'positive', 'negative')


@dataclasses.dataclass(frozen=True)
class Stage2StepConfig:
  temperature: float = 0.03
  bidirectional: bool = False
  hard_negatives: bool = False
  chunks: int = 1          # GradCache chunks per side; 1 = one plain full-batch pass
  reuse_frozen_vision: bool = True
  attention_impl: str = 'auto'
  first_trainable_embedding_row: int | None = None


def embed_side(model, side: dict, ctx, vision=None) -> jax.Array:
  """(B, D) fp32 unit vectors: the mean final hidden state over the compression tokens."""
  hidden = model.hidden_states(side['inputs'], ctx=ctx, vision=vision)
  pos = side['compression_positions']
  picked = jnp.take_along_axis(hidden, pos[..., None], axis=1).astype(jnp.float32)
  mean = picked.mean(axis=1)
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


def make_stage2_grads(graphdef, cfg: Stage2StepConfig):
  """(params, frozen, batch, key) -> (loss, grads)."""
  sides = _sides(cfg)

  def side_key(key, i):
    return jax.random.fold_in(key, i)

  def encode(params, frozen, side, key, ids, vision=None):
    model = nnx.merge(graphdef, params, frozen)
    return embed_side(model, side, DropoutContext.for_rows(key, ids), vision)

  def plain(params, frozen, batch, key):
    def loss_fn(params):
      reps = {s: encode(params, frozen, batch[s], side_key(key, i), batch[s]['example_ids'])
              for i, s in enumerate(sides)}
      return info_nce(reps, {s: batch[s]['example_valid'] for s in sides}, cfg)
    return jax.value_and_grad(loss_fn)(params)

  def grad_cache(params, frozen, batch, key):
    n = cfg.chunks
    vision_frozen = cfg.reuse_frozen_vision and 'visual' not in params
    chunked, groups = {}, {}
    for s in sides:
      side = {k: v for k, v in batch[s].items() if k in ('inputs', 'compression_positions', 'example_valid')}
      rows = side['example_valid'].shape[0]
      side['ids'] = batch[s]['example_ids']
      inputs = side['inputs']
      groups[s] = inputs.pixel_patches.shape[0] if inputs.pixel_patches is not None else rows
      chunked[s] = split_micro_batches(side, n, groups[s])

    # Pass 1: every representation, no gradients; keep a frozen tower's outputs.
    def forward_chunk(carry, chunk_and_key):
      chunk, key_s = chunk_and_key
      model = nnx.merge(graphdef, params, frozen)
      vision = model.visual(chunk['inputs']) if vision_frozen and chunk['inputs'].has_vision else None
      rep = embed_side(model, chunk, DropoutContext.for_rows(key_s, chunk['ids']), vision)
      return carry, (jax.lax.stop_gradient(rep), vision)

    reps, visions = {}, {}
    for i, s in enumerate(sides):
      keys = jnp.broadcast_to(jax.random.key_data(side_key(key, i)), (n,) + jax.random.key_data(key).shape)
      _, (r, v) = jax.lax.scan(forward_chunk, None, (chunked[s], jax.random.wrap_key_data(keys)))
      reps[s], visions[s] = merge_micro_batches(r, groups[s], n), v

    # Pass 2: the loss and its gradient with respect to the representations (global batch).
    valid = {s: batch[s]['example_valid'] for s in sides}
    loss, rep_grads = jax.value_and_grad(lambda r: info_nce(r, valid, cfg))(reps)

    # Pass 3: re-forward chunk by chunk with a VJP, accumulating parameter gradients.
    grads = jax.tree.map(jnp.zeros_like, params)
    for i, s in enumerate(sides):
      cot = split_micro_batches({'inputs': batch[s]['inputs'], 'g': rep_grads[s]}, n, groups[s])['g']
      key_s = side_key(key, i)

      def backward_chunk(acc, xs, key_s=key_s):
        chunk, g, vision = xs
        _, vjp = jax.vjp(lambda p: encode(p, frozen, chunk, key_s, chunk['ids'], vision), params)
        return jax.tree.map(jnp.add, acc, vjp(g)[0]), None

      grads, _ = jax.lax.scan(backward_chunk, grads, (chunked[s], cot, visions[s]))
    return loss, grads

  impl = plain if cfg.chunks == 1 else grad_cache

  def grads(params, frozen, batch, key):
    return impl(params, frozen, {s: with_example_ids(batch[s]) for s in sides}, key)
  return grads


def make_stage2_step(graphdef, tx: optax.GradientTransformation, cfg: Stage2StepConfig):
  grads_of = make_stage2_grads(graphdef, cfg)

  def step(state: TrainState, batch: dict, key: jax.Array):
    loss, grads = grads_of(state.params, state.frozen, {s: batch[s] for s in _sides(cfg)}, key)
    return apply_gradients(state, loss, grads, tx, cfg.first_trainable_embedding_row)

  return step


def prepare_stage2_model(stage1_model, adapter_cfg, rngs: nnx.Rngs):
  """Stage 2 starts from the merged stage-1 weights with a fresh adapter of the same shape."""
  from coma_jax.model.lora import apply_adapters, merge_adapters
  merge_adapters(stage1_model)
  apply_adapters(stage1_model, adapter_cfg, rngs)
  return stage1_model
