"""Putting a train step together on a mesh: the split into trainable / frozen, dtypes, the
shardings of the state (from the logical axis rules, without allocating), and the jitted step
with a donated state."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from coma_jax.parallel.activations import under_rules
from coma_jax.parallel.rules import head_units, state_shardings
from coma_jax.training.optim import OptimConfig, TrainableConfig, make_optimizer
from coma_jax.training.train_state import TrainState, split_model


def _cast(tree, dtype):
  def one(x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    return x.astype(dtype)
  return jax.tree.map(one, tree)


def _with_shardings(tree, shardings):
  """Abstract leaves get their sharding; concrete ones are placed."""
  def one(x, s):
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    return jax.device_put(x, s)
  return jax.tree.map(one, tree, shardings)


@dataclasses.dataclass
class TrainSetup:
  graphdef: Any
  state: TrainState            # concrete and sharded, or abstract (ShapeDtypeStructs with shardings)
  state_shardings: TrainState
  step: Callable               # jitted (state, batch, key) -> (state, metrics), state donated
  tx: Any
  mesh: Mesh


def build_train_setup(model: nnx.Module, mesh: Mesh, make_step: Callable, *, rules: dict,
                      optim: OptimConfig, trainable: TrainableConfig, frozen_dtype=None,
                      frozen_replicated: bool = False) -> TrainSetup:
  """`model` may be concrete or abstract (`nnx.eval_shape`): then nothing is allocated."""
  graphdef, params, frozen = split_model(model, trainable.filter())
  params = _cast(params, jnp.float32)  # fp32 master copies of what trains
  if frozen_dtype is not None:
    frozen = _cast(frozen, frozen_dtype)
  replicated = NamedSharding(mesh, P())
  units = head_units(model.config)
  param_sh = state_shardings(params, rules, mesh, units=units)
  frozen_sh = state_shardings(frozen, rules, mesh, replicate=frozen_replicated, units=units)
  params, frozen = _with_shardings(params, param_sh), _with_shardings(frozen, frozen_sh)
  tx = make_optimizer(optim)
  abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
  # Optimizer moments take their parameter's sharding; other leaves (Adam's step count) replicate.
  # (Asking XLA for tx.init's output shardings replicated the embedding's moments: 4 GiB per
  # device on the 7B.)
  opt_sh = optax.tree_utils.tree_map_params(
      tx, lambda _, sharding: sharding, jax.eval_shape(tx.init, abstract_params),
      jax.tree.map(lambda x: x.sharding, abstract_params), transform_non_params=lambda _: replicated)
  shardings = TrainState(step=replicated, params=param_sh, frozen=frozen_sh, opt_state=opt_sh, skipped=replicated)
  if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
    opt_state = jax.eval_shape(tx.init, abstract_params)
    opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt_state, opt_sh)
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    state = TrainState(step=scalar, params=params, frozen=frozen, opt_state=opt_state, skipped=scalar)
  else:
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    zero = lambda: jax.device_put(jnp.zeros((), jnp.int32), replicated)  # two buffers: both are donated
    state = TrainState(step=zero(), params=params, frozen=frozen, opt_state=opt_state, skipped=zero())
  # Traced inside the rules, so the model's activation constraints apply.
  step = jax.jit(under_rules(make_step(graphdef, tx), mesh, rules), out_shardings=(shardings, replicated),
                 donate_argnums=0)
  return TrainSetup(graphdef, state, shardings, step, tx, mesh)


def create_sharded(make_model: Callable[[], nnx.Module], mesh: Mesh, rules: dict) -> nnx.Module:
  """A freshly initialised model whose parameters are created directly in their shardings
  (initialisers run under jit with out_shardings: no unsharded copy ever exists)."""
  abstract = nnx.eval_shape(make_model)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = state_shardings(abstract_state, rules, mesh, units=head_units(abstract.config))
  state = jax.jit(lambda: nnx.split(make_model())[1], out_shardings=shardings)()
  return nnx.merge(graphdef, state)
