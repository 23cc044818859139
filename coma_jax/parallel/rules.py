"""Logical axis names -> mesh axes, and the shardings of parameters, states and batches.

A dimension whose size does not divide its mesh axes is replicated, never padded (the 7B has 4 KV
heads; the vision MLP is 3420 wide). A mesh axis is used at most once per array.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# The default table: FSDP over the model width, tensor parallelism over heads and MLP width,
# the batch over data and fsdp. Configs may override any entry.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('vocab', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('mlp', 'tensor'),
    ('vision_patch', None),
    ('vision_embed', 'fsdp'),
    ('vision_heads', 'tensor'),
    ('vision_mlp', 'tensor'),
    ('vision_merge', 'fsdp'),
    ('vision_merge_mlp', 'tensor'),
    ('layers', None),
    ('activation_length', None),
    ('activation_embed', None),
)


def mesh_axes_for(names: Sequence[str | None], shape: Sequence[int], rules: Mapping, mesh: Mesh,
                  units: Mapping[str, int] | None = None) -> P:
  """`units`: the size of one indivisible unit of a logical axis (a head: head_dim), so that
  e.g. 4 KV heads are not split 8 ways even though 4 x 128 divides by 8."""
  used, spec = set(), []
  for name, size in zip(names, shape):
    axes = rules.get(name) if name is not None else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a not in used and mesh.shape.get(a, 1) > 1)
    total = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    unit = (units or {}).get(name, 1)
    if not axes or size % unit or (size // unit) % total:
      spec.append(None)  # indivisible: replicate
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def head_units(model_config) -> dict[str, int]:
  return {'heads': model_config.text.head_dim, 'kv_heads': model_config.text.head_dim,
          'vision_heads': model_config.vision.head_dim}


def state_shardings(state, rules: Mapping, mesh: Mesh, replicate: bool = False, units=None):
  """The state's structure with a NamedSharding as each value, from the logical axis metadata.
  Works on abstract states (`nnx.eval_shape`): nothing is allocated."""
  def one(var):
    names = var.get_metadata().get('out_sharding') or (None,) * len(var.shape)
    spec = P() if replicate else mesh_axes_for(names, var.shape, rules, mesh, units)
    return var.replace(NamedSharding(mesh, spec))
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(value_shape: Sequence[int], batch_axis: int, rules: Mapping, mesh: Mesh) -> NamedSharding:
  names = [None] * len(value_shape)
  names[batch_axis] = 'batch'
  return NamedSharding(mesh, mesh_axes_for(names, value_shape, rules, mesh))


def rules_dict(rules) -> dict:
  return dict(DEFAULT_RULES) | dict(rules or ())
