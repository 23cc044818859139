"""Validation during training, on sources named by the config's data_dir:

  stage 1: the loss (no dropout) on stage1_qa's validation split, its first `max_examples` records;
  stage 2: Precision@1 on mmeb_eval, up to `max_examples` queries per dataset, plus the embeddings'
           mean pairwise cosine similarity (near 1: the embeddings collapsed).

Single-process for now: with several processes every process would embed the same records.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx

from coma_jax.data.formats import Side, check_text
from coma_jax.data.loaders import open_builder, stage1_loader
from coma_jax.data.pipeline import to_global
from coma_jax.eval.embedder import Embedder
from coma_jax.eval.mmeb_scores import mean_cosine, score_dataset
from coma_jax.model.inputs import BATCH_AXIS
from coma_jax.parallel.activations import under_rules
from coma_jax.parallel.rules import batch_sharding
from coma_jax.training.stage1 import make_stage1_eval
from coma_jax.training.workdir import embedding_metadata



def _sharding_for(run):
  return lambda name, shape: batch_sharding(shape, BATCH_AXIS.get(name, 0), run.rules, run.mesh)


class Stage1Validation:
  metric, higher_is_better = 'loss', False

  def __init__(self, run):
    self.run = run
    c = run.config
    source = open_builder(c.data.data_dir, 'stage1_qa').as_data_source()
    if 'validation' not in source:
      raise ValueError(f'config.validation.every: stage1_qa under {c.data.data_dir} has no validation split '
                       '(build it with --validation-input, or set validation.every=0)')
    n = min(len(source['validation']), c.validation.max_examples)
    if n < c.data.global_batch:  # found now, not after validation.every steps of training
      raise ValueError(f'config.validation.max_examples: {n} validation records (of stage1_qa\'s '
                       f'{len(source["validation"])}) are fewer than one data.global_batch of {c.data.global_batch}')
    self.steps = n // c.data.global_batch
    self.evaluate = jax.jit(under_rules(make_stage1_eval(run.setup.graphdef, run.step_config), run.mesh, run.rules))

  def __call__(self, state) -> dict:
    c, run = self.run.config, self.run
    loader = stage1_loader(c.data.data_dir, run.model_config, run.tokenizer, global_batch=c.data.global_batch,
                           buckets=[tuple(b) for b in c.data.buckets], seed=0, split='validation',
                           examples_per_group=c.data.examples_per_group, end_step=self.steps,
                           on_bad_record=c.data.on_bad_record, max_bad_fraction=1.0, **run.sequence_kw())
    numerator = denominator = 0.0
    for _, batch, _ in loader:
      num, den = self.evaluate(state.params, state.frozen, to_global(batch, _sharding_for(run)))
      numerator, denominator = numerator + float(num), denominator + float(den)
    return {'loss': numerator / max(denominator, 1.0)}


class Stage2Validation:
  """Embeds through `Embedder`, the evaluation's own code path, with the training state's weights."""
  metric, higher_is_better = 'p_at_1', True

  def __init__(self, run):
    self.run = run
    c = run.config
    builder = open_builder(c.data.data_dir, 'mmeb_eval')
    self.image_root = (builder.info.metadata.get('fingerprint') or {}).get('image_root')
    names = builder.info.metadata.get('split_names', {})
    sources = builder.as_data_source()
    self.datasets = {names.get(s, s): [sources[s][i] for i in range(min(len(sources[s]), c.validation.max_examples))]
                     for s in sorted(sources)}
    self.embedder = None  # made at the first call, from the weights it gets

  def _side(self, text, path) -> Side:
    text = check_text(text, 'eval', 'text')
    path = check_text(path, 'eval', 'image')
    if path and self.image_root and not os.path.isabs(path):
      path = os.path.join(self.image_root, path)
    return Side(text, path or None)

  def __call__(self, state) -> dict:
    run, c = self.run, self.run.config
    model = nnx.merge(run.setup.graphdef, state.params, state.frozen)
    if self.embedder is None:
      # Several processes: the training mesh (its weights live there), each process one slice.
      mesh = dict(mesh=run.mesh, rules=run.rules) if jax.process_count() > 1 else {}
      self.embedder = Embedder(model, run.tokenizer, embedding_metadata(c, run.first_compression_id), **mesh)
    weights = nnx.state(model)
    scores, spreads = {}, []
    for name, records in self.datasets.items():
      queries = [self._side(r['qry_text'], r['qry_img_path']) for r in records]
      cands = [[self._side(t, p) for t, p in zip(r['tgt_text'], r['tgt_img_path'])] for r in records]
      reps = self.embedder.encode_sides(queries + [s for cs in cands for s in cs], c.data.global_batch,
                                        state=weights)
      q, rest, grouped = reps[:len(queries)], reps[len(queries):], []
      for cs in cands:
        grouped.append(rest[:len(cs)])
        rest = rest[len(cs):]
      scores[name] = score_dataset(q, grouped, 'reference')['p_at_1']  # as the evaluation scores it
      spreads.append(mean_cosine(q))
    out = {'p_at_1': float(np.mean(list(scores.values()))), 'mean_cosine': float(np.nanmean(spreads))}
    out.update({f'p_at_1/{name}': v for name, v in scores.items()})
    return out


def make_validation(run):
  return Stage2Validation(run) if run.stage2 else Stage1Validation(run)
