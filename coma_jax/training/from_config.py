"""Config (ml_collections) -> the objects of a run: model, adapters, trainable set, optimiser,
step settings, mesh and rules. One place, shared by `train`, `plan` and the benchmarks."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from coma_jax.data.batching import Bucket, parse_buckets
from coma_jax.model.config import ModelConfig
from coma_jax.model.lora import AdapterConfig, apply_adapters, merge_adapters
from coma_jax.model.qwen2_5_vl import Qwen25VL
from coma_jax.parallel.rules import rules_dict
from coma_jax.training.optim import OptimConfig, TrainableConfig
from coma_jax.training.stage1 import Stage1StepConfig

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def model_config(c) -> ModelConfig:
  m = c.model
  if m.checkpoint:
    return ModelConfig.from_pretrained_dir(m.checkpoint)
  if m.hf_config:
    return ModelConfig.from_json_file(m.hf_config)
  raise ValueError('config.model needs checkpoint or hf_config')


def adapter_config(c) -> AdapterConfig | None:
  a = c.adapter
  if a.kind == 'none':
    return None
  if a.kind not in ('lora', 'dora'):
    raise ValueError(f'config.adapter.kind must be none, lora or dora, got {a.kind!r}')
  return AdapterConfig(rank=a.rank, alpha=a.alpha, dropout=a.dropout, dora=a.kind == 'dora', targets=tuple(a.targets))


def model_options(c) -> dict:
  """What `Qwen25VL` takes from config.model besides its architecture."""
  m = c.model
  return dict(dtype=DTYPES[m.dtype], param_dtype=jnp.float32, scan_layers=m.scan_layers, remat=m.remat,
              attention_impl=m.attention)


def model_factory(c, config: ModelConfig | None = None, *, options: dict | None = None, merge: bool = False,
                  then: AdapterConfig | None = None):
  """A function building the model `c` describes, with its adapters; `merge` folds them in and
  `then` adds fresh ones (a next stage's start). For `nnx.eval_shape`, `create_sharded` or a call."""
  config = config or model_config(c)
  options = options or model_options(c)
  adapters = adapter_config(c)

  def make():
    model = Qwen25VL(config, rngs=nnx.Rngs(c.seed), **options)
    if adapters is not None:
      apply_adapters(model, adapters, nnx.Rngs(c.seed + 1))
    if merge:
      merge_adapters(model)
    if then is not None:
      apply_adapters(model, then, nnx.Rngs(c.seed + 2))
    return model
  return make


def build_model(c, abstract: bool) -> Qwen25VL:
  """The model with its adapters; abstract (nothing allocated) for planning."""
  make = model_factory(c)
  return nnx.eval_shape(make) if abstract else make()


def trainable_config(c) -> TrainableConfig:
  return TrainableConfig(embeddings=c.trainable.embeddings, vision=c.trainable.vision, full=c.trainable.full)


def optim_config(c) -> OptimConfig:
  o = c.optim
  return OptimConfig(learning_rate=o.learning_rate, warmup_ratio=o.warmup_ratio, total_steps=c.train.steps,
                     weight_decay=o.weight_decay, clip_norm=o.clip_norm)


def first_trainable_row(c, first_compression_id: int) -> int | None:
  """Under embeddings='new_tokens_only', the rows from the first compression token on train."""
  return first_compression_id if c.trainable.embeddings == 'new_tokens_only' else None


def stage1_step_config(c, first_compression_id: int) -> Stage1StepConfig:
  s = c.stage1
  return Stage1StepConfig(mask=s.mask, normalisation=s.normalisation, micro_batches=s.micro_batches,
                          loss_chunk=s.loss_chunk, loss_remat=c.model.remat != 'none',
                          attention_impl=c.model.attention, label_budget=s.label_budget,
                          first_trainable_embedding_row=first_trainable_row(c, first_compression_id))


def buckets(c) -> tuple[Bucket, ...]:
  return parse_buckets([tuple(b) for b in c.data.buckets])


def packed_buckets(c):
  from coma_jax.data.packing import parse_packed_buckets
  return parse_packed_buckets([tuple(b) for b in c.data.packed_buckets])


def rules(c) -> dict:
  return rules_dict([tuple(r) for r in c.mesh.rules])


def stage2_step_config(c, first_compression_id: int):
  from coma_jax.training.stage2 import Stage2StepConfig
  s = c.stage2
  return Stage2StepConfig(temperature=s.temperature, bidirectional=s.bidirectional, hard_negatives=s.hard_negatives,
                          chunks=s.chunks, reuse_frozen_vision=s.reuse_frozen_vision,
                          attention_impl=c.model.attention,
                          first_trainable_embedding_row=first_trainable_row(c, first_compression_id))


def sides(c) -> tuple[str, ...]:
  return ('query', 'positive', 'negative') if c.stage2.hard_negatives else ('query', 'positive')
