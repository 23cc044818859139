"""LoRA/DoRA on the hook points against peft (outputs and gradients), dropout, and merging."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import LoraConfig, get_peft_model

from coma_jax.model.layers import Linear
from coma_jax.model.lora import (AdapterConfig, AdapterLinear, AdapterParam, DropoutContext, _hook_salt,
                                 apply_adapters, merge_adapters)
from coma_jax.training.stage1 import stage1_loss_terms
from tests.stage1_batches import batch
from tests.tiny_models import IMAGE, jax_twin, torch_model

TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj']


def peft_and_ours(dora: bool):
  tm = torch_model('untied_gqa3_win112', seed=5)
  ours = jax_twin(tm)
  peft_model = get_peft_model(tm, LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, use_dora=dora,
                                             target_modules=TARGETS))
  torch.manual_seed(1)
  with torch.no_grad():  # move every adapter away from its identity init
    for name, p in peft_model.named_parameters():
      if 'lora_B' in name:
        p.copy_(0.2 * torch.randn_like(p))
      elif 'lora_magnitude_vector' in name:
        p.mul_(1 + 0.1 * torch.randn_like(p))
  apply_adapters(ours, AdapterConfig(rank=4, alpha=16, dropout=0.0, dora=dora,
                                     targets=tuple(f'text.{t}' for t in TARGETS)), nnx.Rngs(0))
  named = dict(peft_model.named_parameters())
  for t in TARGETS:
    adapter = getattr(ours.decoder.layers.self_attn, t)
    prefix = lambda i: f'base_model.model.model.language_model.layers.{i}.self_attn.{t}'
    layers = range(ours.config.text.num_hidden_layers)
    adapter.lora_a.value = jnp.stack([jnp.asarray(named[f'{prefix(i)}.lora_A.default.weight'].detach().numpy().T) for i in layers])
    adapter.lora_b.value = jnp.stack([jnp.asarray(named[f'{prefix(i)}.lora_B.default.weight'].detach().numpy().T) for i in layers])
    if dora:
      adapter.magnitude.value = jnp.stack([jnp.asarray(
          named[f'{prefix(i)}.lora_magnitude_vector.default.weight'].detach().numpy()) for i in layers])
  return peft_model, ours, named


@pytest.mark.parametrize('dora', [True, False])
def test_outputs_and_gradients_equal_peft(dora):
  peft_model, ours, named = peft_and_ours(dora)
  peft_model.train()
  b, examples = batch(ours.config, rows=4)
  inputs = b['inputs']
  ids = torch.as_tensor(np.asarray(inputs.input_ids, np.int64))
  pixels = np.concatenate([img.patches() for e in examples for img in e.images])
  out = peft_model(input_ids=ids, attention_mask=torch.as_tensor(np.asarray(inputs.token_valid, np.int64)),
                   pixel_values=torch.as_tensor(pixels),
                   image_grid_thw=torch.as_tensor(np.array([g for e in examples for g in e.grids])),
                   mm_token_type_ids=(ids == IMAGE).long(), labels=torch.as_tensor(b['labels'].astype(np.int64)))
  out.loss.backward()

  graphdef, adapters, rest = nnx.split(ours, AdapterParam, ...)

  def loss(adapters):
    model = nnx.merge(graphdef, adapters, rest)
    hidden = model.hidden_states(inputs)
    num, den, _ = stage1_loss_terms(model, hidden, b, 'token_mean')
    return num / den, model.logits(hidden)

  (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(adapters)
  valid = np.asarray(inputs.token_valid)
  assert np.abs(np.asarray(logits)[valid] - out.logits.detach().numpy()[valid]).max() <= 1e-4
  assert abs(float(value) - out.loss.item()) <= 1e-5
  layers = range(ours.config.text.num_hidden_layers)
  for t in TARGETS:
    g = grads['decoder']['layers']['self_attn'][t]
    prefix = lambda i: f'base_model.model.model.language_model.layers.{i}.self_attn.{t}'
    pairs = [(g['lora_a'], lambda i: named[f'{prefix(i)}.lora_A.default.weight'].grad.numpy().T),
             (g['lora_b'], lambda i: named[f'{prefix(i)}.lora_B.default.weight'].grad.numpy().T)]
    if dora:
      pairs.append((g['magnitude'], lambda i: named[f'{prefix(i)}.lora_magnitude_vector.default.weight'].grad.numpy()))
    for ours_grad, theirs in pairs:
      ref = np.stack([theirs(i) for i in layers])
      err = np.abs(np.asarray(ours_grad[...]) - ref).max() / (np.abs(ref).max() + 1e-12)
      assert err <= 1e-4, (t, err)


def test_merging_gives_the_same_outputs():
  _, ours, _ = peft_and_ours(dora=True)
  b, _ = batch(ours.config, rows=2)
  before = np.asarray(ours(b['inputs']))
  assert merge_adapters(ours) == 4
  assert not [m for _, m in ours.iter_modules() if isinstance(m, AdapterLinear)]
  after = np.asarray(ours(b['inputs']))
  valid = np.asarray(b['inputs'].token_valid)
  assert np.abs(before - after)[valid].max() <= 1e-5


def test_dropout_is_per_token_and_only_on_the_adapter_path():
  base = Linear(6, 5, axes=('embed', 'mlp'), hook='text.q_proj', use_bias=True, rngs=nnx.Rngs(0))
  adapter = AdapterLinear(base, AdapterConfig(rank=2, alpha=4, dropout=0.5, dora=True), nnx.Rngs(1))
  adapter.lora_b.value = jax.random.normal(jax.random.key(2), adapter.lora_b.shape)
  x = jax.random.normal(jax.random.key(3), (3, 4, 6))
  rows = lambda ids, length: DropoutContext.for_tokens(jax.random.key(4), jnp.repeat(ids[:, None], length, 1),
                                                      jnp.broadcast_to(jnp.arange(length), (len(ids), length)))
  keys = rows(jnp.arange(3), 4)  # row b holds sequence b from offset 0
  y = adapter(x, keys)
  # Row 1 alone, with its own key, gives the same output: masks do not depend on the batch.
  np.testing.assert_allclose(adapter(x[1:2], DropoutContext(keys.keys[1:2]))[0], y[1], rtol=1e-5, atol=1e-6)
  # Row 2's tokens 1..3 moved to offsets 0..2 of another row (as packing places them) with the
  # same (sequence id, offset) keys draw the same masks.
  moved = DropoutContext.for_tokens(jax.random.key(4), jnp.full((1, 3), 2), jnp.arange(1, 4)[None])
  np.testing.assert_allclose(adapter(x[2:3, 1:], moved)[0], y[2, 1:], rtol=1e-5, atol=1e-6)
  assert not np.allclose(adapter(x[2:3, 1:], rows(jnp.array([2]), 3))[0],
                         y[2, 1:], atol=1e-3)  # other offsets: other masks
  # peft's formula, with the mask the adapter draws for this hook.
  w, bias = base.kernel[...], base.bias[...]
  a, bb, m = adapter.lora_a[...], adapter.lora_b[...], adapter.magnitude[...]
  salt = _hook_salt('text.q_proj')
  mask = jax.vmap(jax.vmap(lambda k, xt: jax.random.bernoulli(jax.random.fold_in(k, salt), 0.5, xt.shape)))(keys.keys, x)
  xd = jnp.where(mask, x / 0.5, 0)
  norm = jnp.linalg.norm(w + 2.0 * a @ bb, axis=0)
  expected = x @ w + bias + (m / norm - 1) * (xd @ w) + (m / norm) * 2.0 * (xd @ a @ bb)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(adapter(x), (m / norm) * (x @ w + 2.0 * x @ a @ bb) + bias, rtol=1e-5, atol=1e-5)
