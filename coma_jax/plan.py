"""The memory planner: compile a train step ahead of time on fake CPU devices, for any config and
mesh, without allocating, and print per-device memory and FLOPs.

  python -m coma_jax.plan --config configs/coma_3b.py:stage1 [--devices 8] [--config.mesh.shape=8,1,1]

It compiles the same decomposed stage-1 attention the GPU runs. What a CPU compile cannot tell:
fused attention kernels (cuDNN flash attention, TPU splash) never materialise the (L x L) score
matrices that the XLA path here does, so the attention share of the temp memory below is an
upper bound; and the GPU allocator's fragmentation is not modelled.
"""
from __future__ import annotations

import os
import sys


def _set_fake_devices(argv) -> int:
  # Must run before JAX creates its CPU client.
  n = 8
  for i, arg in enumerate(argv):
    if arg.startswith('--devices='):
      n = int(arg.split('=', 1)[1])
    elif arg == '--devices' and i + 1 < len(argv):
      n = int(argv[i + 1])
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={n}').strip()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  return n


def analytic_flops(cfg, batch: int, seq_len: int, vision_patches: int, mask: str, remat: str,
                   grad_cache: bool = False) -> dict:
  """Matmul FLOPs of one step (2 per multiply-add) over `batch` sequences. Frozen weights need
  input gradients only (x2 of forward); trainable adapters add little. Attention counts both
  paper-mode calls. GradCache adds one more forward of the LLM (pass 1)."""
  t, v = cfg.text, cfg.vision
  text_params = t.num_hidden_layers * (t.hidden_size * (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim
                                       + t.num_attention_heads * t.head_dim * t.hidden_size
                                       + 3 * t.hidden_size * t.intermediate_size)
  vision_params = v.depth * (4 * v.hidden_size**2 + 3 * v.hidden_size * v.intermediate_size)
  merger_params = (v.hidden_size * v.merge_unit) ** 2 + v.hidden_size * v.merge_unit * v.out_hidden_size
  text_fwd = 2 * text_params * batch * seq_len
  attn_calls = 2 if mask == 'paper' else 1
  attn_fwd = attn_calls * 2 * 2 * t.num_hidden_layers * batch * seq_len**2 * t.num_attention_heads * t.head_dim / 2
  vision_fwd = 2 * (vision_params + patch_params(v)) * batch * vision_patches + 2 * merger_params * batch * vision_patches / v.merge_unit
  forward = text_fwd + attn_fwd + vision_fwd
  text_backward = 2 * (text_fwd + attn_fwd)  # input grads through the frozen LLM (vision frozen: none)
  recompute = text_fwd + attn_fwd if remat == 'full' else 0
  extra_forward = text_fwd + attn_fwd if grad_cache else 0
  return {'forward': forward, 'step': forward + text_backward + recompute + extra_forward}


def patch_params(v) -> int:
  return v.patch_dim * v.hidden_size


def main(argv=None):
  argv = sys.argv if argv is None else argv
  n_devices = _set_fake_devices(argv)
  import jax
  from absl import app, flags
  from ml_collections import config_flags

  from coma_jax.parallel.mesh import make_mesh
  from coma_jax.training import from_config
  from coma_jax.training.abstract_batch import abstract_stage1_batch, abstract_stage2_batch
  from coma_jax.training.build import build_train_setup
  from coma_jax.training.stage2 import make_stage2_step
  from coma_jax.training.steps import make_stage1_step

  config = config_flags.DEFINE_config_file('config', None, 'config file[:variant]')
  flags.DEFINE_integer('devices', 8, 'fake CPU devices to plan for')
  flags.DEFINE_integer('bucket', -1, 'which bucket to plan (default: the largest)')

  def run(_):
    c = config.value
    model = from_config.build_model(c, abstract=True)
    mesh = make_mesh(tuple(c.mesh.shape), jax.devices()[:n_devices])
    rules = from_config.rules(c)
    stage2 = c.stage == 'stage2'
    if stage2:
      step_cfg = from_config.stage2_step_config(c)
      make_step = lambda g, tx: make_stage2_step(g, tx, step_cfg)
    else:
      step_cfg = from_config.stage1_step_config(c)
      make_step = lambda g, tx: make_stage1_step(g, tx, step_cfg)
    setup = build_train_setup(model, mesh, make_step, rules=rules,
                              optim=from_config.optim_config(c), trainable=from_config.trainable_config(c),
                              frozen_dtype=from_config.DTYPES[c.model.frozen_dtype],
                              frozen_replicated=c.mesh.frozen_replicated)
    bucket = from_config.buckets(c)[flags.FLAGS.bucket]
    if stage2:
      sides = ('query', 'positive', 'negative') if c.stage2.hard_negatives else ('query', 'positive')
      batch = abstract_stage2_batch(model.config, c.data.global_batch, bucket, c.stage1.num_compression_tokens,
                                    mesh, rules, sides)
    else:
      batch = abstract_stage1_batch(model.config, c.data.global_batch, bucket, c.stage1.num_compression_tokens,
                                    mesh, rules)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    compiled = setup.step.lower(setup.state, batch, key).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    flops = analytic_flops(model.config, c.data.global_batch * (len(batch) if stage2 else 1), bucket.seq_len,
                           bucket.vision_slots, 'causal' if stage2 else c.stage1.mask, c.model.remat,
                           grad_cache=stage2 and c.stage2.chunks > 1)
    n_params = sum(x.size for x in jax.tree.leaves(setup.state.params))
    n_frozen = sum(x.size for x in jax.tree.leaves(setup.state.frozen))
    gib = lambda b: b / 2**30
    print(f'plan: {c.stage} {os.path.basename(str(c.model.hf_config or "inline config"))} on mesh '
          f'{dict(mesh.shape)} ({n_devices} fake CPU devices)')
    split = (f'GradCache {c.stage2.chunks} chunks of {c.data.global_batch // c.stage2.chunks} per side'
             if stage2 else f'{c.stage1.micro_batches} micro-batches; mask {c.stage1.mask}')
    print(f'  global batch {c.data.global_batch} x bucket {bucket}, {split}; remat {c.model.remat}; '
          f'compute {c.model.dtype}, frozen {c.model.frozen_dtype}')
    print(f'  params: trainable {n_params:,} (fp32 + Adam), frozen {n_frozen:,}')
    print(f'  per-device memory: arguments {gib(mem.argument_size_in_bytes):.2f} GiB, outputs '
          f'{gib(mem.output_size_in_bytes):.2f} GiB (aliased {gib(mem.alias_size_in_bytes):.2f}), temp '
          f'{gib(mem.temp_size_in_bytes):.2f} GiB, code {gib(mem.generated_code_size_in_bytes):.3f} GiB')
    print(f'  peak estimate per device: {gib(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes):.2f} GiB')
    print(f'  FLOPs per step (analytic): forward {flops["forward"]:.3e}, step {flops["step"]:.3e} '
          f'({flops["step"] / n_devices:.3e} per device); XLA cost_analysis {cost.get("flops", float("nan")):.3e} '
          '(counts each scan body once: not a step total)')
    print('  not modelled on CPU: fused attention kernels (no L x L scores: the attention part of temp is an '
          'upper bound) and GPU allocator fragmentation.')

  app.run(run, argv=argv)


if __name__ == '__main__':
  main()
