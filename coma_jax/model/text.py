"""The Qwen2 decoder of Qwen2.5-VL: GQA with q/k/v bias, M-RoPE, RMSNorm, SwiGLU, stacked layers.

Attention is injected as `attend(layer_index, q, k, v) -> out`, so a training objective can
change the masking (the stage-1 compression mask) without touching the layer code.
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from flax import nnx

from coma_jax.model.config import TextConfig
from coma_jax.model.layers import Linear, RMSNorm, SwiGLU
from coma_jax.model.rope import apply_rotary
from coma_jax.model.stack import run_stack
from coma_jax.parallel.activations import constrain

Attend = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
ACTIVATION_AXES = ('batch', 'activation_length', 'activation_embed')  # (B, L, D) between layers


class TextAttention(nnx.Module):

  def __init__(self, cfg: TextConfig, *, stack, dtype, param_dtype, rngs):
    hd = cfg.head_dim
    kw = dict(stack=stack, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
    self.q_proj = Linear(cfg.hidden_size, self.num_heads * hd, axes=('embed', 'heads'), hook='text.q_proj', use_bias=True, **kw)
    self.k_proj = Linear(cfg.hidden_size, self.num_kv_heads * hd, axes=('embed', 'kv_heads'), hook='text.k_proj', use_bias=True, **kw)
    self.v_proj = Linear(cfg.hidden_size, self.num_kv_heads * hd, axes=('embed', 'kv_heads'), hook='text.v_proj', use_bias=True, **kw)
    self.o_proj = Linear(self.num_heads * hd, cfg.hidden_size, axes=('heads', 'embed'), hook='text.o_proj', use_bias=False, **kw)

  def __call__(self, x, cos, sin, attend: Attend, layer_index, ctx=None):
    b, length, _ = x.shape
    q = self.q_proj(x, ctx).reshape(b, length, self.num_heads, self.head_dim)
    k = self.k_proj(x, ctx).reshape(b, length, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x, ctx).reshape(b, length, self.num_kv_heads, self.head_dim)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    out = attend(layer_index, q, k, v)
    return self.o_proj(out.reshape(b, length, self.num_heads * self.head_dim), ctx)


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: TextConfig, *, stack, dtype, param_dtype, rngs):
    self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name='embed', stack=stack, param_dtype=param_dtype)
    self.self_attn = TextAttention(cfg, stack=stack, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name='embed', stack=stack, param_dtype=param_dtype)
    self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, axes=('embed', 'mlp'), hook_prefix='text',
                      use_bias=False, act=cfg.hidden_act, stack=stack, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, cos, sin, attend: Attend, layer_index, ctx=None):
    x = x + self.self_attn(self.input_layernorm(x), cos, sin, attend, layer_index, ctx)
    return x + self.mlp(self.post_attention_layernorm(x), ctx)


class TextDecoder(nnx.Module):
  """The decoder stack and the final norm (embedding and head live on the full model)."""

  def __init__(self, cfg: TextConfig, *, dtype, param_dtype, scan_layers=True, remat='none', rngs):
    self.scan_layers, self.remat = scan_layers, remat
    self.layers = DecoderLayer(cfg, stack=(cfg.num_hidden_layers,), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name='embed', param_dtype=param_dtype)
    self.num_layers = cfg.num_hidden_layers

  def __call__(self, x, cos, sin, attend: Attend, ctx=None):
    """`ctx`: a DropoutContext (per-row keys) or None; each layer gets its own keys."""
    def body(layer, x, i):
      x = layer(x, cos, sin, attend, i, None if ctx is None else ctx.for_layer(i))
      return constrain(x, ACTIVATION_AXES)
    x = run_stack(self.layers, x, body, per_layer=np.arange(self.num_layers, dtype=np.int32),
                  scan=self.scan_layers, remat=self.remat)
    return self.norm(x)
