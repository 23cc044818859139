"""A run from its config: the mesh, the tokenizer, the model (pretrained, random, or from a
workdir), the sharded train setup and the loaders. Shared by `train`, the planner and the tests
(which build runs abstractly, without allocating, for the 3B and 7B configs)."""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
from flax import nnx

from coma_jax.data.image import ImageSettings
from coma_jax.data.loaders import reference_subset_caps, stage1_loader, stage2_loader
from coma_jax.data.tokenizer import QwenTokenizer, load_tokenizer
from coma_jax.model.config import ModelConfig
from coma_jax.model.lora import apply_adapters, merge_adapters
from coma_jax.model.qwen2_5_vl import Qwen25VL
from coma_jax.parallel.mesh import make_mesh
from coma_jax.training import from_config
from coma_jax.training.sharded_setup import TrainSetup, build_train_setup, create_sharded
from coma_jax.training.config_checks import ConfigError, check_config
from coma_jax.training.stage2 import make_stage2_step
from coma_jax.training.stage1 import make_stage1_step


@dataclasses.dataclass
class Run:
  config: Any
  mesh: jax.sharding.Mesh
  rules: dict
  tokenizer: QwenTokenizer
  model_config: ModelConfig
  first_compression_id: int
  step_config: Any
  setup: TrainSetup
  base: dict  # how the frozen base is found again: {'kind': 'pretrained', path, sha256} or {'kind': 'saved'}

  @property
  def stage2(self) -> bool:
    return self.config.stage == 'stage2'

  def sequence_kw(self) -> dict:
    c = self.config
    kw = dict(num_compression_tokens=c.model.num_compression_tokens,
              image=ImageSettings(min_pixels=c.data.min_pixels, max_pixels=c.data.max_pixels),
              pixel_dtype=from_config.DTYPES[c.model.dtype])  # pixels travel in the compute dtype
    if not self.stage2:
      kw.update(label_mode=c.stage1.label_mode, multi_turn=c.stage1.multi_turn)
    return kw

  def train_loader(self, start_step: int):
    """Batches for loop steps start_step + 1 .. train.steps (data steps start_step .. steps - 1)."""
    c, d = self.config, self.config.data
    common = dict(global_batch=d.global_batch, buckets=[tuple(b) for b in d.buckets], seed=c.seed,
                  examples_per_group=d.examples_per_group, start_step=start_step, end_step=c.train.steps,
                  num_workers=d.num_workers, process_index=jax.process_index(), process_count=jax.process_count(),
                  on_bad_record=d.on_bad_record, max_bad_fraction=d.max_bad_fraction,
                  packed_buckets=[tuple(b) for b in d.packed_buckets] if d.packing else None,
                  max_per_row=d.max_per_row, **self.sequence_kw())
    if self.stage2:
      caps = reference_subset_caps() if d.subset_caps == 'reference' else None
      return stage2_loader(d.data_dir, self.model_config, self.tokenizer, block_size=d.block_size, caps=caps,
                           hard_negatives=c.stage2.hard_negatives, **common)
    return stage1_loader(d.data_dir, self.model_config, self.tokenizer, **common)


def parse_init_from(spec: str) -> tuple[str, int | None, bool]:
  """'DIR', 'DIR:step=N' or 'DIR:best' -> (DIR, step or None, best)."""
  path, _, tail = spec.partition(':')
  if not tail:
    return path, None, False
  if tail == 'best':
    return path, None, True
  if tail.startswith('step=') and tail[5:].isdigit():
    return path, int(tail[5:]), False
  raise ValueError(f"config.init_from: {spec!r}: expected 'DIR', 'DIR:step=N' or 'DIR:best'")


def make_model(c, mesh, rules, abstract: bool) -> tuple[Qwen25VL, dict]:
  """The model to train, with its adapters, and how its frozen base is recorded. From a workdir
  (`init_from`), stage 2 starts from the merged stage-1 weights with a fresh adapter."""
  from coma_jax.training import workdir as workdirs
  adapters = from_config.adapter_config(c)
  opts = from_config.model_options(c)
  if c.init_from:
    path, step, best = parse_init_from(c.init_from)
    merge = c.stage == 'stage2'
    if (c.model.checkpoint or c.model.hf_config) and from_config.model_config(c) != workdirs.read_model_config(path):
      raise ConfigError(f'config.init_from: {path} trained another model than config.model names '
                        f'({c.model.checkpoint or c.model.hf_config})')
    if abstract:
      source = from_config.model_factory(workdirs.read_config(path), workdirs.read_model_config(path),
                                         options=opts, merge=merge, then=adapters if merge else None)
      return nnx.eval_shape(source), {'kind': 'abstract'}
    model = workdirs.load_model(path, step=step, best=best, mesh=mesh, rules=rules, model_options=opts)
    if merge:
      merge_adapters(model)
    if adapters is not None and merge:
      apply_adapters(model, adapters, nnx.Rngs(c.seed + 1))
    return model, {'kind': 'saved'}
  if abstract:
    return from_config.build_model(c, abstract=True), {'kind': 'abstract'}
  config = from_config.model_config(c)
  if c.model.init == 'pretrained':
    from coma_jax.hf import load_pretrained
    model = load_pretrained(c.model.checkpoint, dtype=from_config.DTYPES[c.model.frozen_dtype], compute_dtype=opts['dtype'],
                            shardings=workdirs.param_sharding_fn(config, opts, mesh, rules),
                            **{k: opts[k] for k in ('scan_layers', 'remat', 'attention_impl')})
    if adapters is not None:
      apply_adapters(model, adapters, nnx.Rngs(c.seed + 1))
    return model, workdirs.pretrained_base_record(c.model.checkpoint)

  return create_sharded(from_config.model_factory(c, config), mesh, rules), {'kind': 'saved'}


def _init_from_embedding(c) -> dict | None:
  """The compression tokens (K, first id) and tokenizer an `init_from` workdir trained with."""
  if not c.init_from:
    return None
  import json
  path = parse_init_from(c.init_from)[0]
  meta_path = os.path.join(path, 'coma_embedding.json')
  if not os.path.isfile(meta_path):  # a planning stub holds the config alone
    return None
  with open(meta_path) as f:
    meta = json.load(f)
  from coma_jax.training.workdir import read_config
  return dict(meta, tokenizer_path=read_config(path).model.checkpoint or None)


def build_run(c, *, abstract: bool = False, devices=None) -> Run:
  """Checks the config (before anything compiles), then builds everything a run needs."""
  devices = list(devices if devices is not None else jax.devices())
  check_config(c, len(devices), jax.process_count(), abstract=abstract)
  mesh = make_mesh(tuple(c.mesh.shape), devices)
  rules = from_config.rules(c)
  source = _init_from_embedding(c)
  tokenizer = load_tokenizer(c.model.checkpoint or (source or {}).get('tokenizer_path') or None)
  model, base = make_model(c, mesh, rules, abstract)
  model_config = model.config
  first_id = tokenizer.add_compression_tokens(c.model.num_compression_tokens,
                                              embedding_rows=model_config.text.vocab_size)[0] \
      if c.model.num_compression_tokens else None  # stage 0 adds none
  # A stage-0 source (K = 0) trained no compression tokens: this run adds its own.
  if source and source['num_compression_tokens'] and (source['num_compression_tokens'], source['first_compression_token_id']) != (
      c.model.num_compression_tokens, first_id):
    raise ConfigError(f'config.model.num_compression_tokens: {c.model.num_compression_tokens} tokens from id '
                      f'{first_id}, but config.init_from trained {source["num_compression_tokens"]} from id '
                      f'{source["first_compression_token_id"]}')
  if c.stage == 'stage2':
    step_cfg = from_config.stage2_step_config(c, first_id)
    make_step = lambda g, tx: make_stage2_step(g, tx, step_cfg)
  else:
    step_cfg = from_config.stage1_step_config(c, first_id)
    make_step = lambda g, tx: make_stage1_step(g, tx, step_cfg)
  setup = build_train_setup(model, mesh, make_step, rules=rules, optim=from_config.optim_config(c),
                            trainable=from_config.trainable_config(c),
                            frozen_dtype=from_config.DTYPES[c.model.frozen_dtype],
                            frozen_replicated=c.mesh.frozen_replicated)
  return Run(c, mesh, rules, tokenizer, model_config, first_id, step_cfg, setup, base)

