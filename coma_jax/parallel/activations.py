"""Sharding constraints on activations by logical axis names, through the same rules table.

The model calls `constrain(x, names)` at layer boundaries; it is a no-op unless a train step is
being traced inside `activation_sharding(mesh, rules)` (set by `training/sharded_setup.py`). A batch axis
that does not divide its mesh axes is left to XLA rather than forced to replicate.
"""
from __future__ import annotations

import contextlib
from typing import Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding

from coma_jax.parallel.rules import mesh_axes_for

_current: list[tuple[Mesh, Mapping]] = []


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Mapping):
  _current.append((mesh, rules))
  try:
    yield
  finally:
    _current.pop()


def active() -> tuple[Mesh, Mapping] | None:
  """The (mesh, rules) of the train step being traced, or None outside one."""
  return _current[-1] if _current else None


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  if not _current:
    return x
  mesh, rules = _current[-1]
  spec = mesh_axes_for(names, x.shape, rules, mesh)
  if any(n == 'batch' and axes is None for n, axes in zip(names, spec)):
    return x  # the batch does not divide the devices here: do not force a replication
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def under_rules(fn, mesh: Mesh, rules: Mapping):
  """`fn` traced with the activation rules active (wrap before `jax.jit`)."""
  def wrapped(*args, **kwargs):
    with activation_sharding(mesh, rules):
      return fn(*args, **kwargs)
  return wrapped
