"""`load_pretrained` / `save_pretrained`: local transformers Qwen2.5-VL checkpoints <-> our model.

Loading streams: the model is built abstractly (`nnx.eval_shape`, nothing allocated), then each
parameter's blocks are filled in place from its per-layer HF tensors (`assembly`, plain file
reads, nothing mapped) and placed straight into its sharding with `jax.make_array_from_callback`,
so each process materialises only the blocks its devices hold, one parameter at a time. No torch
model is built.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from coma_jax.hf import assembly, mapping
from coma_jax.hf.safetensors_files import CheckpointReader, ShardedWriter
from coma_jax.model.config import ModelConfig
from coma_jax.model.qwen2_5_vl import Qwen25VL

ShardingFn = Callable[[tuple[str, ...], tuple[int, ...]], jax.sharding.Sharding]
HF_DTYPE_NAMES = {np.dtype(np.float32): 'float32', np.dtype(ml_dtypes.bfloat16): 'bfloat16',
                  np.dtype(np.float16): 'float16'}


def _sharding_for(shardings, path, shape) -> jax.sharding.Sharding:
  if shardings is None:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])
  if isinstance(shardings, jax.sharding.Sharding):
    return shardings
  return shardings(path, shape)


def load_pretrained(path: str, dtype=jnp.float32, *, compute_dtype=None,
                    shardings: jax.sharding.Sharding | ShardingFn | None = None,
                    **model_options) -> Qwen25VL:
  """Reads a local transformers Qwen2.5-VL directory (config.json + safetensors, single or sharded).

  dtype: the parameter dtype; compute_dtype defaults to it. shardings: one Sharding for all
  parameters, or a function (param path, shape) -> Sharding; default: the first device.
  model_options go to `Qwen25VL` (scan_layers, remat, attention_impl).
  """
  config = ModelConfig.from_pretrained_dir(path)
  reader = CheckpointReader(path)
  by_key = mapping.match_keys(config, reader.keys())
  model = nnx.eval_shape(lambda: Qwen25VL(config, dtype=compute_dtype or dtype, param_dtype=dtype,
                                          rngs=nnx.Rngs(0), **model_options))
  per_param: dict[tuple[str, ...], tuple[mapping.Rule, list[str]]] = {}
  for key, rule, _ in mapping.expand(config):
    per_param.setdefault(rule.path, (rule, []))[1].append(by_key[key])

  try:
    for path_, (rule, keys) in per_param.items():
      _check_shapes(reader, rule, keys, tuple(mapping.get_param(model, path_).shape))
    for path_, (rule, keys) in per_param.items():
      var = mapping.get_param(model, path_)
      var.value = _load_param(reader, rule, keys, tuple(var.shape), np.dtype(var.dtype),
                              _sharding_for(shardings, path_, tuple(var.shape)))
  finally:
    reader.close()
  return model


def _check_shapes(reader: CheckpointReader, rule: mapping.Rule, keys: list[str], shape: tuple[int, ...]) -> None:
  """Every tensor of the parameter gives its layer shape; checked before anything is read."""
  layer_shape = shape if rule.stack is None else shape[1:]
  for key in keys:
    hf_shape = reader.info(key).shape
    ours = assembly.transformed_shape(rule, hf_shape)
    if ours != layer_shape:
      raise ValueError(f'{key}: shape {hf_shape} gives {ours} after {rule.transform!r}, '
                       f'but {".".join(rule.path)} needs {layer_shape}')


def _load_param(reader, rule, keys, shape, np_dtype, sharding) -> jax.Array:
  """One parameter, placed in its sharding. On an accelerator its host blocks die on return,
  before the next parameter is read; on the CPU backend they are the device buffers."""
  indices = sharding.addressable_devices_indices_map(shape).values()
  blocks = assembly.assemble(reader, rule, keys, shape, np_dtype, [assembly.block_key(i, shape) for i in indices])
  array = jax.make_array_from_callback(shape, sharding, lambda index: blocks[assembly.block_key(index, shape)])
  return array.block_until_ready()  # the transfers hold the host blocks until they finish


def checkpoint_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """The tensors a transformers checkpoint of `config` holds: on-disk name -> shape."""
  model = nnx.eval_shape(lambda: Qwen25VL(config, rngs=nnx.Rngs(0)))
  out = {}
  for key, rule, i in mapping.expand(config):
    shape = tuple(mapping.get_param(model, rule.path).shape)
    dummy = np.broadcast_to(np.zeros((), np.int8), shape if i is None else shape[1:])  # no data
    out[mapping.checkpoint_key(key)] = mapping.TRANSFORMS[rule.transform][1](dummy, rule.hf_shape).shape
  return out


def _host_value(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def save_pretrained(model: Qwen25VL, path: str, dtype=None, *, max_shard_bytes: int = 2 * 1024**3) -> list[str]:
  """Writes `config.json` and (sharded) safetensors with an index, in transformers' names.

  dtype: the stored dtype (default: the parameters' own). Every process must call this (the
  gather is collective); only process 0 writes. Returns the written safetensors file names.
  """
  config: ModelConfig = model.config
  writer = ShardedWriter(path, max_shard_bytes) if jax.process_index() == 0 else None
  host: tuple[tuple[str, ...], np.ndarray] | None = None
  stored_dtype = None
  for key, rule, i in mapping.expand(config):
    if host is None or host[0] != rule.path:
      host = (rule.path, _host_value(mapping.get_param(model, rule.path).value))
    value = host[1] if i is None else host[1][i]
    value = mapping.TRANSFORMS[rule.transform][1](value, rule.hf_shape)
    value = value.astype(np.dtype(dtype) if dtype is not None else value.dtype)
    stored_dtype = value.dtype
    if writer:
      writer.add(mapping.checkpoint_key(key), value)
  if not writer:
    return []
  names = writer.finish()
  hf = dict(config.to_hf_dict(), dtype=HF_DTYPE_NAMES.get(np.dtype(stored_dtype), 'float32'))
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(hf, f, indent=2)
  return names
