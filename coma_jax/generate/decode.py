"""KV-cache decoding on the ported Qwen2.5-VL: one prefill call, then a jitted decode loop.

Static shapes: a batch of B right-padded prompts in a P-token bucket (with its vision arrays, as
the model takes them), a fixed `max_new_tokens` N and a cache of (layers, B, P + N, KV heads,
head dim). Row b's prompt fills cache slots [0, P_b); its j-th new token goes to slot P_b + j,
over the prompt's padding, so each row's cache stays contiguous. The decode loop is a
`lax.while_loop` that stops once every row has met an end-of-sequence token or its own limit.

The layers are the model's own (`DecoderLayer`, adapters included): their attention callback
writes the new keys and values into the layer's cache slice and attends to it, the queries at
their absolute positions (the dispatch's `q_offset`). New tokens take the text M-RoPE position
after the prompt's largest one, as transformers' `rope_deltas` do.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coma_jax.generate.sampling import choose_tokens
from coma_jax.model.attention import attention
from coma_jax.model.inputs import ModelInputs
from coma_jax.model.rope import mrope_cos_sin
from coma_jax.parallel.activations import constrain

CACHE_AXES = ('layers', 'batch', None, 'kv_heads', None)  # (layers, B, S, K, D)


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  max_new_tokens: int
  eos_ids: tuple[int, ...] = ()
  pad_id: int = 0
  return_logits: bool = False  # (B, N, V) fp32 per step: tests and inspection


def prompt_lengths(inputs: ModelInputs) -> tuple[np.ndarray, np.ndarray]:
  """Host side, per row: (prompt length P_b, the M-RoPE position of the first new token).
  Prompts must be right-padded: their tokens are the row's first P_b."""
  valid = np.asarray(inputs.token_valid).astype(bool)
  length = valid.sum(1)
  if not np.array_equal(valid, np.arange(valid.shape[1])[None] < length[:, None]) or (length == 0).any():
    raise ValueError('generation needs non-empty right-padded prompts')
  positions = np.where(valid[None], np.asarray(inputs.positions), -1)
  return length.astype(np.int32), (positions.max(axis=(0, 2)) + 1).astype(np.int32)


def _run_layers(model, x, positions, cache, write_at, attend):
  """The decoder on x (B, t, D) at M-RoPE `positions` (3, B, t); the t new keys/values of each
  layer go to cache slots write_at[b] + [0, t). attend(q, k, v, layer_k, layer_v) -> out.
  Returns the final-norm hidden states and the updated cache."""
  t_cfg = model.config.text
  cos, sin = mrope_cos_sin(positions, t_cfg.head_dim, t_cfg.rope_theta, t_cfg.mrope_section)
  graphdef, layers = nnx.split(model.decoder.layers)
  b, t = x.shape[:2]
  rows, cols = jnp.arange(b)[:, None], write_at[:, None] + jnp.arange(t)[None]

  def step(carry, xs):
    x, ck, cv = carry
    layer_state, i = xs
    box = {}

    def attend_layer(_, q, k, v):
      box['k'] = ck.at[i, rows, cols].set(k.astype(ck.dtype))
      box['v'] = cv.at[i, rows, cols].set(v.astype(cv.dtype))
      return attend(q, k, v, box['k'][i], box['v'][i])

    x = nnx.merge(graphdef, layer_state)(x, cos, sin, attend_layer, i)
    return (x, constrain(box['k'], CACHE_AXES), constrain(box['v'], CACHE_AXES)), None

  (x, ck, cv), _ = jax.lax.scan(step, (x, *cache), (layers, jnp.arange(model.decoder.num_layers)))
  return model.decoder.norm(x), (ck, cv)


def generate_tokens(model, inputs: ModelInputs, prompt_len, next_position, seeds, temperature, top_p,
                    max_new, forced=None, *, settings: DecodeSettings) -> dict:
  """Traceable: prefill + decode loop. Per row (B,): prompt_len, next_position, seeds,
  temperature (0 = greedy), top_p, max_new (<= settings.max_new_tokens). `forced` (B, N) feeds
  the given tokens instead of choosing (teacher forcing). Returns tokens (B, N) (pad after the
  end), num_tokens (B,) (end-of-sequence token included), and logits (B, N, V) if asked."""
  n = settings.max_new_tokens
  b, p = inputs.input_ids.shape
  t_cfg = model.config.text
  dtype = model.embed_tokens.dtype
  shape = (model.decoder.num_layers, b, p + n, t_cfg.num_key_value_heads, t_cfg.head_dim)
  cache = tuple(constrain(jnp.zeros(shape, dtype), CACHE_AXES) for _ in range(2))
  seg = inputs.segments
  prefill = lambda q, k, v, *_: attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True,
                                          impl=model.attention_impl, call='text')
  hidden, cache = _run_layers(model, model.embed(inputs), inputs.positions, cache, jnp.zeros(b, jnp.int32), prefill)
  logits = model.logits(hidden[jnp.arange(b), prompt_len - 1])
  eos = jnp.asarray(settings.eos_ids or (-1,), jnp.int32)

  def choose(logits, j):
    return forced[:, j].astype(jnp.int32) if forced is not None else choose_tokens(logits, seeds, j, temperature, top_p)

  def record(state, j, token, logits):
    tokens, num, done, logit_buf = state
    token = jnp.where(done, settings.pad_id, token)
    tokens = tokens.at[:, j].set(token)
    num = num + (~done).astype(jnp.int32)
    done = done | jnp.isin(token, eos) | (j + 1 >= max_new)
    if logit_buf is not None:
      logit_buf = logit_buf.at[:, j].set(logits)
    return tokens, num, done, logit_buf

  logit_buf = jnp.zeros((b, n, logits.shape[-1]), jnp.float32) if settings.return_logits else None
  state = record((jnp.full((b, n), settings.pad_id, jnp.int32), jnp.zeros(b, jnp.int32), max_new <= 0, logit_buf),
                 0, choose(logits, 0), logits)
  ones_q, ones_kv = jnp.ones((b, 1), jnp.int32), jnp.ones((b, p + n), jnp.int32)

  def body(carry):
    j, cache, state = carry
    slot = prompt_len + j - 1  # the previous token's cache slot and absolute position
    decode = lambda q, k, v, layer_k, layer_v: attention(
        q, layer_k, layer_v, q_segment_ids=ones_q, kv_segment_ids=ones_kv, causal=True, q_offset=slot,
        impl=model.attention_impl, call='decode')
    x = model.embed_tokens(state[0][:, j - 1][:, None])
    positions = jnp.broadcast_to((next_position + j - 1)[None, :, None], (3, b, 1))
    hidden, cache = _run_layers(model, x, positions, cache, slot, decode)
    logits = model.logits(hidden[:, 0])
    return j + 1, cache, record(state, j, choose(logits, j), logits)

  cond = lambda carry: (carry[0] < n) & ~jnp.all(carry[2][2])
  _, _, (tokens, num, _, logit_buf) = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, state))
  out = {'tokens': tokens, 'num_tokens': num}
  if settings.return_logits:
    out['logits'] = logit_buf
  return out


@functools.partial(jax.jit, static_argnums=0, static_argnames='settings')
def _generate_jit(graphdef, state, inputs, prompt_len, next_position, seeds, temperature, top_p, max_new, forced,
                  *, settings):
  return generate_tokens(nnx.merge(graphdef, state), inputs, prompt_len, next_position, seeds, temperature, top_p,
                         max_new, forced, settings=settings)


def generate(model, inputs: ModelInputs, settings: DecodeSettings, *, seeds=None, temperature=0.0, top_p=1.0,
             max_new=None, forced=None) -> dict:
  """Eager entry (single device, tests and scripts): NumPy in, NumPy out. Scalars broadcast."""
  prompt_len, next_position = prompt_lengths(inputs)
  b = len(prompt_len)
  per_row = lambda x, dtype: np.broadcast_to(np.asarray(x, dtype), (b,)).copy()
  graphdef, state = nnx.split(model)
  out = _generate_jit(graphdef, state, inputs, prompt_len, next_position,
                      per_row(0 if seeds is None else seeds, np.int64).astype(np.uint32),
                      per_row(temperature, np.float32), per_row(top_p, np.float32),
                      per_row(settings.max_new_tokens if max_new is None else max_new, np.int32),
                      None if forced is None else np.asarray(forced, np.int32), settings=settings)
  return jax.tree.map(np.asarray, out)
