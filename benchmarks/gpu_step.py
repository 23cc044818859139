"""GPU train-step benchmark: real-size Qwen2.5-VL 3B (and 7B) with random weights, synthetic batches.

  PYTHONPATH=. python benchmarks/gpu_step.py --out DIR        # on a GPU (about 6 minutes)
  PYTHONPATH=. python benchmarks/gpu_step.py --part torch_3b --out DIR   # one part alone
  PYTHONPATH=. python benchmarks/gpu_step.py --dry-run        # any machine: tiny model, tiny shapes

Imports only model and train code (no grain, tfds, ml_collections or tokenizer): token ids are
synthetic. Three parts, each in its own process so that JAX and torch never share the GPU, each
writing its JSON result to --out as soon as it has one:
  jax_3b    a cuDNN-vs-XLA attention check, then the 3B stage-2 GradCache step (32 pairs in 4
            chunks of 8; query = 448x896 image (512 visual tokens) + text, positive = text) and the
            3B stage-1 step (8 rows of 2048 tokens with 512 visual tokens, 2 micro-batches, paper mask);
  torch_3b  the same stage-2 step in transformers + peft + torch: bf16, SDPA, gradient checkpointing,
            the reference's two-pass GradCache, the same trainable set (DoRA r16 on q/k/v/o and
            every embedding row), AdamW;
  jax_7b    the 7B stage-2 step (JAX only);
  jax_3b_packing (asked for by --parts) the attention check, then each stage's 3B step on the same
            mixed-length examples (448-896 px images; stage 2: 64 pairs, stage 1: 16 examples),
            unpacked (one example per row) and packed (rows of 2048 / 4096 tokens): examples/s.
Three JAX step compilations in the default parts. Both sides: bf16 compute, frozen bf16 base, full remat.
MFU and HFU use training/flops.py's one FLOPs definition against the device's dense bf16 peak.
Prints measured numbers only; not a test.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
COMPRESSION_IDS = list(range(151665, 151697))  # K = 32 compression tokens after the base vocabulary
IMAGE_PAD, V_START, V_END = 151655, 151652, 151653

# Shapes per mode: the real run and a dry run small enough for a CPU test.
SHAPES = {
    'real': dict(pairs=32, chunks=4, image_hw=(448, 896), query_text=96, positive_text=128,
                 query_len=768, positive_len=256, s1_rows=8, s1_micro=2, s1_len=2048, s1_labels=640,
                 steps=3, models={'jax_3b': 'qwen2_5_vl_3b.json', 'torch_3b': 'qwen2_5_vl_3b.json',
                                           'jax_7b': 'qwen2_5_vl_7b.json', 'jax_3b_packing': 'qwen2_5_vl_3b.json'}),
    'dry': dict(pairs=4, chunks=2, image_hw=(56, 112), query_text=12, positive_text=16,
                query_len=64, positive_len=64, s1_rows=2, s1_micro=2, s1_len=128, s1_labels=64,
                steps=1, models={'jax_3b': 'qwen2_5_vl_tiny.json', 'torch_3b': 'qwen2_5_vl_tiny.json',
                                          'jax_7b': 'qwen2_5_vl_tiny.json', 'jax_3b_packing': 'qwen2_5_vl_tiny.json'}),
}


def hf_config_path(name: str) -> str:
  return os.path.join(ROOT, 'coma_jax', 'model', 'hf_configs', name)


def write(out_dir: str, name: str, result: dict) -> None:
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f'{name}.json'), 'w') as f:
    json.dump(result, f, indent=1)
  print(f'[{name}] {json.dumps(result)}', flush=True)


# ----------------------------------------------------------------------------- synthetic batches

def _image(rng, hw):
  from coma_jax.data.image import ImageSettings, ResizedImage
  return ResizedImage(rng.integers(0, 256, (*hw, 3)).astype(np.uint8), ImageSettings(max_pixels=2048 * 28 * 28))


def stage2_examples(shape: dict, seed: int = 0) -> dict:
  """Pairs: query = image + text + K compression tokens; positive = text + K compression tokens."""
  from coma_jax.data.sequences import IGNORE, Example
  rng = np.random.default_rng(seed)
  sides = {'query': [], 'positive': []}
  for i in range(shape['pairs']):
    img = _image(rng, shape['image_hw'])
    visual = int(np.prod(img.grid)) // 4
    query = [V_START] + [IMAGE_PAD] * visual + [V_END] + list(rng.integers(0, 151643, shape['query_text']))
    positive = list(rng.integers(0, 151643, shape['positive_text'] - int(rng.integers(0, 8))))
    for side, toks, images in (('query', query, [img]), ('positive', positive, [])):
      tokens = np.array(toks + COMPRESSION_IDS, np.int32)
      roles = np.array([1] * len(toks) + [2] * len(COMPRESSION_IDS), np.int8)
      sides[side].append(Example(f'{side}{i}', tokens, roles, np.full(len(tokens), IGNORE, np.int32), images,
                                 [im.grid for im in images]))
  return sides


def row_sets_of(batch: dict) -> list:
  from coma_jax.training.stage2 import row_sets
  return [batch[name] for name in row_sets(batch)]


def stage2_batch(model_config, shape: dict, sides: dict) -> dict:
  from coma_jax.data.batching import Bucket, example_slots
  from coma_jax.data.step_batches import BatchSpec, step_batch
  slots = max(example_slots([im.grid for im in e.images], model_config) for e in sides['query'])
  lens = {'query': shape['query_len'], 'positive': shape['positive_len']}
  for side, examples in sides.items():
    longest = max(len(e.tokens) for e in examples)
    assert longest <= lens[side], f'{side}: {longest} tokens > bucket {lens[side]}'
  buckets = [Bucket(lens['positive'], 0, 0), Bucket(lens['query'], slots, 0)]  # text-only positives, image queries
  per_example = [dict(zip(sides, row)) for row in zip(*sides.values())]
  return step_batch(BatchSpec(model_config, buckets, 1, len(COMPRESSION_IDS), sides=tuple(sides)), per_example,
                    range(len(per_example)))[0]


def stage1_examples(shape: dict, seed: int = 1):
  from coma_jax.data.sequences import IGNORE, Example
  rng = np.random.default_rng(seed)
  examples = []
  for i in range(shape['s1_rows']):
    img = _image(rng, shape['image_hw'])
    prefix = [V_START] + [IMAGE_PAD] * (int(np.prod(img.grid)) // 4) + [V_END] + list(rng.integers(0, 151643, 16))
    dialogue = list(rng.integers(0, 151643, shape['s1_len'] - len(prefix) - 32 - int(rng.integers(0, 16))))
    tokens = np.array(prefix + COMPRESSION_IDS + dialogue, np.int32)
    roles = np.array([1] * len(prefix) + [2] * 32 + [3] * len(dialogue), np.int8)
    answers = np.arange(len(tokens)) >= len(tokens) - shape['s1_labels'] + 8
    examples.append(Example(f's1_{i}', tokens, roles, np.where(answers, tokens, IGNORE).astype(np.int32), [img],
                            [img.grid]))
  return examples


# ----------------------------------------------------------------------------- JAX parts

def _timed_steps(compiled, state, batch, steps: int):
  import jax
  key = jax.random.key(0)
  state, metrics = compiled(state, batch, key)  # the first run (allocations, autotuning) is not timed
  jax.block_until_ready(metrics['loss'])
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch, key)
    jax.block_until_ready(metrics['loss'])
    times.append(time.perf_counter() - start)
  return state, statistics.median(times), float(metrics['loss'])


def _memory_gib() -> float | None:
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return None if peak is None else peak / 2**30


PACKED_CASES = ('text_packed_causal', 'text_packed_mha', 'vision_full_packed')


def attention_check(shape_mode: str) -> dict:
  """cuDNN against the XLA path in bf16 (forward and gradients), for the LLM's causal call (head
  dim 128, GQA, right padding), a left-padded row (the blockwise fallback), the vision tower's full
  attention (head dim 80), and packed rows through cuDNN's packed layout. Skipped where there is
  no GPU."""
  import jax
  import jax.numpy as jnp
  from coma_jax.model import attention_kernels
  from coma_jax.model.attention import attention
  if jax.default_backend() != 'gpu':
    return {'skipped': 'no GPU'}
  rng = np.random.default_rng(0)
  packed_rows = ([(1, 300), (2, 200), (3, 400), (0, 124)], [(1, 512), (2, 512)])
  cases = {'text_causal_gqa': (2, 512, 16, 2, 128, True, [(1, 400), (0, 112)], [(1, 512)]),
           'text_left_padded': (2, 512, 16, 2, 128, True, [(0, 100), (1, 412)], [(1, 512)]),
           'vision_full': (2, 1024, 16, 16, 80, False, [(1, 900), (0, 124)], [(1, 1024)]),
           # packed rows: cuDNN's packed layout (segment offsets and lengths)
           'text_packed_causal': (2, 1024, 16, 2, 128, True, *packed_rows),
           'text_packed_mha': (2, 1024, 16, 16, 128, True, *packed_rows),  # tells a GQA-only failure apart
           'vision_full_packed': (2, 1024, 16, 16, 80, False, [(1, 256), (2, 576), (0, 192)], [(1, 1024)])}
  rel = lambda a, b: float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max()
                           / (jnp.abs(b.astype(jnp.float32)).max() + 1e-12))
  result = {}
  for name, (b, t, n, kv, d, causal, row0, row1) in cases.items():
    seg = jnp.asarray(np.stack([np.concatenate([np.full(c, s) for s, c in row]) for row in (row0, row1)]), jnp.int32)
    q = jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.normal(size=(b, t, kv, d)), jnp.bfloat16) for _ in range(2))
    valid = np.asarray(seg != 0)
    rows = valid[:, :, None, None]

    def run(impl):
      f = lambda q, k, v: attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=causal, impl=impl)
      loss = lambda q, k, v: (f(q, k, v).astype(jnp.float32) * valid[:, :, None, None]).sum()
      return jax.jit(lambda q, k, v: (f(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(q, k, v)
    out_x, g_x = run('xla')
    attention_kernels.PACKED_CUDNN = True  # the check measures the packed layout whatever the default
    try:
      out_c, g_c = run('cudnn')
      errs = [rel(a, b) for a, b in zip(g_c, g_x)]
      result[name] = {'out_rel_err': rel(jnp.where(rows, out_c, 0), jnp.where(rows, out_x, 0)),
                      'grad_rel_err': max(errs), 'grad_rel_errs_q_k_v': errs,
                      'grad_rel_err_real_rows': max(rel(jnp.where(rows, a, 0), jnp.where(rows, b, 0))
                                                    for a, b in zip(g_c, g_x)),
                      # the fused branches zero padding rows, the blockwise fallback does not
                      'fused_ran': bool((~valid).any() and float(jnp.abs(out_c.astype(jnp.float32))[~valid].max()) == 0)}
    except Exception as e:  # noqa: BLE001 -- recorded, and the steps then run blockwise
      result[name] = {'error': f'{type(e).__name__}: {str(e)[:300]}'}
  result['ok'] = all(_good(r) for r in result.values() if isinstance(r, dict))
  return result


def _good(r: dict) -> bool:
  return 'error' not in r and r['out_rel_err'] < 0.05 and r['grad_rel_err'] < 0.05


def choose_kernels(check: dict) -> str:
  """From the check: the attention implementation for the steps, and (set on attention_kernels)
  whether packed rows take cuDNN's packed layout; returns the impl."""
  from coma_jax.model import attention_kernels
  cases = {k: r for k, r in check.items() if isinstance(r, dict)}
  packed_ok = all(_good(cases[c]) for c in PACKED_CASES)
  attention_kernels.PACKED_CUDNN = packed_ok  # else packed rows go blockwise
  check['packed_cudnn'] = packed_ok
  if not all(_good(r) for k, r in cases.items() if k not in PACKED_CASES):
    return 'blockwise'  # the fused path failed its check: measure the portable one instead
  return 'auto'


def build_setup(model_config, make_step, attention_impl: str, dtype_name: str):
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from coma_jax.model import Qwen25VL
  from coma_jax.model.lora import AdapterConfig, apply_adapters
  from coma_jax.parallel.mesh import make_mesh
  from coma_jax.parallel.rules import rules_dict
  from coma_jax.training.optim import OptimConfig, TrainableConfig
  from coma_jax.training.sharded_setup import build_train_setup
  dtype = getattr(jnp, dtype_name)
  # Random weights, created in bf16 (frozen stays bf16; what trains gets fp32 masters).
  model = Qwen25VL(model_config, dtype=dtype, param_dtype=dtype, remat='full', attention_impl=attention_impl,
                   rngs=nnx.Rngs(0))
  apply_adapters(model, AdapterConfig(rank=16, alpha=64, dropout=0.1), nnx.Rngs(1))
  mesh = make_mesh((1, 1, 1), jax.devices()[:1])
  return build_train_setup(model, mesh, make_step, rules=rules_dict(()), optim=OptimConfig(total_steps=100),
                           trainable=TrainableConfig(embeddings='all'), frozen_dtype=dtype)


def _compile(setup, state, batch):
  import jax
  start = time.perf_counter()
  compiled = setup.step.lower(state, batch, jax.random.key(0)).compile()
  return compiled, time.perf_counter() - start


def _report_numbers(step_s, flops, tokens, valid_tokens, compile_s, loss, extra=None):
  from coma_jax.training.flops import device_peak_flops
  peak = device_peak_flops()
  out = {'step_s': step_s, 'compile_s': compile_s, 'tokens_per_s': tokens / step_s,
         'valid_tokens_per_s': valid_tokens / step_s, 'model_flops': flops.model, 'executed_flops': flops.executed,
         'peak_flops_assumed': peak, 'mfu': None if peak is None else flops.model / step_s / peak,
         'hfu': None if peak is None else flops.executed / step_s / peak, 'peak_memory_gib': _memory_gib(),
         'loss': loss}
  out.update(extra or {})
  return out


def run_jax_stage2(model_config, shape, attention_impl, dtype_name):
  import jax
  from coma_jax.training.flops import batch_flops
  from coma_jax.training.stage2 import Stage2StepConfig, make_stage2_step
  cfg = Stage2StepConfig(chunks=shape['chunks'], attention_impl=attention_impl)
  batch = stage2_batch(model_config, shape, stage2_examples(shape))
  setup = build_setup(model_config, lambda g, tx: make_stage2_step(g, tx, cfg), attention_impl, dtype_name)
  placed = jax.device_put(batch)
  compiled, compile_s = _compile(setup, setup.state, placed)
  state, step_s, loss = _timed_steps(compiled, setup.state, placed, shape['steps'])
  tokens = sum(int(np.prod(b['inputs'].input_ids.shape)) for b in row_sets_of(batch))
  valid = sum(int(np.asarray(b['inputs'].token_valid).sum()) for b in row_sets_of(batch))
  flops = batch_flops(model_config, row_sets_of(batch), full_remat=True, grad_cache=True, reused_vision=True)
  numbers = _report_numbers(step_s, flops, tokens, valid, compile_s, loss,
                            {'pairs': shape['pairs'], 'chunk_pairs': shape['pairs'] // shape['chunks'],
                             'lengths': {s: list(b['inputs'].input_ids.shape) for s, b in batch.items() if s != 'example_ids'},
                             'vision_patches_per_query': int(batch['query']['inputs'].pixel_patches.shape[1])})
  return numbers, state


def run_jax_stage1(model_config, shape, attention_impl, dtype_name):
  import jax
  from coma_jax.data.batching import Bucket, collate, example_slots
  from coma_jax.training.flops import batch_flops
  from coma_jax.training.stage1 import Stage1StepConfig, make_stage1_step
  examples = stage1_examples(shape)
  slots = max(example_slots(e.grids, model_config) for e in examples)
  labels = max(e.num_labels for e in examples)
  batch = collate(examples, model_config, Bucket(shape['s1_len'], slots, -(-labels // 64) * 64), 1, 32)
  cfg = Stage1StepConfig(micro_batches=shape['s1_micro'], attention_impl=attention_impl)
  setup = build_setup(model_config, lambda g, tx: make_stage1_step(g, tx, cfg), attention_impl, dtype_name)
  placed = jax.device_put(batch)
  compiled, compile_s = _compile(setup, setup.state, placed)
  _, step_s, loss = _timed_steps(compiled, setup.state, placed, shape['steps'])
  rows, length = batch['inputs'].input_ids.shape
  flops = batch_flops(model_config, [batch], paper_mask=True, full_remat=True)
  return _report_numbers(step_s, flops, rows * length, int(np.asarray(batch['inputs'].token_valid).sum()), compile_s,
                         loss, {'rows': rows, 'length': length, 'micro_batches': shape['s1_micro'],
                                'vision_patches_per_row': int(batch['inputs'].pixel_patches.shape[1])})


def part_jax(name: str, mode: str, out_dir: str) -> None:
  import jax
  from coma_jax.model.config import ModelConfig
  shape = SHAPES[mode]
  dtype_name = 'bfloat16' if mode == 'real' else 'float32'
  model_config = ModelConfig.from_json_file(hf_config_path(shape['models'][name]))
  device = f'{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}'
  impl = 'auto'
  if name in ('jax_3b', 'jax_3b_packing'):
    check = attention_check(mode)
    if check.get('skipped') is None:
      impl = choose_kernels(check)
    write(out_dir, 'attention_check', dict(check, device=device))
  if name == 'jax_3b_packing':
    run_packing(model_config, mode, impl, dtype_name, out_dir, device)
    return
  start = time.perf_counter()
  numbers, state = run_jax_stage2(model_config, shape, impl, dtype_name)
  write(out_dir, f'{name}_stage2', dict(numbers, device=device, attention=impl, wall_s=time.perf_counter() - start))
  if name == 'jax_3b':
    del state
    start = time.perf_counter()
    numbers = run_jax_stage1(model_config, shape, impl, dtype_name)
    write(out_dir, f'{name}_stage1', dict(numbers, device=device, attention=impl, wall_s=time.perf_counter() - start))


# ----------------------------------------------------------------------------- packing

MIXED = {  # mixed-length batches, unpacked against packed (the loaders' two layouts)
    'real': dict(pairs=64, chunks=4, sizes=(448, 560, 672, 784, 896), query_text=(16, 96), positive_text=(8, 128),
                 s2_buckets=[(256, 0, 0), (1280, 4608, 0)], s2_packed=[(r, 2048, 7168, 0) for r in (24, 28, 32, 40, 48)],
                 s1_examples=16, s1_micro=2, dialogue=(64, 1024), s1_buckets=[(2304, 4608, 1024)],
                 s1_packed=[(r, 4096, 9216, 2048) for r in (4, 6, 8, 10)], steps=3),
    'dry': dict(pairs=8, chunks=2, sizes=(56, 84, 112), query_text=(4, 12), positive_text=(4, 16),
                s2_buckets=[(64, 0, 0), (96, 256, 0)], s2_packed=[(r, 128, 512, 0) for r in (4, 6, 8)],
                s1_examples=4, s1_micro=2, dialogue=(8, 48), s1_buckets=[(160, 256, 64)],
                s1_packed=[(r, 256, 512, 128) for r in (2, 4)], steps=1),
}


def run_packing(model_config, mode: str, impl: str, dtype_name: str, out_dir: str, device: str) -> None:
  """Each stage's step on the same mixed-length examples, unpacked then packed: examples/s."""
  import jax
  import jax.numpy as jnp
  from coma_jax.data.batching import parse_buckets
  from coma_jax.data.packing import parse_packed_buckets
  from coma_jax.data.step_batches import BatchSpec, step_batch
  from coma_jax.training.flops import batch_flops
  from coma_jax.training.stage1 import Stage1StepConfig, make_stage1_step
  from coma_jax.training.stage2 import Stage2StepConfig, make_stage2_step
  from synthetic_examples import mixed_examples
  m = MIXED[mode]
  k = len(COMPRESSION_IDS)
  for stage in (2, 1):
    n = m['pairs'] if stage == 2 else m['s1_examples']
    examples = mixed_examples(n, stage, sizes=m['sizes'], dialogue=m['dialogue'], query_text=m['query_text'],
                              positive_text=m['positive_text'])
    sides = ('query', 'positive') if stage == 2 else None
    if stage == 2:
      cfg = Stage2StepConfig(chunks=m['chunks'], attention_impl=impl)
      make = lambda g, tx: make_stage2_step(g, tx, cfg)
    else:
      cfg = Stage1StepConfig(micro_batches=m['s1_micro'], attention_impl=impl)
      make = lambda g, tx: make_stage1_step(g, tx, cfg)
    pixels = getattr(jnp, dtype_name)  # pixels travel in the compute dtype, as the loaders send them
    specs = {'unpacked': BatchSpec(model_config, parse_buckets(m[f's{stage}_buckets']), 1, k, sides=sides,
                                   pixel_dtype=pixels),
             'packed': BatchSpec(model_config, None, 1, k, sides=sides, pixel_dtype=pixels,
                                 packed_buckets=parse_packed_buckets(m[f's{stage}_packed']))}
    for layout, spec in specs.items():
      start = time.perf_counter()
      batch, bucket, _ = step_batch(spec, examples, range(n))
      sets = row_sets_of(batch) if stage == 2 else [batch]
      setup = build_setup(model_config, make, impl, dtype_name)  # the step donates its state: a fresh one
      placed = jax.device_put(batch)
      compiled, compile_s = _compile(setup, setup.state, placed)
      state, step_s, loss = _timed_steps(compiled, setup.state, placed, m['steps'])
      del state, compiled, setup
      tokens = sum(int(np.prod(b['inputs'].input_ids.shape)) for b in sets)
      valid = sum(int(np.asarray(b['inputs'].token_valid).sum()) for b in sets)
      flops = batch_flops(model_config, sets, paper_mask=stage == 1, full_remat=True, grad_cache=stage == 2,
                          reused_vision=stage == 2)
      numbers = _report_numbers(step_s, flops, tokens, valid, compile_s, loss,
                                {'examples': n, 'examples_per_s': n / step_s, 'token_padding': 1 - valid / tokens,
                                 'shape': str(bucket)})
      write(out_dir, f'packing_stage{stage}_{layout}', dict(numbers, device=device, attention=impl,
                                                             wall_s=time.perf_counter() - start))


# ----------------------------------------------------------------------------- the torch part

def part_torch(name: str, mode: str, out_dir: str) -> None:
  """transformers + peft + torch, the reference's two-pass GradCache on the same batch."""
  import torch
  import torch.nn.functional as F
  import transformers
  from peft import LoraConfig, get_peft_model
  from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
  from coma_jax.model.config import ModelConfig
  from torch_grad_cache import two_pass_step
  shape = SHAPES[mode]
  path = hf_config_path(shape['models'][name])
  model_config = ModelConfig.from_json_file(path)
  sides = stage2_examples(shape)
  batch = stage2_batch(model_config, shape, sides)
  cuda = torch.cuda.is_available()
  device = torch.device('cuda' if cuda else 'cpu')
  dtype = torch.bfloat16 if cuda else torch.float32
  torch.manual_seed(0)
  hf = Qwen2_5_VLConfig.from_json_file(path)
  start = time.perf_counter()
  with device:
    model = Qwen2_5_VLForConditionalGeneration._from_config(hf, dtype=dtype, attn_implementation='sdpa')
  model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
  model = get_peft_model(model, LoraConfig(r=16, lora_alpha=64, lora_dropout=0.1, use_dora=True,
                                           target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj']))
  inner = model.base_model.model
  inner.model.language_model.embed_tokens.weight.requires_grad_(True)  # every embedding row trains
  model.train()
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5, weight_decay=0.0)
  init_s = time.perf_counter() - start
  print(f'[{name}] model ready in {init_s:.0f} s', flush=True)
  n, chunks = shape['pairs'], shape['chunks']  # chunks of consecutive rows
  chunk_rows = [list(range(c * n // chunks, (c + 1) * n // chunks)) for c in range(chunks)]
  tensors = {}
  for side, b in ((s, b) for s, b in batch.items() if s != 'example_ids'):
    ids = torch.as_tensor(np.asarray(b['inputs'].input_ids, np.int64))
    tensors[side] = dict(ids=ids, mask=torch.as_tensor(np.asarray(b['inputs'].token_valid, np.int64)),
                         comp=torch.as_tensor(np.asarray(b['compression_positions'], np.int64)[:, 0]))

  takes_token_types = 'mm_token_type_ids' in inspect.signature(inner.model.forward).parameters

  def inputs(side, rows):
    t = tensors[side]
    kw = dict(input_ids=t['ids'][rows].to(device), attention_mask=t['mask'][rows].to(device))
    images = [im for i in rows for im in sides[side][i].images]
    if images:
      kw.update(pixel_values=torch.as_tensor(np.concatenate([im.patches() for im in images])).to(device, dtype),
                image_grid_thw=torch.as_tensor(np.array([im.grid for im in images])).to(device))
      if takes_token_types:  # newer transformers fall back to 1-D positions without it
        kw['mm_token_type_ids'] = (kw['input_ids'] == IMAGE_PAD).long()
    return kw, t['comp'][rows].to(device)

  def encode(side, rows):
    kw, comp = inputs(side, rows)
    hidden = inner.model(**kw).last_hidden_state
    reps = torch.gather(hidden, 1, comp[..., None].expand(-1, -1, hidden.shape[-1])).float().mean(1)
    return F.normalize(reps, dim=-1)

  step = lambda: two_pass_step(encode, chunk_rows, opt, device=device)

  sync = torch.cuda.synchronize if cuda else (lambda: None)
  t0 = time.perf_counter()
  step()
  sync()
  print(f'[{name}] first step {time.perf_counter() - t0:.1f} s', flush=True)
  times = []
  for _ in range(shape['steps']):
    t0 = time.perf_counter()
    loss = step()
    sync()
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  tokens = sum(int(np.prod(b['inputs'].input_ids.shape)) for b in row_sets_of(batch))
  peak_mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
  dev = torch.cuda.get_device_name() if cuda else 'cpu'
  write(out_dir, f'{name}_stage2', {'step_s': step_s, 'tokens_per_s': tokens / step_s, 'peak_memory_gib': peak_mem,
                                    'init_s': init_s, 'loss': loss, 'device': dev,
                                    'torch': torch.__version__, 'transformers': transformers.__version__})


# ----------------------------------------------------------------------------- driver

PARTS = ('jax_3b', 'torch_3b', 'jax_7b', 'jax_3b_packing')
CAPS_S = {'jax_3b': 200, 'torch_3b': 160, 'jax_7b': 150, 'jax_3b_packing': 450}  # per-part limits, real run


def _load(out_dir, name):
  path = os.path.join(out_dir, f'{name}.json')
  return json.load(open(path)) if os.path.exists(path) else None


def summary(out_dir: str) -> str:
  lines = []
  check = _load(out_dir, 'attention_check')
  if check:
    lines.append(f'device: {check.get("device")}; cuDNN check: ' + json.dumps({k: v for k, v in check.items()
                                                                               if k != 'device'}))
  lines.append('| step | s/step | tokens/s | MFU | HFU | peak GiB | compile s |')
  lines.append('|---|---|---|---|---|---|---|')
  pct = lambda x: '-' if x is None else f'{100 * x:.1f}%'
  for name in ('jax_3b_stage2', 'torch_3b_stage2', 'jax_3b_stage1', 'jax_7b_stage2'):
    r = _load(out_dir, name)
    if r is None:
      lines.append(f'| {name} | not measured | | | | | |')
      continue
    mem = '-' if r.get('peak_memory_gib') is None else f'{r["peak_memory_gib"]:.1f}'
    lines.append(f'| {name} | {r["step_s"]:.3f} | {r["tokens_per_s"]:,.0f} | {pct(r.get("mfu"))} | '
                 f'{pct(r.get("hfu"))} | {mem} | {r.get("compile_s", float("nan")):.0f} |')
  ours, theirs = _load(out_dir, 'jax_3b_stage2'), _load(out_dir, 'torch_3b_stage2')
  if ours and theirs:
    lines.append(f'3B stage-2 throughput, coma_jax / torch: {theirs["step_s"] / ours["step_s"]:.2f}x')
  peak = next((r.get('peak_flops_assumed') for r in map(lambda n: _load(out_dir, n), ('jax_3b_stage2',)) if r), None)
  if peak:
    lines.append(f'MFU/HFU against {peak / 1e12:.0f} TFLOP/s dense bf16 per device (vendor spec).')
  packing = {(st, lay): _load(out_dir, f'packing_stage{st}_{lay}') for st in (1, 2) for lay in ('unpacked', 'packed')}
  if any(packing.values()):
    lines += ['', '| mixed lengths | layout | examples/s | s/step | token padding | MFU | HFU | peak GiB | shape |',
              '|---|---|---|---|---|---|---|---|---|']
    for (st, lay), r in packing.items():
      if r:
        mem = '-' if r.get('peak_memory_gib') is None else f'{r["peak_memory_gib"]:.1f}'
        lines.append(f'| stage {st} | {lay} | {r["examples_per_s"]:.2f} | {r["step_s"]:.3f} | {r["token_padding"]:.0%} | '
                     f'{pct(r.get("mfu"))} | {pct(r.get("hfu"))} | {mem} | {r["shape"]} |')
    for st in (1, 2):
      u, p = packing[(st, 'unpacked')], packing[(st, 'packed')]
      if u and p:
        lines.append(f'stage {st}: packed / unpacked examples/s = {p["examples_per_s"] / u["examples_per_s"]:.2f}x')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', default=os.environ.get('OUT', 'gpu_step_out'))
  parser.add_argument('--dry-run', action='store_true', help='tiny model and shapes: checks the script runs')
  parser.add_argument('--parts', default=','.join(PARTS[:3]))
  parser.add_argument('--part', choices=PARTS, help='run one part in this process (the driver runs each so)')
  parser.add_argument('--budget-s', type=float, default=480, help='the whole run, all parts')
  args = parser.parse_args()
  mode = 'dry' if args.dry_run else 'real'
  if args.part:
    (part_torch if args.part.startswith('torch') else part_jax)(args.part, mode, args.out)
    return
  deadline = time.monotonic() + args.budget_s
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get('PYTHONPATH')])))
  env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.92')
  for name in args.parts.split(','):
    left = deadline - time.monotonic()
    if left < 30:
      print(f'[{name}] skipped: {left:.0f} s of the budget left', flush=True)
      continue
    cmd = [sys.executable, os.path.abspath(__file__), '--part', name, '--out', args.out] + (['--dry-run'] if args.dry_run else [])
    start = time.perf_counter()
    try:
      rc = subprocess.run(cmd, env=env, timeout=min(left, CAPS_S[name] if mode == 'real' else left)).returncode
    except subprocess.TimeoutExpired:
      rc = 'timeout'
    print(f'[{name}] exit {rc} after {time.perf_counter() - start:.0f} s', flush=True)
  text = summary(args.out)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'summary.md'), 'w') as f:
    f.write(text + '\n')
  print(text, flush=True)


if __name__ == '__main__':
  main()
