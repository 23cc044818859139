"""The attention implementations: blockwise (and splash in interpret mode) equal the XLA reference,
forward and gradients, on every call kind the model makes; `auto` picks by backend and shape;
a blockwise train step's memory grows linearly with the length."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coma_jax.model import attention_blockwise
from coma_jax.model.attention import attention, choose_implementation
from coma_jax.model.attention_kernels import _prefix_lengths, packed_runs

TOL = 1e-5


def _qkv(rng, b, t, s, n, kv, d):
  f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return f(b, t, n, d), f(b, s, kv, d), f(b, s, kv, d), f(b, t, n, d)


def _segments(*rows):
  return jnp.asarray(np.stack([np.concatenate([np.full(n, sid) for sid, n in row]) for row in rows]), jnp.int32)


# Each call kind the model makes, as (q/k/v shapes, q and kv segment ids, causal):
CALLS = {
    # The LLM: causal over valid tokens (1), right and left padding (0).
    'text': ((2, 70, 70, 4, 2, 16), _segments([(1, 50), (0, 20)], [(0, 9), (1, 61)]), True),
    # Stage-1 call 2: the gathered [compression + dialogue] tail, valid first.
    'stage1_dialogue_tail': ((2, 40, 40, 6, 3, 8), _segments([(1, 33), (0, 7)], [(1, 12), (0, 28)]), True),
    # Vision windows: 64-slot windows as rows, partial edge windows padded with empty slots (0).
    'vision_window': ((6, 64, 64, 2, 2, 16), _segments(*[[(w, 40), (0, 24)] for w in range(1, 7)]), False),
    # Vision full attention: several frames in one row, block-diagonal by frame, empty slots last.
    'vision_full': ((2, 96, 96, 2, 2, 16), _segments([(1, 32), (2, 48), (0, 16)], [(1, 64), (2, 16), (0, 16)]), False),
    # Packed LLM rows: several examples per row (blockwise skips the tiles between them).
    'packed_text': ((2, 70, 70, 4, 2, 16), _segments([(1, 20), (2, 30), (3, 15), (0, 5)], [(1, 40), (2, 30)]), True),
}


def _check_equal(impl_fn, shapes, seg, causal, kv_seg=None):
  rng = np.random.default_rng(0)
  q, k, v, w = _qkv(rng, *shapes)
  kv_seg = seg if kv_seg is None else kv_seg

  def loss(fn):
    return lambda q, k, v: (fn(q, k, v) * w).sum()
  ref = lambda q, k, v: attention(q, k, v, q_segment_ids=seg, kv_segment_ids=kv_seg, causal=causal, impl='xla')
  ours = lambda q, k, v: impl_fn(q, k, v, seg, kv_seg, causal)
  out_ref, out = jax.jit(ref)(q, k, v), jax.jit(ours)(q, k, v)
  assert np.isfinite(np.asarray(out)).all()
  assert np.abs(np.asarray(out - out_ref)).max() <= TOL
  g_ref = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(q, k, v)
  g = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g, g_ref):
    assert np.isfinite(np.asarray(a)).all()
    assert np.abs(np.asarray(a - b)).max() <= TOL * max(1.0, float(np.abs(np.asarray(b)).max()))
  return out


def _blockwise(block):
  return lambda q, k, v, qs, ks, causal: attention_blockwise.blockwise_attention(q, k, v, qs, ks, causal=causal,
                                                                              block=block)


@pytest.mark.parametrize('call', list(CALLS))
@pytest.mark.parametrize('block', [16, 24])  # 24: the last block is partial (padded)
def test_blockwise_equals_xla(call, block):
  shapes, seg, causal = CALLS[call]
  _check_equal(_blockwise(block), shapes, seg, causal)


def test_blockwise_visits_only_tiles_with_a_visible_pair():
  packed = _segments([(1, 64), (2, 64), (3, 64), (4, 64)])
  one = _segments([(1, 256)])
  tiles = lambda seg, causal: int(np.asarray(np.subtract(*attention_blockwise.block_ranges(
      seg, seg, 32, 32, causal)[1::-1])).sum())
  assert tiles(one, False) == 64 and tiles(one, True) == 36  # all; the causal triangle
  assert tiles(packed, True) == 12 and tiles(packed, False) == 16  # each example's own 2 x 2 blocks
  lo, hi, q_lo, q_hi = (np.asarray(x) for x in attention_blockwise.block_ranges(packed, packed, 32, 32, True))
  assert lo.tolist() == [0, 0, 2, 2, 4, 4, 6, 6] and hi.tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
  assert q_lo.tolist() == [0, 1, 2, 3, 4, 5, 6, 7] and q_hi.tolist() == [2, 2, 4, 4, 6, 6, 8, 8]


def test_a_query_row_that_sees_no_key_gives_zeros_not_nan():
  q_seg = _segments([(1, 20), (5, 12)])  # segment 5 has no key
  kv_seg = _segments([(1, 32)])
  for impl_fn in (_blockwise(8), lambda q, k, v, qs, ks, c: attention(q, k, v, q_segment_ids=qs, kv_segment_ids=ks,
                                                                      causal=c, impl='xla')):
    out = _check_equal(impl_fn, (1, 32, 32, 2, 1, 8), q_seg, False, kv_seg=kv_seg)
    assert np.abs(np.asarray(out[0, 20:])).max() == 0


def test_splash_in_interpret_mode_equals_xla():
  from coma_jax.model.attention_kernels import splash_attention
  fn = lambda q, k, v, qs, ks, causal: splash_attention(q, k, v, qs, ks, causal=causal, interpret=True)
  # Causal with GQA and padding (lengths not a multiple of its 128-block), and segment-masked.
  _check_equal(fn, (1, 150, 150, 2, 1, 16), _segments([(1, 120), (0, 30)]), True)
  _check_equal(fn, (1, 130, 130, 2, 2, 16), _segments([(1, 50), (2, 70), (0, 10)]), False)


def test_splash_pads_to_a_block_it_accepts():
  from coma_jax.model.attention_kernels import splash_attention
  fn = lambda q, k, v, qs, ks, causal: splash_attention(q, k, v, qs, ks, causal=causal, interpret=True)
  _check_equal(fn, (1, 600, 600, 1, 1, 8), _segments([(1, 590), (0, 10)]), True)  # pads to 640: 128-blocks


@pytest.mark.parametrize('layout', ['right_padded', 'left_padded', 'two_frames'])
def test_cudnn_path_with_the_kernel_emulated(monkeypatch, layout):
  """cudnn_attention's own logic on CPU, with cuDNN swapped for JAX's XLA implementation of the
  same call: lengths from segment ids, the blockwise fallback for other layouts, padding rows
  zeroed by the fused branch only (which tells the branches apart)."""
  from coma_jax.model import attention_kernels
  from coma_jax.model.attention_kernels import cudnn_attention
  monkeypatch.setattr(attention_kernels, 'packed_cudnn_call', lambda: None)  # the packed branch: its own test
  real = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, 'dot_product_attention',
                      lambda *a, implementation=None, **kw: real(*a, implementation='xla', **kw))
  seg, causal = {'right_padded': (_segments([(1, 50), (0, 14)], [(1, 64)]), True),
                 'left_padded': (_segments([(0, 10), (1, 54)], [(1, 64)]), True),
                 'two_frames': (_segments([(1, 30), (2, 30), (0, 4)], [(1, 64)]), False)}[layout]
  rng = np.random.default_rng(0)
  q, k, v, w = _qkv(rng, 2, 64, 64, 4, 2, 16)
  valid = np.asarray(seg != 0)
  w = w * valid[:, :, None, None]  # the loss reads real rows only, as the model's does
  ours = lambda q, k, v: cudnn_attention(q, k, v, seg, seg, causal=causal)
  ref = lambda q, k, v: attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=causal, impl='xla')
  out, out_ref = jax.jit(ours)(q, k, v), jax.jit(ref)(q, k, v)
  assert np.abs(np.asarray(out - out_ref))[valid].max() <= TOL
  fused = layout == 'right_padded'
  assert (np.abs(np.asarray(out))[~valid].max() == 0) == fused
  loss = lambda fn: lambda q, k, v: (fn(q, k, v) * w).sum()
  grads = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v)
  grads_ref = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(grads, grads_ref):
    assert np.abs(np.asarray(a - b)).max() <= TOL * max(1.0, float(np.abs(np.asarray(b)).max()))


class _EmulatedPackedCudnn:
  """JAX's packed cuDNN call, emulated on CPU: segments rebuilt from offsets and lengths, then
  XLA attention (tests what cudnn_attention hands the kernel, not cuDNN itself)."""
  from enum import Enum
  MaskType = Enum('MaskType', 'NO_MASK CAUSAL')

  @staticmethod
  def dot_product_attention(q, k, v, bias, mask, q_len, kv_len, q_off, kv_off, *, scale, mask_type):
    pos = jnp.arange(q.shape[1])[None, :, None]
    inside = (pos >= q_off[:, None, :-1]) & (pos < q_off[:, None, :-1] + q_len[:, None, :]) & (q_off[:, None, :-1] >= 0)
    seg = (inside * jnp.arange(1, q_len.shape[1] + 1)[None, None]).sum(-1)
    return attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, impl='xla',
                     causal=mask_type == _EmulatedPackedCudnn.MaskType.CAUSAL)


@pytest.mark.parametrize('layout', ['packed_causal', 'packed_full', 'out_of_order'])
def test_packed_cudnn_path_with_the_kernel_emulated(monkeypatch, layout):
  """Packed rows (several segments) reach cuDNN's packed layout with the right offsets and lengths;
  a layout it cannot take (segments out of order) goes to the blockwise fallback."""
  from coma_jax.model import attention_kernels
  monkeypatch.setattr(attention_kernels, 'PACKED_CUDNN', True)
  monkeypatch.setattr(attention_kernels, 'packed_cudnn_call', lambda: _EmulatedPackedCudnn)
  real = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, 'dot_product_attention',
                      lambda *a, implementation=None, **kw: real(*a, implementation='xla', **kw))
  seg, causal = {'packed_causal': (_segments([(1, 20), (2, 30), (3, 10), (0, 4)], [(1, 64)]), True),
                 'packed_full': (_segments([(1, 7), (2, 41), (0, 16)], [(1, 33), (2, 31)]), False),
                 'out_of_order': (_segments([(2, 20), (1, 44)], [(1, 64)]), True)}[layout]
  rng = np.random.default_rng(1)
  q, k, v, w = _qkv(rng, 2, 64, 64, 4, 2, 16)
  valid = np.asarray(seg != 0)
  w = w * valid[:, :, None, None]
  ours = lambda q, k, v: attention_kernels.cudnn_attention(q, k, v, seg, seg, causal=causal)
  ref = lambda q, k, v: attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=causal, impl='xla')
  out, out_ref = jax.jit(ours)(q, k, v), jax.jit(ref)(q, k, v)
  assert np.abs(np.asarray(out - out_ref))[valid].max() <= TOL
  if layout != 'out_of_order':  # the packed branch ran: it zeroes padding rows, the fallback does not
    assert np.abs(np.asarray(out))[~valid].max() == 0
  offsets, lengths, ok = packed_runs(seg)
  assert np.asarray(ok).tolist() == [layout != 'out_of_order', True]
  loss = lambda fn: lambda q, k, v: (fn(q, k, v) * w).sum()
  grads = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v)
  grads_ref = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(grads, grads_ref):
    assert np.abs(np.asarray(a - b)).max() <= TOL * max(1.0, float(np.abs(np.asarray(b)).max()))


def test_packed_runs_give_offsets_and_lengths():
  seg = _segments([(1, 3), (2, 2), (0, 3)], [(0, 8)], [(1, 2), (0, 1), (1, 5)], [(1, 2), (3, 6)],
                  [(1, 1), (2, 1), (3, 1), (4, 5)])
  offsets, lengths, ok = packed_runs(seg, max_segments=3)
  assert np.asarray(ok).tolist() == [True, True, False, False, False]  # a gap; a skipped id; 4 > 3 segments
  assert np.asarray(offsets[0]).tolist() == [0, 3, -1, -1] and np.asarray(lengths[0]).tolist() == [3, 2, -1]
  assert np.asarray(offsets[1]).tolist() == [0, -1, -1, -1] and np.asarray(lengths[1]).tolist() == [8, -1, -1]


def test_prefix_lengths_accept_only_one_segment_then_padding():
  seg = _segments([(1, 5), (0, 3)], [(0, 8)], [(0, 2), (1, 6)], [(1, 3), (2, 5)], [(3, 8)])
  length, ok = _prefix_lengths(seg)
  assert np.asarray(length).tolist() == [5, 8, 8, 8, 8]
  assert np.asarray(ok).tolist() == [True, True, False, False, True]


def test_auto_picks_by_backend_dtype_and_shape(caplog):
  big = jnp.zeros((1, 2048, 4, 64), jnp.bfloat16)
  window = jnp.zeros((1, 64, 4, 64), jnp.bfloat16)
  assert choose_implementation('auto', big, big, 'gpu') == 'cudnn'
  assert choose_implementation('auto', big.astype(jnp.float32), big, 'gpu') == 'blockwise'
  assert choose_implementation('auto', big, big, 'tpu') == 'splash'
  assert choose_implementation('auto', big, big, 'cpu') == 'blockwise'
  for backend in ('gpu', 'tpu', 'cpu'):
    assert choose_implementation('auto', window, window, backend) == 'xla'
  assert choose_implementation('blockwise', window, window, 'gpu') == 'blockwise'
  assert choose_implementation('cudnn', big, big, 'gpu') == 'cudnn'
  assert choose_implementation('cudnn', big.astype(jnp.float32), big, 'gpu') == 'blockwise'  # bf16/fp16 only
  with pytest.raises(ValueError, match='needs a TPU'):
    choose_implementation('splash', big, big, 'gpu')
  with pytest.raises(ValueError, match='needs a GPU'):
    attention(big, big, big, impl='cudnn')  # not silently something else on this CPU
  with pytest.raises(ValueError, match='flash'):
    choose_implementation('flash', big, big)
  with caplog.at_level(logging.INFO, logger='coma_jax.attention'):
    x = jnp.zeros((1, 1024, 2, 8))
    jax.eval_shape(lambda x: attention(x, x, x, causal=True, impl='auto', call='probe_call'), x)
  assert 'attention probe_call: auto -> blockwise' in caplog.text


def _step_temp_bytes(impl: str, length: int) -> int:
  """Compiled temp memory of a gradient step of a small text-only LLM at `length` tokens."""
  from flax import nnx
  from coma_jax.model.config import ModelConfig
  from coma_jax.model.inputs import build_model_inputs
  from coma_jax.model.qwen2_5_vl import Qwen25VL
  from tests.tiny_models import hf_config
  cfg = ModelConfig.from_hf_dict(hf_config('tied_gqa2_win56').to_dict())
  model = nnx.eval_shape(lambda: Qwen25VL(cfg, attention_impl=impl, remat='full', rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model)
  inputs = build_model_inputs(cfg, np.ones((1, length), np.int32))

  def loss(params, inputs):
    return nnx.merge(graphdef, params).hidden_states(inputs).astype(jnp.float32).mean()
  compiled = jax.jit(jax.grad(loss)).lower(params, inputs).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_step_memory_grows_linearly_with_length():
  short, long = _step_temp_bytes('blockwise', 1024), _step_temp_bytes('blockwise', 4096)
  assert long / short <= 5, (short, long)
  # The control: the XLA path's (L x L) scores make the same step grow far faster.
  xla_short, xla_long = _step_temp_bytes('xla', 1024), _step_temp_bytes('xla', 4096)
  assert xla_long / xla_short > 8, (xla_short, xla_long)


def test_stage1_step_with_blockwise_attention_everywhere_equals_xla(monkeypatch):
  """The whole stage-1 gradient (vision windows and full attention, both paper-mask calls) with
  blockwise attention in 16-blocks equals the XLA path, on one device and on a (2, 2, 2) mesh."""
  from tests.test_train_step import grads_on, max_rel
  from tests.stage1_batches import batch
  from tests.test_train_step import fresh_model
  from coma_jax.training.stage1 import Stage1StepConfig
  monkeypatch.setattr(attention_blockwise, 'DEFAULT_BLOCK', 16)
  b, _ = batch(fresh_model().config, rows=8)
  loss_ref, grads_ref, _ = grads_on((1, 1, 1), b, Stage1StepConfig(attention_impl='xla'), attention_impl='xla')
  for mesh in [(1, 1, 1), (2, 2, 2)]:
    loss, grads, _ = grads_on(mesh, b, Stage1StepConfig(attention_impl='blockwise'), attention_impl='blockwise')
    assert abs(loss - loss_ref) <= 1e-5 * abs(loss_ref)
    assert max_rel(grads, grads_ref) <= 1e-5


@pytest.mark.parametrize('queries', [1, 5])
def test_queries_after_a_cache_see_the_keys_up_to_their_offset(monkeypatch, queries):
  """`q_offset`: T queries at key positions offset[b] + t (per row) equal those rows of causal
  attention over the whole sequence, under xla, blockwise (forward and gradients) and the cuDNN
  dispatch (its kernel emulated on CPU; one query = a bound on the keys); later keys are ignored."""
  from coma_jax.model import attention_kernels
  rng = np.random.default_rng(3)
  b, s, n, kv, d = 3, 40, 4, 2, 16
  q_all, k, v, _ = _qkv(rng, b, s, s, n, kv, d)
  offset = jnp.asarray([0, 17, 40 - queries], jnp.int32)
  rows = offset[:, None] + jnp.arange(queries)[None]
  q = jnp.take_along_axis(q_all, rows[:, :, None, None], axis=1)
  ones = jnp.ones((b, s), jnp.int32)
  full = attention(q_all, k, v, q_segment_ids=ones, kv_segment_ids=ones, causal=True, impl='xla')
  expected = np.asarray(jnp.take_along_axis(full, rows[:, :, None, None], axis=1))
  # garbage past each row's last query must not matter (an unwritten cache)
  k_dirty = jnp.where((jnp.arange(s)[None] > rows[:, -1:])[:, :, None, None], 1e3, k)
  call = lambda impl: lambda q, k, v: attention(q, k, v, q_segment_ids=jnp.ones((b, queries), jnp.int32),
                                                kv_segment_ids=ones, causal=True, q_offset=offset, impl=impl)
  for impl in ('xla', 'blockwise'):
    assert np.abs(np.asarray(jax.jit(call(impl))(q, k_dirty, v)) - expected).max() <= TOL, impl
  g_ref, g = (jax.grad(lambda q, k, v: (call(impl)(q, k, v) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
              for impl in ('xla', 'blockwise'))
  for a, c in zip(g, g_ref):
    assert np.abs(np.asarray(a - c)).max() <= TOL * max(1.0, float(np.abs(np.asarray(c)).max()))
  monkeypatch.setattr(attention_kernels, 'packed_cudnn_call', lambda: None)
  real = jax.nn.dot_product_attention
  kernel_calls = []
  def emulated(*a, implementation=None, **kw):
    kernel_calls.append(kw)
    return real(*a, implementation='xla', **kw)
  monkeypatch.setattr(jax.nn, 'dot_product_attention', emulated)
  monkeypatch.setattr('coma_jax.model.attention.choose_implementation', lambda impl, q, k, backend=None: 'cudnn')
  out = jax.jit(call('cudnn'))(q.astype(jnp.bfloat16), k_dirty.astype(jnp.bfloat16), v.astype(jnp.bfloat16))
  assert np.abs(np.asarray(out, np.float32) - expected).max() <= 0.05
  assert bool(kernel_calls) == (queries == 1)  # one query: the kernel; a chunk: blockwise
