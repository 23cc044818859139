"""Stage 2: InfoNCE over the global batch, exact GradCache, frozen-vision reuse, meshes, memory."""
import jax
import numpy as np
import pytest
from flax import nnx

from coma_jax.data.batching import Bucket
from coma_jax.data.pipeline import to_global
from coma_jax.model.lora import AdapterConfig, AdapterLinear, apply_adapters
from coma_jax.parallel.activations import under_rules
from coma_jax.parallel.mesh import make_mesh
from coma_jax.parallel.rules import batch_sharding, rules_dict
from coma_jax.training.sharded_setup import build_train_setup
from coma_jax.training.optim import OptimConfig, TrainableConfig
from coma_jax.training.stage2 import (Stage2StepConfig, info_nce, make_stage2_grads, make_stage2_step,
                                      prepare_stage2_model)
from coma_jax.model.inputs import BATCH_AXIS
from tests.stage2_batches import pair_batch
from tests.tiny_models import jax_twin, torch_model

KEY = jax.random.key(1)
FULL = dict(hard_negatives=True, bidirectional=True)


def fresh_model():
  model = jax_twin(torch_model('tied_gqa2_win56', seed=2))
  apply_adapters(model, AdapterConfig(rank=4, alpha=16, dropout=0.1), nnx.Rngs(0))
  return model


@pytest.fixture(scope='module')
def setup_data():
  model = fresh_model()
  batch = pair_batch(model.config, rows=8, negatives=True, invalid=(5,))
  return model, batch


def global_norm(tree):
  return float(np.sqrt(sum((np.asarray(x, np.float64) ** 2).sum() for x in jax.tree.leaves(tree))))


def rel(a, b):
  a, b = jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b)
  return global_norm(jax.tree.map(np.subtract, a, b)) / global_norm(b)


def grads(model, batch, **kw):
  g, p, f = nnx.split(model, TrainableConfig().filter(), ...)
  return jax.jit(make_stage2_grads(g, Stage2StepConfig(**kw)))(p, f, batch, KEY)


def test_info_nce_matches_a_numpy_reference():
  rng = np.random.default_rng(0)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  q, t, n = (unit(rng.normal(size=(6, 5))) for _ in range(3))
  valid = {'query': np.array([1, 1, 1, 0, 1, 1], bool), 'positive': np.array([1, 1, 1, 1, 0, 1], bool),
           'negative': np.array([1, 0, 1, 1, 1, 1], bool)}
  tau = 0.05

  def ce(a, b, b_valid, rows):
    losses = []
    for i in np.flatnonzero(rows):
      s = np.where(b_valid, a[i] @ b.T / tau, -np.inf)
      losses.append(np.log(np.exp(s[np.isfinite(s)]).sum()) - s[i])
    return np.mean(losses)

  rows = valid['query'] & valid['positive']
  expected = 0.5 * (ce(q, np.concatenate([t, n]), np.concatenate([valid['positive'], valid['negative']]), rows)
                    + ce(t, q, valid['query'], rows))
  ours = info_nce({'query': q, 'positive': t, 'negative': n}, valid,
                  Stage2StepConfig(temperature=tau, hard_negatives=True, bidirectional=True))
  assert abs(float(ours) - expected) <= 1e-5


def test_grad_cache_equals_the_full_batch_gradient(setup_data):
  model, batch = setup_data
  loss1, g1 = grads(model, batch, chunks=1, **FULL)
  for chunks in (2, 4):
    loss, g = grads(model, batch, chunks=chunks, **FULL)
    assert abs(float(loss) - float(loss1)) <= 1e-5 * abs(float(loss1))
    assert rel(g, g1) <= 1e-5, chunks
  # Dropout is on (0.1): another key gives other gradients, so the masks really matched above.
  g, p, f = nnx.split(model, TrainableConfig().filter(), ...)
  _, g_other = jax.jit(make_stage2_grads(g, Stage2StepConfig(chunks=2, **FULL)))(p, f, batch, jax.random.key(9))
  assert rel(g_other, g1) > 1e-3


def test_reusing_the_frozen_vision_tower_changes_nothing(setup_data):
  model, batch = setup_data
  _, reused = grads(model, batch, chunks=2, reuse_frozen_vision=True, **FULL)
  _, recomputed = grads(model, batch, chunks=2, reuse_frozen_vision=False, **FULL)
  assert rel(reused, recomputed) <= 1e-6


def test_meshes_agree_with_one_device_including_grad_cache(setup_data):
  _, batch = setup_data
  cfg = Stage2StepConfig(chunks=2, **FULL)
  results = {}
  for shape in [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)]:
    mesh = make_mesh(shape, jax.devices()[:int(np.prod(shape))])
    setup = build_train_setup(fresh_model(), mesh, lambda g, tx: make_stage2_step(g, tx, cfg), rules=rules_dict(()),
                              optim=OptimConfig(total_steps=10), trainable=TrainableConfig())
    rules = rules_dict(())
    placed = to_global(batch, lambda name, shape: batch_sharding(shape, BATCH_AXIS.get(name, 0), rules, mesh))
    results[shape] = jax.jit(under_rules(make_stage2_grads(setup.graphdef, cfg), mesh, rules))(
        setup.state.params, setup.state.frozen,
                                                                      placed, KEY)
  loss1, g1 = results[(1, 1, 1)]
  for shape, (loss, g) in results.items():
    assert abs(float(loss) - float(loss1)) <= 1e-5 * abs(float(loss1)), shape
    assert rel(g, g1) <= 1e-5, shape


@pytest.mark.slow  # a memory property (compiled temp sizes), not correctness: make test-all
def test_activation_memory_follows_the_chunk_not_the_batch(setup_data):
  model, _ = setup_data
  g, p, f = nnx.split(model, TrainableConfig().filter(), ...)
  abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)

  def temp(rows, chunks):  # text-only pairs: the inputs are tiny, the temp is activations
    b = pair_batch(model.config, rows=rows, negatives=True, images=False, bucket=Bucket(48, 0, 0))
    fn = jax.jit(make_stage2_grads(g, Stage2StepConfig(chunks=chunks, **FULL)))
    return fn.lower(abstract(p), abstract(f), abstract(b), KEY).compile().memory_analysis().temp_size_in_bytes

  small, big, big_plain = temp(8, 2), temp(32, 8), temp(32, 1)  # chunk of 4 rows, then none
  print(f'temp bytes: batch 8 chunk 4: {small}; batch 32 chunk 4: {big}; batch 32 unchunked: {big_plain}')
  assert big < 1.2 * small  # 4x the batch, the same activation memory (measured 4.42 MB vs 4.50 MB)
  assert big_plain > 10 * big  # unchunked: 81 MB


def test_stage2_starts_from_merged_weights_with_a_fresh_adapter(setup_data):
  model, batch = setup_data
  stage1 = fresh_model()
  adapter = stage1.decoder.layers.self_attn.q_proj
  adapter.lora_b.value = 0.1 * jax.random.normal(jax.random.key(3), adapter.lora_b.shape)
  inputs = batch['query']['inputs']
  before = np.asarray(stage1(inputs))
  model2 = prepare_stage2_model(stage1, AdapterConfig(rank=4, alpha=16, dropout=0.1), nnx.Rngs(5))
  q = model2.decoder.layers.self_attn.q_proj
  assert isinstance(q, AdapterLinear) and not np.asarray(q.lora_b[...]).any()  # fresh: B = 0
  valid = np.asarray(inputs.token_valid)
  assert np.abs(np.asarray(model2(inputs)) - before)[valid].max() <= 1e-5
