"""Basic layers with logical axis names: Linear (the adapter hook point), RMSNorm, Embed, MLPs.

Every parameter carries its logical axis names in the `out_sharding` metadata (resolved to mesh
axes by `coma_jax.parallel.rules`). Layers that live in a scanned stack take `stack=(n,)`, which
prepends a `layers` axis to each parameter; inside the scan body they see one slice.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

LAYERS_AXIS = 'layers'


def make_param(rngs: nnx.Rngs | None, init, shape, axes, stack, dtype) -> nnx.Param:
  """A parameter of shape `stack + shape` named `(layers,)*len(stack) + axes`."""
  full_shape = tuple(stack) + tuple(shape)
  names = (LAYERS_AXIS,) * len(stack) + tuple(axes)
  if init == 'ones':
    value = jnp.ones(full_shape, dtype)
  elif init == 'zeros':
    value = jnp.zeros(full_shape, dtype)
  else:  # normal with the given stddev, as HF initialises projections and embeddings
    value = (init * jax.random.normal(rngs.params(), full_shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


class Linear(nnx.Module):
  """y = x @ kernel + bias, kernel (in, out). The named hook point that LoRA/DoRA wraps.

  `hook` is the projection's stable name (e.g. `text.q_proj`), which adapter target lists match.
  """

  def __init__(self, in_features: int, out_features: int, *, axes: tuple[str, str], hook: str,
               use_bias: bool, stack=(), dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs, init_std: float = 0.02):
    self.hook = hook
    self.dtype = dtype
    self.kernel = make_param(rngs, init_std, (in_features, out_features), axes, stack, param_dtype)
    self.bias = make_param(rngs, 'zeros', (out_features,), axes[1:], stack, param_dtype) if use_bias else None

  def __call__(self, x: jax.Array, ctx=None) -> jax.Array:
    """`ctx` (a `DropoutContext` or None) is for adapters that wrap this hook; ignored here."""
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return checkpoint_name(y, self.hook)


class RMSNorm(nnx.Module):
  """Qwen2 RMSNorm: normalise in fp32, cast back, then scale (the order matters in bf16)."""

  def __init__(self, dim: int, *, eps: float, axis_name: str, stack=(), param_dtype=jnp.float32):
    self.eps = eps
    self.scale = make_param(None, 'ones', (dim,), (axis_name,), stack, param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


class Embed(nnx.Module):

  def __init__(self, vocab_size: int, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.dtype = dtype
    self.embedding = make_param(rngs, 0.02, (vocab_size, dim), ('vocab', 'embed'), (), param_dtype)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """Tied LM head: logits = x @ embedding.T."""
    return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


def activation(name: str):
  if name == 'silu':
    return jax.nn.silu
  if name in ('gelu', 'gelu_exact'):
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name in ('gelu_pytorch_tanh', 'gelu_new'):
    return lambda x: jax.nn.gelu(x, approximate=True)
  raise ValueError(f'Unsupported activation {name!r}')


class SwiGLU(nnx.Module):
  """down(act(gate(x)) * up(x)); the LLM has no biases, the vision tower has them."""

  def __init__(self, dim: int, hidden: int, *, axes: tuple[str, str], hook_prefix: str,
               use_bias: bool, act: str, stack=(), dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=use_bias, stack=stack, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.act = act
    self.gate_proj = Linear(dim, hidden, axes=axes, hook=f'{hook_prefix}.gate_proj', **kw)
    self.up_proj = Linear(dim, hidden, axes=axes, hook=f'{hook_prefix}.up_proj', **kw)
    self.down_proj = Linear(hidden, dim, axes=axes[::-1], hook=f'{hook_prefix}.down_proj', **kw)

  def __call__(self, x: jax.Array, ctx=None) -> jax.Array:
    return self.down_proj(activation(self.act)(self.gate_proj(x, ctx)) * self.up_proj(x, ctx), ctx)


def iter_hooks(model: nnx.Module):
  """(path, Linear) for every adapter hook point in the model, in a stable order."""
  return [(path, m) for path, m in model.iter_modules() if isinstance(m, Linear)]
