"""Orbax checkpoints of a run: `DIR/checkpoints/<step>/` with three items.

  params  the trainable parameters (fp32), on their own so a later stage can read just them;
  train   the optimizer state, the count of applied updates and of skipped ones;
  meta    JSON: the loop step, the data iterator's state, the seed the step keys derive from, the config.

Saves are asynchronous; retention keeps the latest `keep` plus the best by the validation metric.
Orbax writes each step under a temporary name and renames it when complete, so a half-written
checkpoint is never listed; restore takes the newest complete one.
"""
from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

log = logging.getLogger('coma_jax.train')


def abstract_like(tree):
  """ShapeDtypeStructs with shardings: Orbax restores straight into them (any mesh)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpoints:
  def __init__(self, workdir: str, *, keep: int, metric: str | None = None, higher_is_better: bool = False,
               read_only: bool = False):
    policies = [pp.LatestN(n=keep)]
    if metric:
      policies.append(pp.BestN(get_metric_fn=lambda m: m[metric], reverse=not higher_is_better, n=1,
                               keep_checkpoints_without_metrics=False))
    self.metric = metric
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    options = ocp.CheckpointManagerOptions(
        preservation_policy=pp.AnyPreservationPolicy(policies), enable_async_checkpointing=not read_only,
        cleanup_tmp_directories=not read_only, read_only=read_only, create=not read_only,
        best_fn=(lambda m: m[metric]) if metric else None, best_mode='max' if higher_is_better else 'min')
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return self.manager.best_step() if self.metric else None

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, params, train: dict, meta: dict, metrics: dict | None = None) -> None:
    args = ocp.args.Composite(params=ocp.args.StandardSave(params), train=ocp.args.StandardSave(train),
                              meta=ocp.args.JsonSave(meta))
    self.manager.save(step, args=args, metrics=metrics, force=True)

  def restore(self, step: int, params_like, train_like=None) -> tuple:
    """Restores into the shardings of the given (abstract or concrete) trees; `train_like=None`
    restores the params and meta only."""
    items = {'params': ocp.args.StandardRestore(abstract_like(params_like)), 'meta': ocp.args.JsonRestore()}
    if train_like is not None:
      items['train'] = ocp.args.StandardRestore(abstract_like(train_like))
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    return out['params'], out.get('train') if train_like is not None else None, out['meta']

  def delete(self, step: int) -> None:
    self.manager.delete(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
