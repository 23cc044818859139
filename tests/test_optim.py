"""The optimiser update: embeddings='new_tokens_only' masks the frozen rows before clipping."""
import jax.numpy as jnp
import numpy as np

from coma_jax.training.optim import OptimConfig, make_optimizer
from coma_jax.training.train_state import TrainState
from coma_jax.training.updates import apply_gradients


def test_frozen_embedding_rows_do_not_shrink_the_clipped_update():
  params = {'embed_tokens': {'embedding': jnp.zeros((6, 2))}, 'adapter': jnp.zeros((2,))}
  # Huge gradients on the frozen rows 0..3 (a tied LM head's gradient), small ones where it trains.
  grads = {'embed_tokens': {'embedding': jnp.array([[100.0, 100.0]] * 4 + [[0.3, 0.0], [0.0, 0.4]])},
           'adapter': jnp.array([0.0, 0.0])}
  tx = make_optimizer(OptimConfig(learning_rate=1.0, warmup_ratio=0.0, total_steps=10, clip_norm=1.0))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen={}, opt_state=tx.init(params),
                     skipped=jnp.zeros((), jnp.int32))
  new, metrics = apply_gradients(state, jnp.float32(1.0), grads, tx, first_trainable_embedding_row=4)
  assert np.isclose(float(metrics['grad_norm']), 0.5)  # the norm of the trainable rows only
  rows = np.asarray(new.params['embed_tokens']['embedding'])
  assert (rows[:4] == 0).all()
  # Unclipped (0.5 < 1): Adam's first step moves each trained coordinate by about the learning rate.
  np.testing.assert_allclose(np.abs(rows[4:]), [[1.0, 0.0], [0.0, 1.0]], atol=1e-4)
