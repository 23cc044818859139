"""The stage-1 compression mask: decomposition == explicit mask, key/value substitution, and the
causal mode's loss equal to transformers' own loss."""
import jax
import numpy as np
import pytest
import torch

from coma_jax.training.stage1 import compact_labels, label_budget_fallbacks, stage1_loss_terms
from coma_jax.training.stage1_attention import paper_attend, reference_attend, stage1_attend
from tests.stage1_batches import batch, example
from tests.tiny_models import IMAGE, jax_twin, torch_model


@pytest.fixture(scope='module')
def models():
  tm = torch_model('tied_gqa2_win56', seed=3)
  return tm, jax_twin(tm), jax_twin(tm, scan_layers=False)


def test_decomposition_equals_the_explicit_mask(models):
  _, model, _ = models
  b, _ = batch(model.config)
  inputs = b['inputs']
  run = jax.jit(lambda inputs, roles, index, slot, segment: (
      model.hidden_states(inputs, paper_attend(inputs.segments, index, slot, segment)),
      model.hidden_states(inputs, reference_attend(roles, inputs.segments)),
      model.hidden_states(inputs)))
  paper, reference, causal = run(inputs, b['roles'], b['split_index'], b['split_slot'], b['split_segment'])
  valid = inputs.token_valid
  assert np.abs(np.asarray(paper - reference))[valid].max() <= 1e-5
  dialogue = b['roles'] == 3
  assert np.abs(np.asarray(paper - causal))[dialogue].max() > 1e-2  # the mask really bites
  prefix_and_c = (b['roles'] == 1) | (b['roles'] == 2)
  assert np.abs(np.asarray(paper - causal))[prefix_and_c].max() <= 1e-5


def test_key_value_substitution_makes_dialogue_logits_bit_identical(models):
  """Runs A and B differ only in their images. Copying A's keys and values at the compression
  positions into B, layer by layer, makes B's dialogue logits equal A's bit for bit: the
  dialogue sees the image only through the compression tokens."""
  _, _, model = models  # unrolled: the layer index reaches `attend` as a Python int
  rng = np.random.default_rng(7)
  a_ex = example(rng, 'a')
  b_ex = example(rng, 'b')
  b_ex.tokens, b_ex.roles, b_ex.labels = a_ex.tokens, a_ex.roles, a_ex.labels  # same text, other image
  ba, _ = batch(model.config, examples=[a_ex])
  bb, _ = batch(model.config, examples=[b_ex])
  comp = np.flatnonzero(ba['roles'][0] == 2)
  saved = {}

  def recording(inner):
    def attend(layer, q, k, v):
      saved[int(layer)] = (k[:, comp], v[:, comp])
      return inner(layer, q, k, v)
    return attend

  def substituting(inner):
    def attend(layer, q, k, v):
      ka, va = saved[int(layer)]
      return inner(layer, q, k.at[:, comp].set(ka), v.at[:, comp].set(va))
    return attend

  paper = lambda b: paper_attend(b['inputs'].segments, b['split_index'], b['split_slot'], b['split_segment'])
  ha = model.hidden_states(ba['inputs'], recording(paper(ba)))
  hb = model.hidden_states(bb['inputs'], substituting(paper(bb)))
  dialogue = ba['roles'][0] == 3
  la, lb = np.asarray(model.logits(ha))[0, dialogue], np.asarray(model.logits(hb))[0, dialogue]
  assert np.array_equal(la, lb)
  hb_plain = model.hidden_states(bb['inputs'], paper(bb))
  assert not np.array_equal(np.asarray(model.logits(hb_plain))[0, dialogue], la)  # the images do differ


def test_causal_mode_loss_equals_transformers(models):
  tm, model, _ = models
  b, examples = batch(model.config)
  inputs = b['inputs']
  hidden = model.hidden_states(inputs, stage1_attend('causal', b))
  numerator, denominator, _ = stage1_loss_terms(model, hidden, b, 'token_mean')
  ours = float(numerator / denominator)
  pixels = np.concatenate([img.patches() for e in examples for img in e.images])
  grids = np.array([g for e in examples for g in e.grids])
  ids = torch.as_tensor(np.asarray(inputs.input_ids, np.int64))
  with torch.no_grad():
    out = tm(input_ids=ids, attention_mask=torch.as_tensor(np.asarray(inputs.token_valid, np.int64)),
             pixel_values=torch.as_tensor(pixels), image_grid_thw=torch.as_tensor(grids),
             mm_token_type_ids=(ids == IMAGE).long(), labels=torch.as_tensor(b['labels'].astype(np.int64)))
  assert abs(ours - float(out.loss)) <= 1e-4, (ours, float(out.loss))
  # The reference normalisation (mean of per-example means) differs when examples differ in length.
  num_e, den_e, _ = stage1_loss_terms(model, hidden, b, 'example_mean')
  assert abs(float(num_e / den_e) - ours) > 1e-6


def test_a_label_budget_changes_nothing_but_the_cost(models):
  """The LM head on the real labels only (compacted to `label_budget` positions), or on every slot
  when a batch holds more than the budget: loss and gradients equal the every-slot loss."""
  _, model, _ = models
  b, _ = batch(model.config)
  hidden = model.hidden_states(b['inputs'], stage1_attend('paper', b))
  real = int((b['label_positions'] >= 0).sum())
  slots = b['label_positions'].size
  assert 0 < real < slots  # rows padded with empty label slots
  targets = np.where(b['label_positions'] >= 0, b['label_targets'], -1).reshape(-1)
  index, picked = compact_labels(jax.numpy.asarray(targets), real + 3)
  assert np.array_equal(np.asarray(index)[:real], np.flatnonzero(targets >= 0))
  assert np.array_equal(np.asarray(picked), np.r_[targets[targets >= 0], [-1] * 3])
  for normalisation in ('example_mean', 'token_mean'):
    def loss(h, budget):
      num, den, _ = stage1_loss_terms(model, h, b, normalisation, chunk=8, label_budget=budget)
      return num / den
    full, g_full = jax.value_and_grad(loss)(hidden, 0)
    for budget in (real, real + 5, real - 1):  # compacted (exactly full / spare slots), and the fallback
      value, g = jax.jit(jax.value_and_grad(loss), static_argnums=1)(hidden, budget)
      assert abs(float(value) - float(full)) <= 1e-6 * abs(float(full)), (normalisation, budget)
      assert np.abs(np.asarray(g - g_full)).max() <= 1e-6 * np.abs(np.asarray(g_full)).max()
  assert [int(label_budget_fallbacks(b, 1, n)) for n in (real - 1, real, 0)] == [1, 0, 0]
  per_row = (b['label_positions'] >= 0).sum(-1)  # two micro-batches: rows 0, 2, ... and 1, 3, ... (one group each)
  halves = [int(per_row[m::2].sum()) for m in (0, 1)]
  assert [int(label_budget_fallbacks(b, 2, n)) for n in (min(halves) - 1, max(halves) - 1, max(halves))] == [2, 1, 0]
