"""Running a stack of identical layers whose parameters carry a leading `layers` axis.

`scan=True` runs them under `lax.scan` (one compiled body); `scan=False` unrolls a Python loop
over slices of the same stacked parameters. Both give identical results.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

# Projection outputs are tagged with their hook name (`layers.Linear`), so a policy can keep them.
PROJECTION_NAMES = tuple(f'{tower}.{p}' for tower, ps in (
    ('text', ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')),
    ('vision', ('qkv', 'proj', 'gate_proj', 'up_proj', 'down_proj'))) for p in ps)

REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'save_dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'projections': jax.checkpoint_policies.save_only_these_names(*PROJECTION_NAMES),
}


def run_stack(stack: nnx.Module, carry: Any, body: Callable[[nnx.Module, Any, Any], Any], *,
              per_layer: Any = None, scan: bool = True, remat: str = 'none') -> Any:
  """carry = body(layer_i, carry, per_layer[i]) for each layer i of the stacked module.

  Unrolled, `per_layer[i]` reaches the body as a static NumPy scalar; scanned, as a traced one.
  """
  graphdef, state = nnx.split(stack)
  num_layers = jax.tree.leaves(state)[0].shape[0]

  def step(carry, xs):
    layer_state, extra = xs
    return body(nnx.merge(graphdef, layer_state), carry, extra), None

  if remat not in REMAT_POLICIES:
    raise ValueError(f'Unknown remat policy {remat!r}; available: {sorted(REMAT_POLICIES)}')
  maybe_remat = lambda f: f if remat == 'none' else jax.checkpoint(
      f, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
  if scan:
    carry, _ = jax.lax.scan(maybe_remat(step), carry, (state, jax.numpy.asarray(per_layer)
                                                       if per_layer is not None else None))
    return carry
  for i in range(num_layers):
    extra = None if per_layer is None else per_layer[i]
    layer_step = maybe_remat(lambda c, s, extra=extra: body(nnx.merge(graphdef, s), c, extra))
    carry = layer_step(carry, jax.tree.map(lambda a: a[i], state))
  return carry
