"""Train-step throughput: coma_jax against transformers + peft + torch, on the same CPU, in one
run, with the same model, batch and trainable set (DoRA r16 a64 on q/k/v/o, all embedding rows,
frozen vision tower).

  python benchmarks/step_throughput.py --stage 1|2 [--steps 5] [--batch 8] [--length 256] [--chunks 2]
  python benchmarks/step_throughput.py --setting mixed --stage 1|2 [--batch 32]

Mixed (packing): examples of mixed lengths (112-336 px images, 16-144 visual tokens, dialogues of
24-480 tokens; stage 2: image queries, text positives), one coma_jax step on the loaders' unpacked
batch (one example per row, the smallest fitting bucket) and on their packed batch (rows of 1024
tokens for stage 1, 512 for stage 2; first fit decreasing, the smallest fitting row count), side by
side: examples/s and ratio.

Stage 2: query (224 px image + text) and positive (text) sides of `length` tokens, InfoNCE over the
batch, GradCache in `chunks` chunks on both sides (torch: the reference's two-pass GradCache).

Model: hidden 256, 4 LLM layers, 4 vision blocks, the real 151,936-row vocabulary, 224 px images.
Two torch baselines:
  reference-style: ForConditionalGeneration computes logits at every token (as the reference code);
  equal-work:      the base model, then the LM head only at the supervised positions.
Ours runs the causal mask (the work torch does) and, reported apart, the paper mask (2 attention
calls per layer). Prints measured seconds per step and the ratios. Not a test.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import numpy as np


def build_examples(batch: int, length: int, seed: int = 0):
  from coma_jax.data.image import ImageSettings, ResizedImage
  from coma_jax.data.sequences import IGNORE, Example
  rng = np.random.default_rng(seed)
  examples = []
  for i in range(batch):
    img = ResizedImage(rng.integers(0, 256, (224, 224, 3)).astype(np.uint8), ImageSettings())
    prefix = [151652] + [151655] * 64 + [151653] + list(rng.integers(0, 151643, 12))
    comp = list(range(151665, 151697))
    dialogue = list(rng.integers(0, 151643, length - len(prefix) - len(comp) - int(rng.integers(0, 24))))
    tokens = np.array(prefix + comp + dialogue, np.int32)
    roles = np.array([1] * len(prefix) + [2] * len(comp) + [3] * len(dialogue), np.int8)
    answer = np.arange(len(tokens)) >= len(prefix) + len(comp) + 20
    examples.append(Example(f'b{i}', tokens, roles, np.where(answer, tokens, IGNORE).astype(np.int32), [img], [img.grid]))
  return examples


def time_it(fn, steps: int, warmup: int = 2) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def jax_step_time(hf_dir, examples, length, steps, mask):
  import jax
  from flax import nnx
  from coma_jax.data.batching import Bucket, collate
  from coma_jax.hf import load_pretrained
  from coma_jax.model.lora import AdapterConfig, apply_adapters
  from coma_jax.parallel.mesh import make_mesh
  from coma_jax.parallel.rules import rules_dict
  from coma_jax.training.sharded_setup import build_train_setup
  from coma_jax.training.optim import OptimConfig, TrainableConfig
  from coma_jax.training.stage1 import Stage1StepConfig, make_stage1_step
  model = load_pretrained(hf_dir)
  apply_adapters(model, AdapterConfig(rank=16, alpha=64, dropout=0.1), nnx.Rngs(0))
  labels = max(e.num_labels for e in examples)
  batch = collate(examples, model.config, Bucket(length, 256, -(-labels // 64) * 64), 1, 32)
  # No remat anywhere: torch keeps all activations too.
  cfg = Stage1StepConfig(mask=mask, normalisation='token_mean', loss_remat=False)
  mesh = make_mesh((1, 1, 1), jax.devices()[:1])
  setup = build_train_setup(model, mesh, lambda g, tx: make_stage1_step(g, tx, cfg), rules=rules_dict(()),
                            optim=OptimConfig(total_steps=100), trainable=TrainableConfig())
  batch = jax.device_put(batch)
  holder = {'state': setup.state}

  def run():
    holder['state'], metrics = setup.step(holder['state'], batch, jax.random.key(0))
    jax.block_until_ready(metrics['loss'])
  return time_it(run, steps), batch


def torch_step_time(hf_dir, examples, batch, steps, equal_work: bool):
  import torch
  from peft import LoraConfig, get_peft_model
  from transformers import Qwen2_5_VLForConditionalGeneration
  model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32)
  model.config._attn_implementation = 'sdpa'
  model = get_peft_model(model, LoraConfig(r=16, lora_alpha=64, lora_dropout=0.1, use_dora=True,
                                           target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj']))
  embed = model.base_model.model.model.language_model.embed_tokens.weight
  embed.requires_grad_(True)  # all embedding rows train, as the reference does
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.0)
  inputs = batch['inputs']
  ids = torch.as_tensor(np.asarray(inputs.input_ids, np.int64))
  kw = dict(input_ids=ids, attention_mask=torch.as_tensor(np.asarray(inputs.token_valid, np.int64)),
            pixel_values=torch.as_tensor(np.concatenate([i.patches() for e in examples for i in e.images])),
            image_grid_thw=torch.as_tensor(np.array([g for e in examples for g in e.grids])),
            mm_token_type_ids=(ids == 151655).long())
  labels = torch.as_tensor(np.asarray(batch['labels'], np.int64))
  positions = np.asarray(batch['label_positions'])
  rows, cols = np.nonzero(positions >= 0)
  pos_rows, pos_cols = torch.as_tensor(rows), torch.as_tensor(positions[rows, cols])
  targets = torch.as_tensor(np.asarray(batch['label_targets'])[rows, cols].astype(np.int64))
  inner = model.base_model.model

  def run():
    opt.zero_grad(set_to_none=True)
    if equal_work:
      hidden = inner.model(**kw).last_hidden_state
      logits = inner.lm_head(hidden[pos_rows, pos_cols])
      loss = torch.nn.functional.cross_entropy(logits.float(), targets)
    else:
      loss = model(**kw, labels=labels).loss
    loss.backward()
    opt.step()
  return time_it(run, steps)


def build_pairs(batch: int, length: int, seed: int = 1):
  """Query: 224 px image + text + 32 compression tokens; positive: text + 32 compression tokens."""
  from coma_jax.data.image import ImageSettings, ResizedImage
  from coma_jax.data.sequences import IGNORE, Example
  rng = np.random.default_rng(seed)
  comp = list(range(151665, 151697))
  sides = {'query': [], 'positive': []}
  for i in range(batch):
    img = ResizedImage(rng.integers(0, 256, (224, 224, 3)).astype(np.uint8), ImageSettings())
    q = [151652] + [151655] * 64 + [151653]
    q += list(rng.integers(0, 151643, length - len(q) - 32 - int(rng.integers(0, 24))))
    p = list(rng.integers(0, 151643, length - 32 - int(rng.integers(0, 24))))
    for name, toks, images in (('query', q, [img]), ('positive', p, [])):
      tokens = np.array(toks + comp, np.int32)
      roles = np.array([1] * len(toks) + [2] * 32, np.int8)
      sides[name].append(Example(f'{name}{i}', tokens, roles, np.full(len(tokens), IGNORE, np.int32), images,
                                 [im.grid for im in images]))
  return sides


def jax_stage2_time(hf_dir, pairs, length, steps, chunks):
  import jax
  from flax import nnx
  from coma_jax.data.batching import Bucket
  from coma_jax.data.step_batches import BatchSpec, step_batch
  from coma_jax.hf import load_pretrained
  from coma_jax.model.lora import AdapterConfig, apply_adapters
  from coma_jax.parallel.mesh import make_mesh
  from coma_jax.parallel.rules import rules_dict
  from coma_jax.training.sharded_setup import build_train_setup
  from coma_jax.training.optim import OptimConfig, TrainableConfig
  from coma_jax.training.stage2 import Stage2StepConfig, make_stage2_step
  model = load_pretrained(hf_dir)
  apply_adapters(model, AdapterConfig(rank=16, alpha=64, dropout=0.1), nnx.Rngs(0))
  per_example = [dict(zip(pairs, row)) for row in zip(*pairs.values())]
  batch = step_batch(BatchSpec(model.config, [Bucket(length, 256, 0)], 1, 32, sides=tuple(pairs)), per_example,
                     range(len(per_example)))[0]
  cfg = Stage2StepConfig(chunks=chunks)
  setup = build_train_setup(model, make_mesh((1, 1, 1), jax.devices()[:1]), lambda g, tx: make_stage2_step(g, tx, cfg),
                            rules=rules_dict(()), optim=OptimConfig(total_steps=100), trainable=TrainableConfig())
  placed = jax.device_put(batch)
  holder = {'state': setup.state}

  def run():
    holder['state'], metrics = setup.step(holder['state'], placed, jax.random.key(0))
    jax.block_until_ready(metrics['loss'])
  return time_it(run, steps), batch


def torch_stage2_time(hf_dir, pairs, batch, steps, chunks, full_logits: bool):
  """The reference's two-pass GradCache: representations without grad, their gradient from the
  loss, then a chunked forward with grad and backward(rep_grad)."""
  import torch
  import torch.nn.functional as F
  from peft import LoraConfig, get_peft_model
  from transformers import Qwen2_5_VLForConditionalGeneration
  from torch_grad_cache import two_pass_step
  model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32)
  model.config._attn_implementation = 'sdpa'
  model = get_peft_model(model, LoraConfig(r=16, lora_alpha=64, lora_dropout=0.1, use_dora=True,
                                           target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj']))
  model.base_model.model.model.language_model.embed_tokens.weight.requires_grad_(True)
  model.train()
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5, weight_decay=0.0)
  inner = model.base_model.model

  def side_inputs(name, rows):
    side = batch[name]
    ids = torch.as_tensor(np.asarray(side['inputs'].input_ids, np.int64))[rows]
    kw = dict(input_ids=ids, attention_mask=torch.as_tensor(np.asarray(side['inputs'].token_valid, np.int64))[rows])
    images = [im for i in rows for im in pairs[name][i].images]
    if images:
      kw.update(pixel_values=torch.as_tensor(np.concatenate([im.patches() for im in images])),
                image_grid_thw=torch.as_tensor(np.array([im.grid for im in images])),
                mm_token_type_ids=(ids == 151655).long())
    return kw, torch.as_tensor(np.asarray(side['compression_positions'], np.int64)[:, 0])[rows]

  n = len(pairs['query'])
  chunk_rows = [list(range(c, n, chunks)) for c in range(chunks)]

  def encode(name, rows):
    kw, comp = side_inputs(name, rows)
    if full_logits:  # the reference encodes with ForConditionalGeneration: logits at every token
      out = inner(**kw, output_hidden_states=True)
      hidden = out.hidden_states[-1]
    else:
      hidden = inner.model(**kw).last_hidden_state
    reps = torch.gather(hidden, 1, comp[..., None].expand(-1, -1, hidden.shape[-1])).mean(1)
    return F.normalize(reps, dim=-1)

  def run():
    two_pass_step(encode, chunk_rows, opt)
  return time_it(run, steps)


MIXED_SIZES = (112, 168, 224, 280, 336)


def mixed_packing(args):
  """The same examples, unpacked and packed, through one coma_jax step each: examples/s."""
  import jax
  from flax import nnx
  from coma_jax.data.batching import parse_buckets
  from coma_jax.data.packing import parse_packed_buckets
  from coma_jax.data.step_batches import BatchSpec, step_batch
  from coma_jax.hf import load_pretrained
  from coma_jax.model.lora import AdapterConfig, apply_adapters
  from coma_jax.parallel.mesh import make_mesh
  from coma_jax.parallel.rules import rules_dict
  from coma_jax.training.sharded_setup import build_train_setup
  from coma_jax.training.optim import OptimConfig, TrainableConfig
  from coma_jax.training.stage1 import Stage1StepConfig, make_stage1_step
  from coma_jax.training.stage2 import Stage2StepConfig, make_stage2_step
  from synthetic_examples import mixed_examples
  examples = mixed_examples(args.batch, args.stage, sizes=MIXED_SIZES)
  n = args.batch
  args.packed_len = args.packed_len or (1024 if args.stage == 1 else 512)
  if args.stage == 1:
    sides, unpacked = None, [(256, 576, 128), (512, 576, 256), (768, 576, 512)]
    packed = [(r, args.packed_len, args.packed_len * 5 // 4, args.packed_len // 2) for r in range(2, n + 1, 2)]
    step_cfg = Stage1StepConfig(mask='paper', loss_remat=False)
    make = lambda g, tx: make_stage1_step(g, tx, step_cfg)
  else:
    sides, unpacked = ('query', 'positive'), [(64, 0, 0), (128, 576, 0), (256, 576, 0)]
    packed = [(r, args.packed_len, args.packed_len * 7 // 4, 0) for r in range(2, 2 * n + 1, 2)]
    step_cfg = Stage2StepConfig(chunks=args.chunks)
    make = lambda g, tx: make_stage2_step(g, tx, step_cfg)
  results = {}
  with tempfile.TemporaryDirectory() as hf_dir:
    tiny_hf_model().save_pretrained(hf_dir)
    for mode, spec in (('unpacked', BatchSpec(None, parse_buckets(unpacked), 1, 32, sides=sides)),
                       ('packed', BatchSpec(None, None, 1, 32, sides=sides, packed_buckets=parse_packed_buckets(packed)))):
      model = load_pretrained(hf_dir)
      apply_adapters(model, AdapterConfig(rank=16, alpha=64, dropout=0.1), nnx.Rngs(0))
      spec.model_config = model.config
      batch, bucket, _ = step_batch(spec, examples, range(n))
      sets = [batch] if sides is None else [batch[k] for k in batch if k != 'example_ids']
      token_slots = sum(b['inputs'].input_ids.size for b in sets)
      tokens = sum(int(b['inputs'].token_valid.sum()) for b in sets)
      setup = build_train_setup(model, make_mesh((1, 1, 1), jax.devices()[:1]), make, rules=rules_dict(()),
                                optim=OptimConfig(total_steps=100), trainable=TrainableConfig())
      placed, holder = jax.device_put(batch), {'state': setup.state}

      def run():
        holder['state'], metrics = setup.step(holder['state'], placed, jax.random.key(0))
        jax.block_until_ready(metrics['loss'])
      seconds = time_it(run, args.steps)
      results[mode] = dict(seconds=seconds, rate=n / seconds, padding=1 - tokens / token_slots, bucket=bucket)
      print(f'{mode}: {seconds:.3f} s/step, {n / seconds:.2f} examples/s, token padding {1 - tokens / token_slots:.0%}, '
            f'bucket {bucket}', flush=True)
  u, p = results['unpacked'], results['packed']
  print(f'machine: {platform.machine()}, {os.cpu_count()} CPUs; stage {args.stage}, mixed lengths, batch {n}, '
        f'median of {args.steps} steps after 2 warm-up steps, fp32')
  print('| layout | s/step | examples/s | token padding | shape |\n|---|---|---|---|---|')
  for mode, r in results.items():
    print(f'| {mode} | {r["seconds"]:.3f} | {r["rate"]:.2f} | {r["padding"]:.0%} | {r["bucket"]} |')
  print(f'packed / unpacked examples/s: {p["rate"] / u["rate"]:.2f}x')


def tiny_hf_model():
  from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
  hf = Qwen2_5_VLConfig(
      text_config=dict(vocab_size=151936, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                       rope_parameters=dict(rope_type='default', rope_theta=1e6, mrope_section=[8, 12, 12])),
      vision_config=dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=256,
                         window_size=112, fullatt_block_indexes=[1, 3]), tie_word_embeddings=True)
  return Qwen2_5_VLForConditionalGeneration(hf)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--setting', default='uniform', choices=['uniform', 'mixed'])
  parser.add_argument('--packed_len', type=int, default=None,
                      help='mixed: the packed rows\' length (default 1024 for stage 1, 512 for stage 2)')
  parser.add_argument('--stage', type=int, default=1, choices=[1, 2])
  parser.add_argument('--chunks', type=int, default=2)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--length', type=int, default=256)
  args = parser.parse_args()
  import torch
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  if args.setting == 'mixed':
    mixed_packing(args)
    return
  if args.stage == 2:
    with tempfile.TemporaryDirectory() as hf_dir:
      tiny_hf_model().save_pretrained(hf_dir)
      pairs = build_pairs(args.batch, args.length)
      ours, batch = jax_stage2_time(hf_dir, pairs, args.length, args.steps, args.chunks)
      ref_style = torch_stage2_time(hf_dir, pairs, batch, args.steps, args.chunks, full_logits=True)
      equal = torch_stage2_time(hf_dir, pairs, batch, args.steps, args.chunks, full_logits=False)
    report(args, ours, None, ref_style, equal)
    return
  examples = build_examples(args.batch, args.length)
  with tempfile.TemporaryDirectory() as hf_dir:
    tiny_hf_model().save_pretrained(hf_dir)
    ours_causal, batch = jax_step_time(hf_dir, examples, args.length, args.steps, 'causal')
    ours_paper, _ = jax_step_time(hf_dir, examples, args.length, args.steps, 'paper')
    ref_style = torch_step_time(hf_dir, examples, batch, args.steps, equal_work=False)
    equal = torch_step_time(hf_dir, examples, batch, args.steps, equal_work=True)
  report(args, ours_causal, ours_paper, ref_style, equal)


def report(args, ours_causal, ours_paper, ref_style, equal):
  print(f'machine: {platform.machine()}, {os.cpu_count()} CPUs; stage {args.stage}, batch {args.batch}, '
        f'length {args.length}, 224 px images, median of {args.steps} steps after 2 warm-up steps, fp32')
  if args.stage == 2:
    print(f'| step | seconds |\n|---|---|\n| coma_jax, GradCache {args.chunks} chunks | {ours_causal:.3f} |\n'
          f'| torch reference-style (full logits, two-pass GradCache) | {ref_style:.3f} |\n'
          f'| torch equal-work (base model, two-pass GradCache) | {equal:.3f} |')
    print(f'reference-style ratio (torch / ours): {ref_style / ours_causal:.2f}x')
    print(f'equal-work ratio (torch / ours): {equal / ours_causal:.2f}x')
    return
  print(f'| step | seconds |\n|---|---|\n| coma_jax, causal mask | {ours_causal:.3f} |\n'
        f'| coma_jax, paper mask (2 attention calls) | {ours_paper:.3f} |\n'
        f'| torch reference-style (full logits) | {ref_style:.3f} |\n| torch equal-work (gathered head) | {equal:.3f} |')
  print(f'reference-style ratio (torch / ours, causal): {ref_style / ours_causal:.2f}x')
  print(f'equal-work ratio (torch / ours, causal): {equal / ours_causal:.2f}x')
  print(f'paper-mask cost over causal: {ours_paper / ours_causal:.2f}x')


if __name__ == '__main__':
  main()
