"""Packing changes nothing but the speed: packed and unpacked batches of the same examples give
equal stage-1 losses and gradients (both masks, both normalisations, dropout on), equal stage-2
embeddings, losses and GradCache gradients, and a packed example's neighbours never see it."""
import jax
import numpy as np
import pytest
from flax import nnx

from coma_jax.data.batching import Bucket, collate, collate_rows
from coma_jax.data.packing import PackedBucket, first_fit_decreasing, footprint
from coma_jax.data.step_batches import BatchSpec, step_batch
from coma_jax.model.lora import AdapterConfig, apply_adapters
from coma_jax.training.optim import TrainableConfig
from coma_jax.training.stage1 import Stage1StepConfig, make_stage1_grads
from coma_jax.training.stage1_attention import stage1_attend
from coma_jax.training.stage2 import SIDES, Stage2StepConfig, embed_side, make_stage2_grads, row_sets, scatter_reps
from tests import stage1_batches, stage2_batches
from tests.stage2_batches import by_example
from tests.tiny_models import jax_twin, torch_model

KEY = jax.random.key(3)
ROWS, SEQ_LEN, VISION, LABELS, PER_ROW = 4, 160, 192, 48, 4


def trained_model(**kw):
  """Adapters with non-zero weights (fresh ones are zero: dropout would not show) at dropout 0.1."""
  model = jax_twin(torch_model('tied_gqa2_win56', seed=5), **kw)
  apply_adapters(model, AdapterConfig(rank=4, alpha=16, dropout=0.1), nnx.Rngs(0))
  graphdef, params, frozen = nnx.split(model, TrainableConfig().filter(), ...)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  return graphdef, params, frozen


@pytest.fixture(scope='module')
def model():
  return trained_model()


def stage1_examples(cfg, n=8, seed=0):
  rng = np.random.default_rng(seed)
  return [stage1_batches.example(rng, f'e{i}', grid_hw=[(8, 8), (6, 8), (4, 4)][i % 3], dialogue=8 + 3 * (i % 4))
          for i in range(n)]


def packed_rows(examples, cfg, ids, label_slots=LABELS):
  rows = first_fit_decreasing([footprint(e, cfg) for e in examples], ids, seq_len=SEQ_LEN, vision_slots=VISION,
                              label_slots=label_slots, max_per_row=PER_ROW)
  assert len(rows) <= ROWS and max(len(r) for r in rows) >= 3  # really packed: 3+ examples share a row
  return rows + [[] for _ in range(ROWS - len(rows))]


def stage1_pair(cfg, examples, ids):
  unpacked = collate(examples, cfg, Bucket(64, 128, 16), 1, stage1_batches.K, sequence_ids=ids)
  packed = collate_rows(examples, packed_rows(examples, cfg, ids), cfg, seq_len=SEQ_LEN, vision_slots=VISION,
                        label_slots=LABELS, rows_per_group=1, num_compression_tokens=stage1_batches.K,
                        sequence_ids=ids, rep_index=list(range(len(examples))), slots_per_row=PER_ROW)
  return unpacked, packed


def rel(a, b):
  num = sum(float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  den = sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in jax.tree.leaves(b))
  return (num / den) ** 0.5


@pytest.mark.parametrize('mask', ['paper', 'causal'])
def test_stage1_packed_equals_unpacked(model, mask):
  graphdef, params, frozen = model
  cfg = nnx.merge(graphdef, params, frozen).config
  examples = stage1_examples(cfg)
  ids = [11, 5, 42, 7, 3, 19, 23, 2]  # global example ids: dropout keys
  unpacked, packed = stage1_pair(cfg, examples, ids)

  def both(batch):
    return [make_stage1_grads(graphdef, Stage1StepConfig(mask=mask, normalisation=n, micro_batches=m))(
        params, frozen, batch, KEY) for n, m in (('example_mean', 2), ('token_mean', 1))]
  got = {name: jax.jit(both)(b) for name, b in (('unpacked', unpacked), ('packed', packed))}
  for (loss_u, tokens_u, g_u), (loss_p, tokens_p, g_p) in zip(got['unpacked'], got['packed']):
    assert int(tokens_u) == int(tokens_p) > 0
    assert abs(float(loss_p) - float(loss_u)) <= 1e-5 * abs(float(loss_u))
    assert rel(g_p, g_u) <= 1e-5
  # Dropout is on: another key gives another loss, so the masks really matched above.
  other = jax.jit(lambda b: make_stage1_grads(graphdef, Stage1StepConfig(mask=mask))(params, frozen, b,
                                                                                  jax.random.key(9))[0])(packed)
  assert abs(float(other) - float(got['packed'][0][0])) > 1e-4


def test_packing_needs_its_segments_and_positions(model):
  """Negative controls: the packed batch with one segment per row, or positions that run on across
  examples (no M-RoPE restart), gives another loss."""
  graphdef, params, frozen = model
  cfg = nnx.merge(graphdef, params, frozen).config
  examples = stage1_examples(cfg)
  _, packed = stage1_pair(cfg, examples, list(range(8)))
  inputs = packed['inputs']
  loss = jax.jit(lambda b: make_stage1_grads(graphdef, Stage1StepConfig(mask='causal'))(params, frozen, b, KEY)[0])
  good = float(loss(packed))
  one_segment = dict(packed, inputs=inputs.replace(segment_ids=inputs.token_valid.astype(np.int32)))
  running = np.where(inputs.token_valid, np.cumsum(inputs.token_valid, axis=1) - 1, 0)
  no_restart = dict(packed, inputs=inputs.replace(positions=np.broadcast_to(running, inputs.positions.shape)))
  for wrong in (one_segment, no_restart):
    assert abs(float(loss(wrong)) - good) > 1e-3


def test_a_packed_neighbour_never_sees_another_example(model):
  """Changing one example's image changes its own hidden states and none of its row neighbours',
  bit for bit (paper mask; XLA and blockwise attention)."""
  graphdef, params, frozen = model
  m = nnx.merge(graphdef, params, frozen)
  examples = stage1_examples(m.config)
  ids = list(range(8))
  rows = packed_rows(examples, m.config, ids)
  row = next(r for r in rows if len(r) >= 3)
  changed = list(examples)
  target = row[1]
  rng = np.random.default_rng(99)
  changed[target] = stage1_batches.example(rng, 'changed', grid_hw=examples[target].grids[0][1:],
                                           prefix_text=0, dialogue=0)
  changed[target].tokens, changed[target].roles, changed[target].labels = (
      examples[target].tokens, examples[target].roles, examples[target].labels)  # same text, other image
  build = lambda exs: collate_rows(exs, rows, m.config, seq_len=SEQ_LEN, vision_slots=VISION, label_slots=LABELS,
                                   rows_per_group=1, num_compression_tokens=stage1_batches.K, sequence_ids=ids,
                                   rep_index=ids, slots_per_row=PER_ROW)
  r = rows.index(row)
  for impl in ('xla', 'blockwise'):
    hidden = jax.jit(lambda b: m.hidden_states(b['inputs'], stage1_attend('paper', b, impl)))
    a, b = np.asarray(hidden(build(examples))[r]), np.asarray(hidden(build(changed))[r])
    segments = np.asarray(build(examples)['inputs'].segment_ids[r])
    own = segments == row.index(target) + 1
    neighbours = (segments > 0) & ~own
    assert neighbours.sum() > 0 and np.array_equal(a[neighbours], b[neighbours]), impl
    assert np.abs(a[own] - b[own]).max() > 1e-3, impl  # the image did change the example itself


def stage2_examples(cfg, n=8, seed=0):
  rng = np.random.default_rng(seed)
  sides = {s: [stage2_batches.side(rng, f'{s}{i}', image=(i + len(s)) % 2 == 0, text_len=int(rng.integers(3, 12)))
               for i in range(n)] for s in SIDES}
  sides['negative'][5] = None  # an example without a hard negative
  return by_example(sides)


def test_stage2_packed_equals_unpacked(model):
  graphdef, params, frozen = model
  cfg = nnx.merge(graphdef, params, frozen).config
  examples = stage2_examples(cfg)
  ids = [11, 5, 42, 7, 3, 19, 23, 2]
  k = stage2_batches.K
  unpacked = step_batch(BatchSpec(cfg, [Bucket(48, 128, 0)], 1, k, sides=SIDES), examples, ids)[0]
  spec = BatchSpec(cfg, None, 1, k, sides=SIDES, packed_buckets=[PackedBucket(8, 96, 256)], max_per_row=PER_ROW)
  packed, bucket, stats = step_batch(spec, examples, ids)
  assert packed['packed']['inputs'].input_ids.shape == (8, 96) and stats['token_padding_waste'] < 0.5
  assert (packed['packed']['rep_index'] >= 0).sum(axis=1).max() >= 3  # sides of several examples share rows

  def embeddings(batch):
    m = nnx.merge(graphdef, params, frozen)
    return scatter_reps([(embed_side(m, batch[name], None), batch[name]['rep_index']) for name in row_sets(batch)], 8)
  (eu, vu), (ep, vp) = jax.jit(embeddings)(unpacked), jax.jit(embeddings)(packed)
  assert np.array_equal(vu, vp) and vu.sum() == 23
  assert np.abs(np.asarray(ep) - np.asarray(eu))[np.asarray(vu)].max() <= 1e-5

  cfg2 = Stage2StepConfig(hard_negatives=True, bidirectional=True, chunks=2)
  fn = jax.jit(make_stage2_grads(graphdef, cfg2))
  (loss_u, g_u), (loss_p, g_p) = fn(params, frozen, unpacked, KEY), fn(params, frozen, packed, KEY)
  assert abs(float(loss_p) - float(loss_u)) <= 1e-5 * abs(float(loss_u))
  assert rel(g_p, g_u) <= 1e-5
  loss_other, _ = fn(params, frozen, packed, jax.random.key(9))  # dropout is on: the masks matched
  assert abs(float(loss_other) - float(loss_p)) > 1e-4
