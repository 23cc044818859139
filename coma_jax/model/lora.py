"""LoRA and DoRA adapters on the model's named hook points (`layers.Linear`).

`apply_adapters(model, AdapterConfig(...))` swaps each targeted `Linear` for an `AdapterLinear`
that keeps the original as `.base`; stacked layers get stacked adapters. DoRA follows `peft`:
  y = W x + b + (m / n - 1) * W x' + (m / n) * s * B A x',   n = ||W + s B A|| (per output, detached)
with x' = dropout(x) (x' = x without dropout) and s = alpha / r. `merge_adapters` folds them back.

Dropout keys come per token (`DropoutContext`): from (sequence id, offset within the sequence),
folded with the layer index and the hook name, so a token's mask depends neither on how the batch
is split or chunked nor on where packing put its sequence.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from coma_jax.model.layers import LAYERS_AXIS, Linear, iter_hooks

REFERENCE_TARGETS = ('text.q_proj', 'text.k_proj', 'text.v_proj', 'text.o_proj')


class AdapterParam(nnx.Param):
  """Adapter weights: a Param subtype, so filters can select them (`nnx.OfType(AdapterParam)`)."""


@struct.dataclass
class DropoutContext:
  """Per-token PRNG keys (B, L) for adapter dropout; `for_layer` folds in the layer index."""
  keys: jax.Array

  def for_layer(self, layer) -> 'DropoutContext':
    return DropoutContext(jax.vmap(jax.vmap(lambda k: jax.random.fold_in(k, layer)))(self.keys))

  @classmethod
  def for_tokens(cls, key: jax.Array, sequence_ids: jax.Array, offsets: jax.Array) -> 'DropoutContext':
    """One key per (sequence id, offset in the sequence), both (B, L): the same masks however the
    batch is chunked, and whether a sequence has a row of its own or shares a packed row."""
    fold = lambda i, o: jax.random.fold_in(jax.random.fold_in(key, i), o)
    return cls(jax.vmap(jax.vmap(fold))(sequence_ids, offsets))


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  rank: int = 16
  alpha: float = 64.0
  dropout: float = 0.1
  dora: bool = True
  targets: Sequence[str] = REFERENCE_TARGETS

  def __post_init__(self):
    if self.rank < 1 or not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'adapter rank must be >= 1 and dropout in [0, 1): {self}')


def _hook_salt(hook: str) -> int:
  return zlib.crc32(hook.encode()) & 0x7FFFFFFF


class AdapterLinear(nnx.Module):

  def __init__(self, base: Linear, cfg: AdapterConfig, rngs: nnx.Rngs):
    self.base, self.hook = base, base.hook
    self.scaling, self.dropout, self.dora = cfg.alpha / cfg.rank, cfg.dropout, cfg.dora
    kernel = base.kernel[...]
    stack, (fan_in, fan_out) = kernel.shape[:-2], kernel.shape[-2:]
    names = base.kernel.get_metadata()['out_sharding']
    in_name, out_name = names[-2], names[-1]
    stack_names = (LAYERS_AXIS,) * len(stack)
    bound = 1.0 / fan_in ** 0.5  # torch kaiming_uniform(a=sqrt(5)), as peft initialises A
    a = jax.random.uniform(rngs.params(), stack + (fan_in, cfg.rank), jnp.float32, -bound, bound)
    self.lora_a = AdapterParam(a, out_sharding=stack_names + (in_name, None), eager_sharding=False)
    self.lora_b = AdapterParam(jnp.zeros(stack + (cfg.rank, fan_out), jnp.float32),
                               out_sharding=stack_names + (None, out_name), eager_sharding=False)
    if cfg.dora:  # magnitude starts at the norm of W, so the adapted layer starts equal to the base
      m = jnp.linalg.norm(kernel.astype(jnp.float32), axis=-2)
      self.magnitude = AdapterParam(m, out_sharding=stack_names + (out_name,), eager_sharding=False)

  def _dropped(self, x, ctx):
    if ctx is None or self.dropout == 0.0:
      return x
    keep = 1.0 - self.dropout

    def token(key, xt):
      mask = jax.random.bernoulli(jax.random.fold_in(key, _hook_salt(self.hook)), keep, xt.shape)
      return jnp.where(mask, xt / keep, 0).astype(xt.dtype)
    return jax.vmap(jax.vmap(token))(ctx.keys, x)

  def delta_weight(self) -> jax.Array:
    return self.scaling * (self.lora_a[...] @ self.lora_b[...])

  def __call__(self, x: jax.Array, ctx=None) -> jax.Array:
    base = self.base
    dtype = base.dtype
    y = base(x)
    xd = self._dropped(x, ctx)
    a, b = self.lora_a[...].astype(dtype), self.lora_b[...].astype(dtype)
    lora = jnp.dot(jnp.dot(xd.astype(dtype), a), b) * self.scaling
    if not self.dora:
      return y + lora
    w = base.kernel[...].astype(jnp.float32)
    norm = jnp.linalg.norm(w + jax.lax.stop_gradient(self.delta_weight().astype(jnp.float32)), axis=-2)
    scale = (self.magnitude[...] / jax.lax.stop_gradient(norm)).astype(dtype)
    if xd is x:  # no dropout: W x is the base output less its bias (no second matmul), as peft
      base_x = y if base.bias is None else y - base.bias[...].astype(dtype)
    else:
      base_x = jnp.dot(xd.astype(dtype), base.kernel[...].astype(dtype))  # W x' (no bias), as peft
    return y + (scale - 1) * base_x + scale * lora

  def merged_kernel(self) -> jax.Array:
    w = self.base.kernel[...].astype(jnp.float32) + self.delta_weight()
    if self.dora:
      w = w * (self.magnitude[...] / jnp.linalg.norm(w, axis=-2))[..., None, :]
    return w.astype(self.base.kernel.dtype)


def _parent_and_name(model, path):
  parent = model
  for name in path[:-1]:
    parent = getattr(parent, name)
  return parent, path[-1]


def apply_adapters(model: nnx.Module, cfg: AdapterConfig, rngs: nnx.Rngs) -> list[str]:
  """Wraps every hook named in cfg.targets; returns the wrapped hook names (error if none)."""
  wrapped = []
  for path, linear in iter_hooks(model):
    if linear.hook in cfg.targets and not isinstance(_parent_and_name(model, path)[0], AdapterLinear):
      parent, name = _parent_and_name(model, path)
      setattr(parent, name, AdapterLinear(linear, cfg, rngs))
      wrapped.append(linear.hook)
  unknown = set(cfg.targets) - set(wrapped)
  if unknown:
    raise ValueError(f'adapter targets {sorted(unknown)} match no hook point; hooks: '
                     f'{sorted({m.hook for _, m in iter_hooks(model)})}')
  return wrapped


def merge_adapters(model: nnx.Module) -> int:
  """Folds every adapter into its base weights and unwraps it (in place); returns how many."""
  adapters = [(path, m) for path, m in model.iter_modules() if isinstance(m, AdapterLinear)]
  for path, adapter in adapters:
    base = adapter.base
    base.kernel.value = adapter.merged_kernel()
    parent, name = _parent_and_name(model, path)
    setattr(parent, name, base)
  return len(adapters)
