"""The workdir of a run, which other tools read:

  DIR/config.json           the resolved config
  DIR/model_config.json     the model's Qwen2.5-VL config (HF layout): the architecture, self-contained
  DIR/coma_embedding.json   everything the embedding depends on (the evaluation and export read it)
  DIR/base.json             where the frozen base weights are: saved in DIR/base/, or a pretrained
                            checkpoint directory with its content hash (checked on load)
  DIR/checkpoints/          Orbax (see checkpoint.py);  DIR/metrics.jsonl, DIR/tensorboard/, DIR/plots/

`load_model(DIR, step=None, best=False)` rebuilds the trained model from these alone.
"""
from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from coma_jax.data.sequences import STAGE1_INSTRUCTION
from coma_jax.model.config import ModelConfig
from coma_jax.model.lora import apply_adapters
from coma_jax.model.qwen2_5_vl import Qwen25VL
from coma_jax.parallel.rules import head_units, state_shardings
from coma_jax.training import from_config
from coma_jax.training.checkpoint import Checkpoints, abstract_like


def _write_json(path: str, obj) -> None:
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{workdir} is not a coma_jax workdir: no config.json')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def embedding_metadata(c, first_compression_id: int) -> dict:
  return {
      'format': 'coma_jax/1',
      'stage': c.stage,
      'num_compression_tokens': c.model.num_compression_tokens,
      'first_compression_token_id': first_compression_id,
      'compression_token': '<|ctoken_pad_{i}|>',
      'pooling': 'mean over the compression tokens of the final-norm hidden states',
      'normalisation': 'l2',
      'min_pixels': c.data.min_pixels,
      'max_pixels': c.data.max_pixels,
      'sequence': '{text, <|image_1|> replaced by <|vision_start|><|image_pad|>*N<|vision_end|>}'
                  '{K compression tokens}',
      'instruction_format': 'MMEB: the instruction is part of the text (e.g. "<|image_1|>\\nRepresent the '
                            'given image.")',
      'stage1_instruction': STAGE1_INSTRUCTION,
      'dtype': c.model.dtype,
  }


def write_run_files(workdir: str, c, model_config: ModelConfig, first_compression_id: int, base: dict) -> None:
  """config.json, model_config.json, coma_embedding.json and base.json (process 0 only)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  _write_json(os.path.join(workdir, 'config.json'), json.loads(c.to_json_best_effort()))
  _write_json(os.path.join(workdir, 'model_config.json'), model_config.to_hf_dict())
  _write_json(os.path.join(workdir, 'coma_embedding.json'), embedding_metadata(c, first_compression_id))
  _write_json(os.path.join(workdir, 'base.json'), base)


def directory_hash(path: str) -> str:
  """SHA-256 over a checkpoint directory's config.json and safetensors files (names and bytes)."""
  sha = hashlib.sha256()
  for name in sorted(os.listdir(path)):
    if name == 'config.json' or name.endswith('.safetensors'):
      sha.update(name.encode())
      with open(os.path.join(path, name), 'rb') as f:
        for block in iter(lambda: f.read(1 << 24), b''):
          sha.update(block)
  return sha.hexdigest()


def pretrained_base_record(path: str) -> dict:
  return {'kind': 'pretrained', 'path': os.path.abspath(path), 'sha256': directory_hash(path)}


def check_same_base(workdir: str, base: dict) -> None:
  """A rerun in an existing workdir must start from the same pretrained base it recorded."""
  path = os.path.join(workdir, 'base.json')
  if not os.path.isfile(path) or base.get('kind') != 'pretrained':
    return
  with open(path) as f:
    recorded = json.load(f)
  if recorded.get('kind') == 'pretrained' and recorded.get('sha256') != base.get('sha256'):
    raise ValueError(f'{workdir} was trained from {recorded.get("path")} (content hash {recorded.get("sha256")}); '
                     f'{base.get("path")} differs. Use the same checkpoint or a new --workdir')


def restore_base(workdir: str, frozen_like):
  """The frozen weights saved when this run started, into the shardings of `frozen_like`."""
  if not jax.tree.leaves(frozen_like):  # everything trains (trainable.full): no base was saved
    return frozen_like
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.join(os.path.abspath(workdir), 'base'), abstract_like(frozen_like))


def save_base(workdir: str, frozen) -> None:
  """The frozen weights (random init, or merged from an earlier stage), once per run."""
  path = os.path.join(os.path.abspath(workdir), 'base')
  if os.path.isdir(path) or not jax.tree.leaves(frozen):  # nothing frozen: the checkpoints hold it all
    return
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, frozen)


def param_sharding_fn(model_config: ModelConfig, options: dict, mesh, rules):
  """(param path, shape) -> its NamedSharding, for `load_pretrained` to place each tensor."""
  abstract = nnx.eval_shape(lambda: Qwen25VL(model_config, rngs=nnx.Rngs(0), **options))
  shardings = state_shardings(nnx.state(abstract), rules, mesh, units=head_units(model_config))
  flat = {tuple(str(k) for k in path): var.value for path, var in nnx.to_flat_state(shardings)}
  return lambda path, shape: flat[tuple(str(k) for k in path)]


def read_model_config(workdir: str) -> ModelConfig:
  with open(os.path.join(workdir, 'model_config.json')) as f:
    return ModelConfig.from_hf_dict(json.load(f))


def _metric(c) -> str | None:
  if not c.validation.every:
    return None
  return 'p_at_1' if c.stage == 'stage2' else 'loss'


def checkpoints_of(workdir: str, c=None, read_only: bool = True) -> Checkpoints:
  c = c if c is not None else read_config(workdir)
  return Checkpoints(workdir, keep=c.checkpoint.keep, metric=_metric(c), higher_is_better=c.stage == 'stage2',
                     read_only=read_only)


def load_model(workdir: str, *, step: int | None = None, best: bool = False, mesh=None, rules=None,
               model_options: dict | None = None) -> Qwen25VL:
  """The model a workdir trained, at its final step (or `step`, or its best): the trained
  parameters from the checkpoint over the frozen base; adapters as trained (not merged)."""
  c = read_config(workdir)
  model_config = read_model_config(workdir)
  options = model_options or from_config.model_options(c)
  if mesh is None:
    from coma_jax.parallel.mesh import make_mesh
    mesh = make_mesh((-1, 1, 1))
  rules = rules if rules is not None else from_config.rules(c)
  ckpts = checkpoints_of(workdir, c)
  which = ckpts.best_step() if best else step if step is not None else ckpts.latest_step()
  if which is None:
    raise FileNotFoundError(f'{workdir} has no checkpoint' + (' with a validation metric' if best else ''))
  if which not in ckpts.all_steps():
    raise FileNotFoundError(f'{workdir} has no checkpoint at step {which}; it has {ckpts.all_steps()}')
  with open(os.path.join(workdir, 'base.json')) as f:
    base = json.load(f)
  units = head_units(model_config)
  if base['kind'] == 'pretrained':
    if not os.path.isdir(base['path']) or directory_hash(base['path']) != base['sha256']:
      raise ValueError(f'{workdir}: its frozen base {base["path"]} is missing or has changed since training '
                       '(the content hash differs)')
    from coma_jax.hf import load_pretrained
    model = load_pretrained(base['path'], dtype=jnp.float32, compute_dtype=options['dtype'],
                            shardings=param_sharding_fn(model_config, options, mesh, rules),
                            **{k: options[k] for k in ('scan_layers', 'remat', 'attention_impl')})
    adapters = from_config.adapter_config(c)
    if adapters is not None:
      apply_adapters(model, adapters, nnx.Rngs(1))
    graphdef, params, frozen = nnx.split(model, from_config.trainable_config(c).filter(), ...)
  elif base['kind'] == 'saved':
    graphdef, params, frozen = nnx.split(nnx.eval_shape(from_config.model_factory(c, model_config, options=options)),
                                         from_config.trainable_config(c).filter(), ...)
    frozen = restore_base(workdir, _as_structs(frozen, state_shardings(frozen, rules, mesh, units=units)))
  else:
    raise ValueError(f'{workdir}/base.json: unknown kind {base["kind"]!r}')
  params_like = _as_structs(params, state_shardings(params, rules, mesh, units=units))
  restored, _, _ = ckpts.restore(which, params_like)
  ckpts.close()
  return nnx.merge(graphdef, restored, frozen)


def _as_structs(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
