"""`Generator`: chat completions from a local Qwen2.5-VL directory, batched, on any mesh.

  gen = Generator.load('Qwen2.5-VL-7B-Instruct', mesh_shape=(-1, 1, 1), dtype='bfloat16')
  [c] = gen.generate([Request([{'role': 'user', 'content': [
      {'type': 'image', 'image': 'cat.jpg'}, {'type': 'text', 'text': 'What is in the image?'}]}])])
  c.text, c.finish_reason

Requests are grouped into batches of `batch_size` rows (short batches are padded with one-token
rows), prompts right-padded to a power-of-two bucket and images to a power-of-two vision budget,
so a run compiles a few shapes only. The weights and each batch are sharded by training's rules
table (`parallel/rules.py`): the batch over the data/fsdp axes, heads over tensor.
"""
from __future__ import annotations

import base64
import dataclasses
import logging
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coma_jax.data.batching import power_of_two_bucket
from coma_jax.data.image import ImageSettings, decode_image, resize_image
from coma_jax.generate.chat import IMAGE, encode_chat, media_parts
from coma_jax.generate.decode import DecodeSettings, generate_tokens, prompt_lengths
from coma_jax.model.inputs import BATCH_AXIS, build_model_inputs
from coma_jax.model.vision_layout import slots_needed
from coma_jax.parallel.activations import under_rules
from coma_jax.parallel.mesh import make_mesh
from coma_jax.parallel.rules import batch_sharding, head_units, rules_dict, state_shardings

log = logging.getLogger('coma_jax.generate')
END_TOKENS = ('<|im_end|>', '<|endoftext|>')


@dataclasses.dataclass
class Request:
  messages: list
  max_new_tokens: int | None = None  # None: the generator's
  temperature: float = 0.0  # 0: greedy
  top_p: float = 1.0
  seed: int = 0  # this request's own seed (see sampling.request_seed)


@dataclasses.dataclass
class Completion:
  text: str
  token_ids: list
  finish_reason: str  # 'stop' (an end token) or 'length'
  prompt_tokens: int


def image_source(part: dict):
  """An image part's bytes, path or PIL image: `image` (path, bytes or PIL) or `image_url`
  (a `data:` URL, a `file://` URL or a path)."""
  if 'image' in part:
    return part['image']
  url = part['image_url']
  url = url.get('url') if isinstance(url, dict) else url
  if not isinstance(url, str):
    raise ValueError('image_url needs a url string')
  if url.startswith('data:'):
    head, _, data = url.partition(',')
    if ';base64' not in head:
      raise ValueError('a data: image URL must be base64')
    return base64.b64decode(data)
  if url.startswith(('http://', 'https://')):
    raise ValueError('remote image URLs are not fetched: send the image inline (data: URL) or as a local path')
  return url[len('file://'):] if url.startswith('file://') else url


class Generator:

  def __init__(self, model, tokenizer, *, max_new_tokens: int = 256, batch_size: int = 8,
               image: ImageSettings = ImageSettings(min_pixels=28 * 28 * 256, max_pixels=28 * 28 * 1024),
               mesh=None, rules=None, min_prompt_bucket: int = 64):
    self.model, self.tokenizer, self.image = model, tokenizer, image
    self.batch_size, self.min_prompt_bucket = batch_size, min_prompt_bucket
    self.mesh = mesh if mesh is not None else make_mesh((-1, 1, 1), jax.local_devices())
    self.rules = rules_dict(rules)
    ends = tuple(i for i in (tokenizer.token_to_id(t) for t in END_TOKENS) if i is not None)
    self.settings = DecodeSettings(max_new_tokens=max_new_tokens, eos_ids=ends, pad_id=ends[-1] if ends else 0)
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, self.rules, self.mesh, units=head_units(model.config))
    self._state = jax.device_put(state, shardings)
    fn = lambda state, *args, settings: generate_tokens(nnx.merge(graphdef, state), *args, settings=settings)
    self._run = jax.jit(under_rules(fn, self.mesh, self.rules), static_argnames='settings')
    self.batches = 0

  @classmethod
  def load(cls, path: str, *, dtype: str = 'float32', mesh_shape=(-1, 1, 1), rules=None,
           attention_impl: str = 'auto', **kwargs) -> 'Generator':
    """A local transformers Qwen2.5-VL directory (config.json, safetensors, tokenizer.json), each
    weight read straight into its shard."""
    from coma_jax.data.tokenizer import load_tokenizer
    from coma_jax.hf import load_pretrained
    from coma_jax.model.config import ModelConfig
    from coma_jax.training.workdir import param_sharding_fn
    if not os.path.isfile(os.path.join(path, 'tokenizer.json')):
      raise FileNotFoundError(f'{path} has no tokenizer.json: generation needs the model\'s own tokenizer')
    mesh, rules = make_mesh(mesh_shape, jax.local_devices()), rules_dict(rules)  # a pod: one generator per host
    options = dict(attention_impl=attention_impl, dtype=getattr(jnp, dtype))
    config = ModelConfig.from_pretrained_dir(path)
    model = load_pretrained(path, dtype=getattr(jnp, dtype), attention_impl=attention_impl,
                            shardings=param_sharding_fn(config, options, mesh, rules))
    return cls(model, load_tokenizer(path), mesh=mesh, rules=rules, **kwargs)

  # ----------------------------------------------------------------------------- batches

  def prepare(self, request: Request, index: int = 0) -> tuple:
    """A request checked and made ready for a batch (token ids and resized images); raises a
    ValueError naming the request and image for bad input, so one bad request fails alone."""
    n = self.settings.max_new_tokens
    if request.max_new_tokens is not None and not 0 < request.max_new_tokens <= n:
      raise ValueError(f'request {index}: max_new_tokens {request.max_new_tokens} is outside 1..{n} '
                       "(the generator's max_new_tokens)")
    if not (request.temperature >= 0 and 0 < request.top_p <= 1):
      raise ValueError(f'request {index}: temperature must be >= 0 and top_p in (0, 1]')
    images = []
    for k, (kind, part) in enumerate(media_parts(request.messages)):
      if kind != IMAGE:
        raise ValueError(f'request {index}: videos are not supported by the generator (images and text only)')
      images.append(resize_image(decode_image(image_source(part), f'request {index} image {k}', self.image),
                                 self.image))
    u = self.model.config.vision.merge_unit
    ids = encode_chat(request.messages, self.tokenizer, [int(np.prod(im.grid)) // u for im in images])
    return request, ids, images

  def _groups(self) -> int:
    names = batch_sharding((self.batch_size,), 0, self.rules, self.mesh).spec[0]
    names = () if names is None else (names,) if isinstance(names, str) else names
    return int(np.prod([self.mesh.shape[a] for a in names])) if names else 1

  def _batch(self, rows):
    """ModelInputs for rows [(ids, images)], padded to the batch size and the buckets."""
    cfg = self.model.config
    filler = [self.tokenizer.id_of(END_TOKENS[0])]
    rows = list(rows) + [(filler, [])] * (self.batch_size - len(rows))
    length = power_of_two_bucket(max(len(ids) for ids, _ in rows), self.min_prompt_bucket)
    ids = np.zeros((self.batch_size, length), np.int64)
    mask = np.zeros_like(ids)
    for r, (row_ids, _) in enumerate(rows):
      ids[r, :len(row_ids)], mask[r, :len(row_ids)] = row_ids, 1
    images = [im for _, ims in rows for im in ims]
    if not images:
      return build_model_inputs(cfg, ids, mask, seq_len=length)
    groups = self._groups()
    per_group = self.batch_size // groups
    slots = max(sum(slots_needed([im.grid for _, ims in rows[g * per_group:(g + 1) * per_group] for im in ims],
                                 cfg.vision)) for g in range(groups))
    budget = power_of_two_bucket(max(slots, 1), cfg.vision.window_patches)
    return build_model_inputs(cfg, ids, mask, pixel_values=np.concatenate([im.patches() for im in images]),
                              image_grid_thw=np.array([im.grid for im in images]), seq_len=length,
                              vision_groups=groups, patch_budget=budget, vision_rows=1, vision_row_len=budget)

  # ----------------------------------------------------------------------------- generation

  def generate(self, requests: Sequence[Request]) -> list[Completion]:
    prepared = [self.prepare(r, i) for i, r in enumerate(requests)]
    return self.generate_prepared(prepared)

  def generate_prepared(self, prepared: Sequence[tuple]) -> list[Completion]:
    out = []
    for start in range(0, len(prepared), self.batch_size):
      out += self._generate_batch(prepared[start:start + self.batch_size])
    return out

  def _generate_batch(self, prepared: Sequence[tuple]) -> list[Completion]:
    requests = [r for r, _, _ in prepared]
    inputs = self._batch([(ids, images) for _, ids, images in prepared])
    prompt_len, next_position = prompt_lengths(inputs)
    b, n = self.batch_size, self.settings.max_new_tokens
    pad = lambda values, fill, dtype: np.array(list(values) + [fill] * (b - len(requests)), dtype)
    per_row = {'prompt_len': prompt_len, 'next_position': next_position,
               'seeds': pad([r.seed for r in requests], 0, np.uint32),
               'temperature': pad([r.temperature for r in requests], 0.0, np.float32),
               'top_p': pad([r.top_p for r in requests], 1.0, np.float32),
               'max_new': pad([r.max_new_tokens or n for r in requests], 1, np.int32)}
    from coma_jax.data.pipeline import to_global  # here: data.pipeline imports grain, which GPU scripts may lack
    sharding_for = lambda name, shape: batch_sharding(shape, BATCH_AXIS.get(name, 0), self.rules, self.mesh)
    placed = to_global({'inputs': inputs, **per_row}, sharding_for, processes=1)  # this host's devices
    result = jax.tree.map(np.asarray, self._run(self._state, placed['inputs'], *(placed[k] for k in per_row), None,
                                                settings=self.settings))
    self.batches += 1
    done = []
    for i in range(len(requests)):
      tokens = result['tokens'][i, :result['num_tokens'][i]].tolist()
      ended = bool(tokens) and tokens[-1] in self.settings.eos_ids
      body = tokens[:-1] if ended else tokens
      done.append(Completion(text=self.tokenizer.decode(body, skip_special_tokens=True), token_ids=body,
                             finish_reason='stop' if ended else 'length', prompt_tokens=int(prompt_len[i])))
    return done
