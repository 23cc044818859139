"""The whole Qwen2.5-VL model on the static-shape input contract (`inputs.ModelInputs`)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from coma_jax.model.attention import attention
from coma_jax.model.config import ModelConfig
from coma_jax.model.inputs import ModelInputs
from coma_jax.model.layers import Embed, Linear
from coma_jax.model.rope import mrope_cos_sin
from coma_jax.model.text import Attend, TextDecoder
from coma_jax.model.vision import VisionTower, gather_units


class Qwen25VL(nnx.Module):

  def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               scan_layers: bool = True, remat: str = 'none', attention_impl: str = 'auto',
               rngs: nnx.Rngs):
    t = config.text
    self.config = config
    self.attention_impl = attention_impl
    self.visual = VisionTower(config.vision, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers,
                              remat=remat, attention_impl=attention_impl, rngs=rngs)
    self.embed_tokens = Embed(t.vocab_size, t.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.decoder = TextDecoder(t, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers, remat=remat, rngs=rngs)
    self.lm_head = None if config.tie_word_embeddings else Linear(
        t.hidden_size, t.vocab_size, axes=('embed', 'vocab'), hook='lm_head', use_bias=False,
        dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def embed(self, inputs: ModelInputs, vision: jax.Array | None = None) -> jax.Array:
    """Token embeddings with the merged vision tokens placed at their placeholders. `vision`:
    precomputed `self.visual(inputs)` (a frozen tower's output reused), else computed here."""
    x = self.embed_tokens(inputs.input_ids)
    if not inputs.has_vision:
      return x
    vision = (self.visual(inputs) if vision is None else vision).astype(x.dtype)  # (G, N/u, D)
    groups = vision.shape[0]
    index = inputs.vision_token_index.reshape(groups, -1)  # each group's rows, flattened
    picked = jax.vmap(lambda v, i: gather_units(v, i, 1))(vision, index).reshape(x.shape)
    return jnp.where((inputs.vision_token_index >= 0)[..., None], picked, x)

  def causal_attend(self, inputs: ModelInputs) -> Attend:
    """Plain causal attention within each sequence (stage 2, inference and the parity tests)."""
    seg = inputs.segments
    return lambda layer, q, k, v: attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg,
                                            causal=True, impl=self.attention_impl, call='text')

  def hidden_states(self, inputs: ModelInputs, attend: Attend | None = None, ctx=None,
                    vision: jax.Array | None = None) -> jax.Array:
    """Final-norm hidden states (B, L, D). `ctx`: adapter dropout keys (None: deterministic)."""
    t = self.config.text
    x = self.embed(inputs, vision)
    cos, sin = mrope_cos_sin(inputs.positions, t.head_dim, t.rope_theta, t.mrope_section)
    return self.decoder(x, cos, sin, attend or self.causal_attend(inputs), ctx)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """LM head on the given hidden states (gather the positions you need first)."""
    out = self.embed_tokens.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
    return out.astype(jnp.float32)

  def __call__(self, inputs: ModelInputs) -> jax.Array:
    return self.logits(self.hidden_states(inputs))


@functools.partial(jax.jit, static_argnums=0)
def _forward_logits(graphdef, state, inputs):
  return nnx.merge(graphdef, state)(inputs)


@functools.partial(jax.jit, static_argnums=0)
def _forward_vision(graphdef, state, inputs):
  return nnx.merge(graphdef, state).visual(inputs)


def forward(model: Qwen25VL, inputs: ModelInputs) -> jax.Array:
  """Jitted full-vocabulary logits (B, L, V) fp32: for tests and inspection, not training."""
  return _forward_logits(*nnx.split(model), inputs)


def vision_features(model: Qwen25VL, inputs: ModelInputs) -> jax.Array:
  """Jitted merged vision tokens (G, N/u, D) in raster order, as transformers' `pooler_output`."""
  return _forward_vision(*nnx.split(model), inputs)
