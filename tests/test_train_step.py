"""The stage-1 train step on 8 fake CPU devices: meshes agree with one device; accumulation,
remat and scan settings agree; non-finite updates are skipped; compiles are bounded by buckets."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coma_jax.data.batching import Bucket
from coma_jax.data.pipeline import to_global
from coma_jax.model.lora import AdapterConfig, apply_adapters
from coma_jax.parallel.activations import under_rules
from coma_jax.parallel.mesh import make_mesh
from coma_jax.parallel.rules import batch_sharding, rules_dict
from coma_jax.training.sharded_setup import build_train_setup
from coma_jax.training.optim import OptimConfig, TrainableConfig
from coma_jax.model.inputs import BATCH_AXIS
from coma_jax.training.stage1 import Stage1StepConfig, make_stage1_grads, make_stage1_step
from tests.stage1_batches import batch
from tests.tiny_models import jax_twin, torch_model

KEY = jax.random.key(0)
ADAPTERS = AdapterConfig(rank=4, alpha=16, dropout=0.1)


def fresh_model(**kw):
  model = jax_twin(torch_model('tied_gqa2_win56', seed=11), **kw)
  apply_adapters(model, ADAPTERS, nnx.Rngs(3))
  return model


@pytest.fixture(scope='module')
def data():
  model = fresh_model()
  b, _ = batch(model.config, rows=8)
  return b


def place(b, mesh):
  rules = rules_dict(())
  return to_global(b, lambda name, shape: batch_sharding(shape, BATCH_AXIS.get(name, 0), rules, mesh))


def grads_on(mesh_shape, data, cfg=Stage1StepConfig(), **model_kw):
  mesh = make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
  setup = build_train_setup(fresh_model(**model_kw), mesh, lambda g, tx: make_stage1_step(g, tx, cfg),
                            rules=rules_dict(()), optim=OptimConfig(total_steps=10), trainable=TrainableConfig())
  fn = jax.jit(under_rules(make_stage1_grads(setup.graphdef, cfg), mesh, rules_dict(())))
  loss, tokens, grads = fn(setup.state.params, setup.state.frozen, place(data, mesh), KEY)
  return float(loss), jax.tree.map(np.asarray, grads), setup


def max_rel(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return max(np.abs(x - y).max() / (np.abs(y).max() + 1e-12) for x, y in zip(la, lb))


def test_meshes_agree_with_one_device(data):
  loss1, grads1, _ = grads_on((1, 1, 1), data)
  for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]:
    loss, grads, setup = grads_on(shape, data)
    assert abs(loss - loss1) <= 1e-5 * abs(loss1), shape
    assert max_rel(grads, grads1) <= 1e-4, shape
  # On (2, 2, 2), parameters really are sharded (fsdp on the model width, tensor on heads).
  q = setup.state.params['decoder']['layers']['self_attn']['q_proj']['lora_b']
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, None, 'tensor')
  # Adam's moments live where their parameter does (the embedding's were once replicated: 4 GiB
  # per device on the 7B); only the step counts are replicated.
  params = {jax.tree_util.keystr(p): x.sharding for p, x in jax.tree_util.tree_leaves_with_path(setup.state.params)}
  moments = 0
  for path, x in jax.tree_util.tree_leaves_with_path(setup.state.opt_state):
    name = jax.tree_util.keystr(path)
    owner = [sh for p, sh in params.items() if name.endswith(p)]
    if owner:
      moments += 1
      assert x.sharding.spec == owner[0].spec, name
    else:
      assert x.shape == () and x.sharding.spec == jax.sharding.PartitionSpec(), name
  assert moments == 2 * len(params)
  embedding_mu = [x for p, x in jax.tree_util.tree_leaves_with_path(setup.state.opt_state)
                  if 'mu' in jax.tree_util.keystr(p) and 'embed_tokens' in jax.tree_util.keystr(p)][0]
  assert embedding_mu.sharding.spec == jax.sharding.PartitionSpec('tensor', 'fsdp')


@pytest.mark.slow  # remat policies and scan vs unrolled: make test-all (scan = unrolled is also a parity test)
def test_accumulation_remat_and_scan_agree(data):
  loss1, grads1, _ = grads_on((1, 1, 1), data)
  for cfg, kw in [(Stage1StepConfig(micro_batches=4), {}), (Stage1StepConfig(), {'remat': 'full'}),
                  (Stage1StepConfig(), {'remat': 'save_dots'}), (Stage1StepConfig(), {'remat': 'projections'}),
                  (Stage1StepConfig(), {'scan_layers': False})]:
    loss, grads, _ = grads_on((1, 1, 1), data, cfg, **kw)
    assert abs(loss - loss1) <= 1e-5 * abs(loss1) and max_rel(grads, grads1) <= 1e-4, (cfg, kw)


def test_steps_update_skip_non_finite_and_keep_other_embedding_rows(data):
  mesh = make_mesh((2, 2, 2))
  cfg = Stage1StepConfig(first_trainable_embedding_row=504)
  setup = build_train_setup(fresh_model(), mesh, lambda g, tx: make_stage1_step(g, tx, cfg), rules=rules_dict(()),
                            optim=OptimConfig(total_steps=10, learning_rate=1e-2, warmup_ratio=0.0),
                            trainable=TrainableConfig(embeddings='new_tokens_only'))
  b = place(data, mesh)
  embed0 = np.asarray(setup.state.params['embed_tokens']['embedding'][...])
  state, metrics = setup.step(setup.state, b, KEY)
  assert bool(metrics['finite']) and int(state.step) == 1
  embed1 = np.asarray(state.params['embed_tokens']['embedding'][...])
  assert np.array_equal(embed1[:504], embed0[:504]) and not np.array_equal(embed1[504:508], embed0[504:508])
  bad = dict(b, inputs=b['inputs'].replace(pixel_patches=b['inputs'].pixel_patches * jnp.nan))
  before = jax.tree.map(np.asarray, state.params)
  state, metrics = setup.step(state, bad, KEY)
  assert not bool(metrics['finite']) and int(state.skipped) == 1 and int(state.step) == 1
  assert max_rel(jax.tree.map(np.asarray, state.params), before) == 0


def test_compiles_are_bounded_by_buckets(data):
  model = fresh_model()
  mesh = make_mesh((8, 1, 1))
  setup = build_train_setup(model, mesh, lambda g, tx: make_stage1_step(g, tx, Stage1StepConfig()),
                            rules=rules_dict(()), optim=OptimConfig(total_steps=10), trainable=TrainableConfig())
  buckets = [Bucket(64, 128, 16), Bucket(96, 192, 32)]
  state = setup.state
  for i in range(6):
    b, _ = batch(model.config, seed=i, rows=8, bucket=buckets[i % 2])
    state, _ = setup.step(state, place(b, mesh), KEY)
  assert setup.step._cache_size() == len(buckets)


def test_indivisible_dims_replicate_and_frozen_options():
  import os
  from coma_jax.model import ModelConfig, Qwen25VL
  from coma_jax.parallel.rules import head_units, state_shardings
  cfg = ModelConfig.from_json_file(os.path.join(os.path.dirname(__file__), '..', 'coma_jax', 'model', 'hf_configs',
                                                'qwen2_5_vl_7b.json'))
  abstract = nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0)))
  mesh = make_mesh((1, 1, 8))
  sh = state_shardings(nnx.state(abstract, nnx.Param), rules_dict(()), mesh, units=head_units(cfg))
  spec = lambda *path: sh[path[0]][path[1]][path[2]][path[3]]['kernel'].value.spec
  P = jax.sharding.PartitionSpec
  assert spec('decoder', 'layers', 'self_attn', 'k_proj') == P(None, None, None)  # 4 KV heads, tensor 8
  assert spec('decoder', 'layers', 'self_attn', 'q_proj') == P(None, None, None)  # 28 heads, tensor 8
  assert spec('decoder', 'layers', 'mlp', 'gate_proj') == P(None, None, 'tensor')  # 18944 = 8 x 2368
  assert spec('visual', 'blocks', 'mlp', 'gate_proj') == P(None, None, None)  # 3420 is not a multiple of 8
  # Frozen weights in bf16, replicated: no fp32 copy, no optimizer state, no sharding.
  model = nnx.eval_shape(fresh_model)
  setup = build_train_setup(model, make_mesh((2, 4, 1)), lambda g, tx: make_stage1_step(g, tx, Stage1StepConfig()),
                            rules=rules_dict(()), optim=OptimConfig(), trainable=TrainableConfig(),
                            frozen_dtype=jnp.bfloat16, frozen_replicated=True)
  frozen = jax.tree.leaves(setup.state.frozen)
  assert all(x.dtype == jnp.bfloat16 and x.sharding.spec == P() for x in frozen)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(setup.state.params))
  n_opt = sum(x.size for x in jax.tree.leaves(setup.state.opt_state))
  n_train = sum(x.size for x in jax.tree.leaves(setup.state.params))
  assert n_opt <= 2 * n_train + 8  # Adam moments of the trainable params only


def test_parameters_are_created_sharded():
  from coma_jax.training.sharded_setup import create_sharded
  from tests.tiny_models import hf_config
  from coma_jax.model import ModelConfig, Qwen25VL
  cfg = ModelConfig.from_hf_dict(hf_config('tied_gqa2_win56').to_dict())
  mesh = make_mesh((1, 2, 4))
  model = create_sharded(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0)), mesh, rules_dict(()))
  kernel = model.decoder.layers.mlp.gate_proj.kernel.value
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor')
  assert len({s.device for s in kernel.addressable_shards}) == 8


def test_activation_constraints_follow_the_rules():
  from coma_jax.parallel.activations import activation_sharding, constrain
  mesh = make_mesh((8, 1, 1))
  f = lambda x: constrain(x * 2, ('batch', None, 'activation_embed'))
  # A fresh function per trace: jit caches traces, and the rules are read at trace time.
  text = lambda fn, shape: jax.jit(lambda x: fn(x)).lower(jnp.zeros(shape)).as_text()
  assert 'sharding_constraint' not in text(f, (8, 4, 2)) and '@Sharding' not in text(f, (8, 4, 2))
  with activation_sharding(mesh, rules_dict(())):
    constrained = text(f, (8, 4, 2))
    indivisible = text(f, (6, 4, 2))  # 6 rows on 8 devices: left to XLA, not forced to replicate
  assert 'sharding_constraint' in constrained or '@Sharding' in constrained
  assert 'sharding_constraint' not in indivisible and '@Sharding' not in indivisible


def test_dropout_masks_follow_the_example_not_its_row():
  """Dropout keys derive from (seed, step, global example id): the same examples in another row
  order (another process split, a re-sharded resume) draw the same masks, so give the same loss."""
  from coma_jax.data.batching import collate
  from tests.stage1_batches import K
  model = fresh_model()
  _, examples = batch(model.config, rows=8)
  perm = np.array([3, 0, 7, 1, 6, 2, 5, 4])
  mesh = make_mesh((1, 1, 1), jax.devices()[:1])
  setup = build_train_setup(model, mesh, lambda g, tx: make_stage1_step(g, tx, Stage1StepConfig()),
                            rules=rules_dict(()), optim=OptimConfig(total_steps=10), trainable=TrainableConfig())
  fn = jax.jit(make_stage1_grads(setup.graphdef, Stage1StepConfig()))
  leaves, tree = jax.tree.flatten(setup.state.params)  # trained adapters (fresh ones are zero: dropout shows not)
  keys = jax.random.split(jax.random.key(5), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])

  def loss(rows, ids):
    b = collate([examples[i] for i in rows], model.config, Bucket(64, 128, 16), 1, K, sequence_ids=ids)
    return float(fn(params, setup.state.frozen, b, KEY)[0])

  in_order = loss(np.arange(8), np.arange(8))
  assert loss(perm, perm) == pytest.approx(in_order, rel=1e-6)
  assert abs(loss(perm, np.arange(8)) - in_order) > 1e-4  # keyed by row instead: other masks
