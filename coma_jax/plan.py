"""The memory planner: compile a train step ahead of time on fake CPU devices, for any config and
mesh, without allocating, and print per-device memory and FLOPs.

  python -m coma_jax.plan --config configs/coma_3b.py:stage1 [--devices 8] [--config.mesh.shape=8,1,1]

It compiles the same decomposed stage-1 attention the GPU runs. `model.attention=auto` plans with
the blockwise path (a CPU compile cannot hold cuDNN or splash calls): like those kernels it never
materialises (L x L) scores, so the memory is what a fused run needs, give or take the kernels'
own workspace. Not modelled: the GPU allocator's fragmentation.
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


def main(argv=None):
  argv = sys.argv if argv is None else argv
  n_devices = _set_fake_devices(argv)
  import jax
  from absl import app, flags
  from ml_collections import config_flags

  from coma_jax.parallel.mesh import make_mesh
  from coma_jax.data.batching import Bucket
  from coma_jax.training import from_config
  from coma_jax.training.abstract_batch import abstract_stage1_batch, abstract_stage2_batch
  from coma_jax.training.sharded_setup import build_train_setup
  from coma_jax.training.flops import step_flops
  from coma_jax.training.stage2 import make_stage2_step
  from coma_jax.training.stage1 import make_stage1_step

  config = config_flags.DEFINE_config_file('config', None, 'config file[:variant]')
  flags.DEFINE_integer('devices', 8, 'fake CPU devices to plan for')
  flags.DEFINE_integer('bucket', -1, 'which bucket to plan (default: the largest)')

  def run(_):
    c = config.value
    from_auto = c.model.attention == 'auto'
    if from_auto:  # what GPU/TPU runs would take needs their backends: plan blockwise
      c.model.attention = 'blockwise'
    from coma_jax.data.tokenizer import load_tokenizer
    first_compression_id = load_tokenizer(c.model.checkpoint or None).add_compression_tokens(
        c.model.num_compression_tokens)[0]
    model = from_config.build_model(c, abstract=True)
    mesh = make_mesh(tuple(c.mesh.shape), jax.devices()[:n_devices])
    rules = from_config.rules(c)
    stage2 = c.stage == 'stage2'
    if stage2:
      step_cfg = from_config.stage2_step_config(c, first_compression_id)
      make_step = lambda g, tx: make_stage2_step(g, tx, step_cfg)
    else:
      step_cfg = from_config.stage1_step_config(c, first_compression_id)
      make_step = lambda g, tx: make_stage1_step(g, tx, step_cfg)
    setup = build_train_setup(model, mesh, make_step, rules=rules,
                              optim=from_config.optim_config(c), trainable=from_config.trainable_config(c),
                              frozen_dtype=from_config.DTYPES[c.model.frozen_dtype],
                              frozen_replicated=c.mesh.frozen_replicated)
    pixel_dtype, k, n = from_config.DTYPES[c.model.dtype], c.model.num_compression_tokens, c.data.global_batch
    n_sides = len(from_config.sides(c)) if stage2 else 1
    if c.data.packing:  # rows of several examples; each row its own vision group
      packed = from_config.packed_buckets(c)[flags.FLAGS.bucket]
      bucket, rows, groups = Bucket(packed.seq_len, packed.vision_slots, packed.label_slots), packed.rows, packed.rows
      if stage2:
        batch = abstract_stage2_batch(model.config, n, bucket, k, mesh, rules, from_config.sides(c), pixel_dtype,
                                      packed_rows=rows, slots_per_row=c.data.max_per_row)
      else:
        batch = abstract_stage1_batch(model.config, rows, bucket, k, mesh, rules, pixel_dtype=pixel_dtype,
                                      slots_per_row=c.data.max_per_row, examples=n)
    else:
      bucket = from_config.buckets(c)[flags.FLAGS.bucket]
      rows, groups = n * n_sides, n * n_sides // c.data.examples_per_group
      if stage2:
        batch = abstract_stage2_batch(model.config, n, bucket, k, mesh, rules, from_config.sides(c), pixel_dtype)
      else:
        batch = abstract_stage1_batch(model.config, n, bucket, k, mesh, rules, pixel_dtype=pixel_dtype)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    compiled = setup.step.lower(setup.state, batch, key).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    flops = step_flops(model.config, sequences=rows, length=bucket.seq_len,
                       vision_patches=groups * bucket.vision_slots,
                       label_positions=0 if stage2 else rows * bucket.label_slots,
                       llm_trains=c.trainable.full, vision_trains=c.trainable.vision or c.trainable.full,
                       paper_mask=not stage2 and c.stage1.mask == 'paper', full_remat=c.model.remat == 'full',
                       grad_cache=stage2 and c.stage2.chunks > 1,
                       reused_vision=stage2 and c.stage2.reuse_frozen_vision and not (c.trainable.vision or c.trainable.full))
    n_params = sum(x.size for x in jax.tree.leaves(setup.state.params))
    n_frozen = sum(x.size for x in jax.tree.leaves(setup.state.frozen))
    gib = lambda b: b / 2**30
    print(f'plan: {c.stage} {os.path.basename(str(c.model.hf_config or "inline config"))} on mesh '
          f'{dict(mesh.shape)} ({n_devices} fake CPU devices)')
    per_chunk = (rows if c.data.packing else rows // n_sides) // (c.stage2.chunks if stage2 else 1)
    unit = 'packed rows' if c.data.packing else 'rows per side'
    split = (f'GradCache {c.stage2.chunks} chunks of {per_chunk} {unit}'
             if stage2 else f'{c.stage1.micro_batches} micro-batches; mask {c.stage1.mask}')
    shape = f'{rows} packed rows x {bucket}' if c.data.packing else f'bucket {bucket}'
    print(f'  global batch {c.data.global_batch} examples, {shape}, {split}; remat {c.model.remat}; '
          f'compute {c.model.dtype}, frozen {c.model.frozen_dtype}')
    print(f'  params: trainable {n_params:,} (fp32 + Adam), frozen {n_frozen:,}')
    print(f'  per-device memory: arguments {gib(mem.argument_size_in_bytes):.2f} GiB, outputs '
          f'{gib(mem.output_size_in_bytes):.2f} GiB (aliased {gib(mem.alias_size_in_bytes):.2f}), temp '
          f'{gib(mem.temp_size_in_bytes):.2f} GiB, code {gib(mem.generated_code_size_in_bytes):.3f} GiB')
    print(f'  peak estimate per device: {gib(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes):.2f} GiB')
    print(f'  FLOPs per step (analytic, training/flops.py): model {flops.model:.3e} (MFU), executed '
          f'{flops.executed:.3e} (HFU; {flops.executed / n_devices:.3e} per device); XLA cost_analysis '
          f'{cost.get("flops", float("nan")):.3e} (counts each scan body once: not a step total)')
    scores = {'blockwise': ' (no L x L scores, as with the fused kernels)', 'xla': ' (keeps L x L scores)'}
    print(f'  attention {c.model.attention}{" (from auto)" if from_auto else ""}{scores.get(c.model.attention, "")}; '
          "not modelled on CPU: fused kernels' workspace, GPU allocator fragmentation.")

  app.run(run, argv=argv)


if __name__ == '__main__':
  main()
