"""The training loop: real loaders into the jitted step, metrics, validation, Orbax checkpoints,
exact resume and preemption.

Loop step s (1..train.steps) trains on data step s - 1 with the key fold_in(key(seed), s), so a
run resumed from a checkpoint at step s continues exactly as the uninterrupted run would. On a
restart the newest complete checkpoint is restored and metrics.jsonl / TensorBoard are cut after
its step, so no step appears twice. SIGTERM saves at the next step boundary and exits 0.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time

import jax
import numpy as np

from coma_jax.data.pipeline import to_global
from coma_jax.model.inputs import BATCH_AXIS
from coma_jax.parallel.rules import batch_sharding
from coma_jax.training import from_config, workdir as workdirs
from coma_jax.training.flops import batch_flops, device_peak_flops
from coma_jax.training.metrics_writer import MetricsWriter
from coma_jax.training.optim import schedule
from coma_jax.training.preemption import Preemption
from coma_jax.training.run import Run, build_run
from coma_jax.training.stage2 import row_sets
from coma_jax.training.train_state import TrainState

log = logging.getLogger('coma_jax.train')


# Keys a resumed run may change: they do not change what is computed.
RESUMABLE_CHANGES = ('data.num_workers', 'data.data_dir', 'checkpoint.', 'validation.')


def _config_changes(stored: dict, current: dict) -> list[str]:
  flat = lambda d, p='': {k2: v2 for k, v in d.items() for k2, v2 in (
      flat(v, f'{p}{k}.').items() if isinstance(v, dict) else [(f'{p}{k}', v)])}
  a, b = flat(stored), flat(current)
  return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_CHANGES)]


def _restore_latest(ckpts, state: TrainState, config: dict | None = None) -> tuple[int, TrainState, dict]:
  """The newest checkpoint that restores. A damaged one is deleted, with a warning (else a rerun
  would skip saving that step and lose the progress again); a config that changed is refused."""
  for step in sorted(ckpts.all_steps(), reverse=True):
    try:
      params, train, meta = ckpts.restore(step, state.params,
                                          {'opt_state': state.opt_state, 'step': state.step, 'skipped': state.skipped})
      if meta.get('loop_step') != step:
        raise ValueError(f'its metadata says step {meta.get("loop_step")}')
    except Exception as e:  # noqa: BLE001 -- a damaged checkpoint: fall back to the previous one
      log.warning('checkpoint %d does not restore (%s: %s); deleting it and trying the previous one', step,
                  type(e).__name__, str(e)[:500])
      ckpts.delete(step)
      continue
    changed = _config_changes(meta.get('config') or {}, config) if config is not None and meta.get('config') else []
    if changed:
      raise ValueError(f'this workdir was trained with another config ({", ".join(changed[:10])} differ): resume '
                       'with the same config, or train in a new --workdir')
    return step, TrainState(step=train['step'], params=params, frozen=state.frozen, opt_state=train['opt_state'],
                            skipped=train['skipped']), meta
  return 0, state, {}


def _leftover_tmp(directory: str) -> list[str]:
  if not os.path.isdir(directory):
    return []
  return [d for d in os.listdir(directory) if not d.isdigit()]


class Progress:
  """A tqdm bar on a terminal, plain log lines otherwise."""

  def __init__(self, total: int, start: int, log_every: int = 10):
    self.total, self.log_every, self.bar = total, log_every, None
    if sys.stderr.isatty():
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=start, unit='step', dynamic_ncols=True)

  def update(self, step: int, metrics: dict) -> None:
    if self.bar is not None:
      self.bar.update(1)
      self.bar.set_postfix(loss=f'{metrics["loss"]:.4f}', sps=f'{metrics["steps_per_s"]:.2f}')
    elif step % self.log_every == 0 or step == self.total:
      eta = (self.total - step) / max(metrics['steps_per_s'], 1e-9)
      log.info('step %d/%d loss %.4f %.2f steps/s eta %.0f s', step, self.total, metrics['loss'],
               metrics['steps_per_s'], eta)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def _flops(run: Run, sides: list):
  """Model and executed FLOPs of this step's row sets, over every process."""
  c = run.config
  vision_trains = c.trainable.vision or c.trainable.full
  return batch_flops(run.model_config, sides, processes=jax.process_count(), llm_trains=c.trainable.full,
                     vision_trains=vision_trains, paper_mask=not run.stage2 and c.stage1.mask == 'paper',
                     full_remat=c.model.remat == 'full', grad_cache=run.stage2 and c.stage2.chunks > 1,
                     reused_vision=run.stage2 and c.stage2.reuse_frozen_vision and not vision_trains)


def _packing_warning(c) -> None:
  from coma_jax.model import attention_kernels
  if c.data.packing and jax.default_backend() == 'gpu' and c.model.attention in ('auto', 'cudnn') \
      and attention_kernels.packed_cudnn_call() is None:
    log.warning('data.packing on a GPU without cuDNN\'s packed layout (attention_kernels.PACKED_CUDNN off, or this '
                'JAX lacks it): packed rows run the blockwise attention path. Measured on an H100, 3B, so: '
                '0.41x (stage 1) and 0.89x (stage 2) the examples/s of unpacked cuDNN steps. Consider '
                '--config.data.packing=False (docs/packing.md).')


def _collapse_warning(run: Run, loss: float, history: list) -> None:
  """Contrastive collapse: the loss sits at ln(candidates), i.e. every score is the same."""
  c = run.config
  chance = math.log(c.data.global_batch * (2 if c.stage2.hard_negatives else 1))
  history.append(abs(loss - chance) < 0.01 * chance)
  if len(history) >= 20 and all(history[-20:]) and len(history) % 20 == 0:
    log.warning('COLLAPSE? the contrastive loss has sat at ln(%d) = %.3f for 20 steps: every candidate scores the '
                'same. Likely causes: a learning rate too high (optim.learning_rate=%g), a temperature too low or '
                'high (stage2.temperature=%g).', round(math.exp(chance)), chance, c.optim.learning_rate,
                c.stage2.temperature)


def train(c, workdir: str, profile_steps: tuple[int, int] | None = None, devices=None) -> int:
  """Runs (or resumes) the config's training in `workdir` (on `devices`, default all); returns
  the exit code."""
  preemption = Preemption().install()  # before the (long) set-up: a SIGTERM then stops at step 0
  run = build_run(c, devices=devices)
  _packing_warning(c)
  workdir = os.path.abspath(workdir)
  workdirs.check_same_base(workdir, run.base)
  workdirs.write_run_files(workdir, c, run.model_config, run.first_compression_id, run.base)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  for name in _leftover_tmp(ckpt_dir):
    log.warning('%s: a half-written checkpoint (%s) is ignored and removed', ckpt_dir, name)
  ckpts = workdirs.checkpoints_of(workdir, c, read_only=False)
  writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
  config_json = json.loads(c.to_json_best_effort())
  start, state, meta = _restore_latest(ckpts, run.setup.state, config_json)
  run.setup.state = None  # the fresh initial state: restored over, or donated by the first step
  writer.truncate_after(start)  # a run killed before its first checkpoint wrote steps that rerun now
  if start:
    log.info('resuming from checkpoint %d', start)
    if run.base['kind'] == 'saved':  # the frozen weights this run started from, not a rebuilt copy
      state = state.replace(frozen=workdirs.restore_base(workdir, state.frozen))
  elif run.base['kind'] == 'saved':
    workdirs.save_base(workdir, state.frozen)
  if start >= c.train.steps:
    log.info('already trained %d steps', start)
    preemption.uninstall()
    ckpts.close()
    writer.close()
    return 0

  validation = None
  if c.validation.every:
    from coma_jax.training.validation import make_validation
    validation = make_validation(run)
  loader = run.train_loader(start)
  progress = Progress(c.train.steps, start)
  lr_at = schedule(from_config.optim_config(c))
  root = jax.random.key(c.seed)
  peak = device_peak_flops()
  sharding_for = lambda name, shape: batch_sharding(shape, BATCH_AXIS.get(name, 0), run.rules, run.mesh)
  collapse_history: list = []
  if meta.get('data', {}).get('bad_records'):  # the skip report continues across restarts
    loader.restore_report(meta['data']['bad_records'])

  def save(step: int, metrics: dict | None = None, report: dict | None = None) -> None:
    if step == 0 or step in ckpts.all_steps():  # preempted right after a scheduled save, or before any step
      return
    train_items = {'opt_state': state.opt_state, 'step': state.step, 'skipped': state.skipped}
    report = loader.report() if report is None else report
    meta = {'loop_step': step, 'data': {'step': step, 'bad_records': report}, 'seed': c.seed,
            'key': 'fold_in(key(seed), loop step)', 'config': config_json}
    ckpts.save(step, state.params, train_items, meta, metrics=metrics)

  step = start
  try:
    for step in range(start + 1, c.train.steps + 1):
      if profile_steps and step == profile_steps[0]:
        jax.profiler.start_trace(os.path.join(workdir, 'profile'))
      began = time.perf_counter()
      report_before = loader.report()  # a preemption saves step - 1: without this batch's bad records
      try:
        data_step, batch, info = next(loader)
      except Exception:
        if not preemption.requested:
          raise
        batch = None  # grain's workers took the SIGTERM too
      # The stop is agreed after the (local) fetch and before the (collective) step, so every
      # process reaches this point at every step, whatever its loader did.
      if preemption.agreed():
        save(step - 1, report=report_before)
        step -= 1
        break
      assert data_step == step - 1, (data_step, step)
      sets = [batch[s] for s in row_sets(batch)] if run.stage2 else [batch]
      tokens = sum(int(b['inputs'].token_valid.sum()) for b in sets)
      flops = _flops(run, sets)
      state, out = run.setup.step(state, to_global(batch, sharding_for), jax.random.fold_in(root, step))
      out = jax.device_get(out)
      seconds = time.perf_counter() - began
      per_side = isinstance(info.bucket, dict)  # stage 2 unpacked: a bucket and stats per side
      stats = list(info.stats.values()) if per_side else [info.stats]
      bucket = info.bucket['query'] if per_side else info.bucket
      applied = int(state.step) - int(out['finite'])
      record = {
          'loss': float(out['loss']), 'lr': float(lr_at(applied)), 'grad_norm': float(out['grad_norm']),
          'skipped_updates': int(out['skipped']), 'bad_records': int(info.bad_records),
          'samples_per_s': c.data.global_batch / seconds, 'tokens_per_s': tokens * jax.process_count() / seconds,
          'steps_per_s': 1.0 / seconds,
          'padding_waste': float(np.mean([s['token_padding_waste'] for s in stats])),
          'truncations': int(sum(sum(s['cuts'].values()) for s in stats)),
          'bucket_seq_len': bucket.seq_len, 'bucket_vision_slots': bucket.vision_slots,
          'mfu': None if peak is None else flops.model / seconds / (peak * jax.device_count()),
          'hfu': None if peak is None else flops.executed / seconds / (peak * jax.device_count()),
      }
      if 'label_budget_fallbacks' in out:  # stage 1: micro-batches whose labels overran stage1.label_budget
        record['label_budget_fallbacks'] = int(out['label_budget_fallbacks'])
      writer.write(step, record)
      progress.update(step, record)
      if run.stage2:
        _collapse_warning(run, record['loss'], collapse_history)
      if profile_steps and step == profile_steps[1]:
        jax.profiler.stop_trace()
      val = None
      if validation is not None and (step % c.validation.every == 0 or step == c.train.steps):
        val = validation(state)
        writer.write(step, val, split='validation')
        log.info('validation at step %d: %s', step, {k: round(v, 4) for k, v in val.items()})
        if run.stage2 and val.get('mean_cosine', 0) > 0.99:
          log.warning('COLLAPSE? validation embeddings have mean cosine %.3f: they barely differ. Likely causes: '
                      'a learning rate too high, a temperature too low or high.', val['mean_cosine'])
      if step % c.checkpoint.every == 0 or step == c.train.steps:
        save(step, {validation.metric: val[validation.metric]} if val is not None else None)
  finally:
    if profile_steps and profile_steps[0] <= step < profile_steps[1]:
      jax.profiler.stop_trace()
    preemption.uninstall()
    progress.close()
    ckpts.wait()
    ckpts.close()
    writer.close()
  if jax.process_index() == 0:
    from coma_jax.plot import write_plots
    log.info('plots: %s', write_plots(workdir))
  compiled = run.setup.step._cache_size() if hasattr(run.setup.step, '_cache_size') else None
  log.info('step compilations in this process: %s', compiled)
  if step < c.train.steps:
    log.info('preempted: saved step %d; rerun the same command to resume', step)
  return 0
