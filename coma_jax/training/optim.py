"""AdamW with a warmup + cosine schedule, global-norm clipping, and the trainable-set filter."""
from __future__ import annotations

import dataclasses

import optax
from flax import nnx

from coma_jax.model.lora import AdapterParam

EMBEDDING_MODES = ('all', 'new_tokens_only', 'none')


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  learning_rate: float = 5e-5
  warmup_ratio: float = 0.05
  total_steps: int = 1000
  weight_decay: float = 0.0
  clip_norm: float = 1.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8


def schedule(cfg: OptimConfig):
  """Linear warmup over warmup_ratio of the steps, then cosine decay to 0 at total_steps."""
  warmup = int(round(cfg.warmup_ratio * cfg.total_steps))
  if warmup == 0:
    return optax.cosine_decay_schedule(cfg.learning_rate, max(cfg.total_steps, 1))
  return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, max(cfg.total_steps, warmup + 1), 0.0)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm else optax.identity(),
                     optax.adamw(schedule(cfg), cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay))


@dataclasses.dataclass(frozen=True)
class TrainableConfig:
  """What trains: adapters (always, when present), embedding rows, the vision tower, or all."""
  embeddings: str = 'all'
  vision: bool = False
  full: bool = False

  def __post_init__(self):
    if self.embeddings not in EMBEDDING_MODES:
      raise ValueError(f'trainable embeddings must be one of {EMBEDDING_MODES}, got {self.embeddings!r}')

  def filter(self):
    """An nnx filter (path, variable) -> bool selecting the trainable parameters."""
    def trainable(path, var):
      if not isinstance(var, nnx.Param):
        return False
      if self.full or isinstance(var, AdapterParam):
        return True
      if path[:2] == ('embed_tokens', 'embedding'):
        return self.embeddings != 'none'
      return self.vision and path[0] == 'visual' and 'base' not in path
    return trainable

