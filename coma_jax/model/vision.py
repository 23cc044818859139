"""The Qwen2.5-VL vision tower: patch embedding, window/full attention blocks, 2x2 merger.

Works on the padded window layout of `vision_layout.py`: (R rows, S slots). Window blocks reshape
a row into fixed windows of `window_patches` slots; full-attention blocks attend within a frame
(segment ids) across the row. All blocks share one stacked parameter set; a per-block flag picks
the attention kind, so the stack scans with a single compiled body.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coma_jax.model.attention import attention
from coma_jax.model.config import VisionConfig
from coma_jax.model.layers import Linear, RMSNorm, SwiGLU, activation
from coma_jax.model.rope import apply_rotary, vision_cos_sin
from coma_jax.model.stack import run_stack
from coma_jax.parallel.activations import constrain


def gather_units(x: jax.Array, index: jax.Array, unit: int) -> jax.Array:
  """Rows of `x` grouped in units of `unit`, picked by `index` (-1 gives zeros)."""
  units = x.reshape(x.shape[0] // unit, unit, *x.shape[1:])
  picked = jnp.take(units, jnp.maximum(index, 0), axis=0)
  picked = jnp.where((index >= 0).reshape(index.shape + (1,) * (picked.ndim - index.ndim)), picked, 0)
  return picked.reshape(*index.shape[:-1], index.shape[-1] * unit, *x.shape[1:])


class VisionAttention(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, stack, dtype, param_dtype, rngs):
    kw = dict(use_bias=True, stack=stack, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_heads = cfg.num_heads
    self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size, axes=('vision_embed', 'vision_heads'),
                      hook='vision.qkv', **kw)
    self.proj = Linear(cfg.hidden_size, cfg.hidden_size, axes=('vision_heads', 'vision_embed'),
                       hook='vision.proj', **kw)

  def __call__(self, x, cos, sin, segment_ids, window: int | None, impl: str):
    r, s, d = x.shape
    qkv = self.qkv(x).reshape(r, s, 3, self.num_heads, d // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if window is not None:  # fixed-size windows: a reshape, not a mask over the whole row
      q, k, v = (a.reshape(r * s // window, window, *a.shape[2:]) for a in (q, k, v))
      segment_ids = segment_ids.reshape(r * s // window, window)
    out = attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids, causal=False, impl=impl,
                    call='vision_window' if window is not None else 'vision_full')
    return self.proj(out.reshape(r, s, d))


class VisionBlock(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, stack, dtype, param_dtype, rngs):
    self.norm1 = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, axis_name='vision_embed', stack=stack, param_dtype=param_dtype)
    self.norm2 = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, axis_name='vision_embed', stack=stack, param_dtype=param_dtype)
    self.attn = VisionAttention(cfg, stack=stack, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, axes=('vision_embed', 'vision_mlp'),
                      hook_prefix='vision', use_bias=True, act=cfg.hidden_act, stack=stack,
                      dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, cos, sin, segment_ids, window, impl):
    x = x + self.attn(self.norm1(x), cos, sin, segment_ids, window, impl)
    return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
  """RMSNorm per patch, concatenate each 2x2 merge unit, then Linear -> exact GELU -> Linear."""

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs):
    merged = cfg.hidden_size * cfg.merge_unit
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.unit = cfg.merge_unit
    self.ln_q = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, axis_name='vision_embed', param_dtype=param_dtype)
    self.fc1 = Linear(merged, merged, axes=('vision_merge', 'vision_merge_mlp'), hook='vision.merger.fc1', **kw)
    self.fc2 = Linear(merged, cfg.out_hidden_size, axes=('vision_merge_mlp', 'embed'), hook='vision.merger.fc2', **kw)

  def __call__(self, x):  # (..., S, D) -> (..., S/u, out)
    x = self.ln_q(x)
    x = x.reshape(*x.shape[:-2], x.shape[-2] // self.unit, self.unit * x.shape[-1])
    return self.fc2(activation('gelu_exact')(self.fc1(x)))


class VisionTower(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               scan_layers: bool = True, remat: str = 'none', attention_impl: str = 'auto',
               rngs: nnx.Rngs):
    self.cfg = cfg
    self.scan_layers, self.remat, self.attention_impl = scan_layers, remat, attention_impl
    self.patch_embed = Linear(cfg.patch_dim, cfg.hidden_size, axes=('vision_patch', 'vision_embed'),
                              hook='vision.patch_embed', use_bias=False, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)
    self.blocks = VisionBlock(cfg, stack=(cfg.depth,), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.merger = PatchMerger(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, inputs) -> jax.Array:
    """Merged vision tokens (G, N/u, out_hidden) in raster order per group (transformers'
    `pooler_output` for G = 1). Attention never crosses rows, so groups fold into rows."""
    cfg, u = self.cfg, self.cfg.merge_unit
    groups, rows = inputs.window_index.shape[:2]
    to_slots = jax.vmap(lambda a, index: gather_units(a, index, u))
    x = self.patch_embed(inputs.pixel_patches)
    x = to_slots(x, inputs.window_index)  # (G, R, S, D) in window order
    x = x.reshape(groups * rows, *x.shape[2:])
    rope_ids = to_slots(inputs.vision_rope_ids, inputs.window_index)
    cos, sin = vision_cos_sin(rope_ids.reshape(groups * rows, -1, 2), cfg.head_dim, cfg.rope_theta)
    full_seg = inputs.full_segment_ids.reshape(groups * rows, -1)
    window_seg = inputs.window_segment_ids.reshape(groups * rows, -1)
    impl, window = self.attention_impl, cfg.window_patches

    def body(block, x, is_full):
      if isinstance(is_full, (bool, np.bool_)):  # unrolled: the kind is static
        x = block(x, cos, sin, *((full_seg, None) if is_full else (window_seg, window)), impl)
      else:
        x = jax.lax.cond(is_full, lambda x: block(x, cos, sin, full_seg, None, impl),
                         lambda x: block(x, cos, sin, window_seg, window, impl), x)
      return constrain(x, ('batch', None, None))  # vision rows follow the batch

    is_full = np.array([cfg.is_full_attention(i) for i in range(cfg.depth)])
    x = run_stack(self.blocks, x, body, per_layer=is_full, scan=self.scan_layers, remat=self.remat)
    merged = self.merger(x)  # (G*R, S/u, out)
    merged = merged.reshape(groups, -1, merged.shape[-1])
    return jax.vmap(lambda m, index: gather_units(m, index, 1))(merged, inputs.window_inverse)
