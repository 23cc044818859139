"""`Embedder`: CoMa embeddings from a trained workdir, with everything the embedding depends on
(K, the compression-token ids, pooling, pixel bounds) taken from its `coma_embedding.json`.

One code path with training: items become sequences through the stage-2 sequence builder, are
padded into static-shape buckets, and run through the jitted embedding of `training/stage2.py`,
sharded over the local devices.

  emb = Embedder.load('RUN2')
  q = emb.encode(texts=['a dog on a beach'], role='query')
  t = emb.encode(images=['dog.jpg'], instruction='Represent the given image.', role='target')
  emb.similarity(q, t)
"""
from __future__ import annotations

import io
import json
import logging
import os
import sys
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from PIL import Image

from coma_jax.data.batching import Bucket, Needs, collate, example_slots, needs_of, power_of_two_bucket
from coma_jax.data.formats import MMEB_IMAGE_TAG, Side
from coma_jax.data.image import ImageSettings
from coma_jax.data.pipeline import global_max, to_global
from coma_jax.data.sequences import SequenceSettings, TokenIds, stage2_example
from coma_jax.data.tokenizer import load_tokenizer
from coma_jax.model.inputs import BATCH_AXIS
from coma_jax.parallel.activations import under_rules
from coma_jax.parallel.rules import batch_sharding, rules_dict
from coma_jax.training.stage2 import embed_side

log = logging.getLogger('coma_jax.embed')
REQUIRED = ('num_compression_tokens', 'first_compression_token_id', 'min_pixels', 'max_pixels')
MAX_LENGTH, MAX_VISION_SLOTS = 8192, 16384
RELEASE_K = 32  # the authors' released checkpoints: 32 compression tokens


def _image_ref(image):
  """A path, bytes, a PIL image or an (H, W[, C]) array -> what the sequence builder decodes."""
  if image is None or isinstance(image, (str, bytes)):
    return image or None
  if isinstance(image, os.PathLike):
    return os.fspath(image)
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  if isinstance(image, Image.Image):
    buf = io.BytesIO()
    image.save(buf, 'PNG')  # lossless: the decoder sees exactly these pixels
    return buf.getvalue()
  raise TypeError(f'an image must be a path, bytes, a PIL image or an array, got {type(image).__name__}')


def local_mesh() -> Mesh:
  """The batch is split over this process's devices; the weights are replicated on them."""
  return Mesh(np.asarray(jax.local_devices()), ('data',))


def _load_hf_replicated(path: str):
  from jax.sharding import NamedSharding, PartitionSpec
  from coma_jax.hf import load_pretrained
  return load_pretrained(path, shardings=NamedSharding(local_mesh(), PartitionSpec()))


def compose_text(text: str | None, instruction: str | None, has_image: bool) -> str:
  """The sequence text of an item: the instruction, then the text; an image without an explicit
  `<|image_1|>` goes first, as in MMEB ('<|image_1|>\\nRepresent the given image.')."""
  text = '\n'.join(t for t in (instruction, text) if t)
  if has_image and MMEB_IMAGE_TAG not in text:
    text = f'{MMEB_IMAGE_TAG}\n{text}' if text else MMEB_IMAGE_TAG
  return text


class Embedder:
  def __init__(self, model, tokenizer, metadata: dict, mesh: Mesh | None = None, rules: dict | None = None):
    """`mesh` (default: this process's devices) may span several processes, as training's does
    (with training's `rules`): every process then calls `encode_sides` with the same items."""
    missing = [k for k in REQUIRED if k not in metadata]
    if missing:
      raise ValueError(f'coma_embedding.json lacks {missing}: cannot know how the model embeds')
    self.model, self.tokenizer, self.metadata = model, tokenizer, metadata
    self.k = metadata['num_compression_tokens']
    if self.k < 1:
      raise ValueError('this run trained without compression tokens (a stage-0 run, K = 0): it makes no '
                       'embeddings; train stage 1 or stage 2 from it')
    ids = tokenizer.add_compression_tokens(self.k, embedding_rows=model.config.text.vocab_size)
    if ids[0] != metadata['first_compression_token_id']:
      raise ValueError(f'the tokenizer gives compression token ids from {ids[0]}, but the model was trained with '
                       f'{metadata["first_compression_token_id"]}: the wrong tokenizer')
    self.ids = TokenIds.of(tokenizer, self.k)
    self.image = ImageSettings(min_pixels=metadata['min_pixels'], max_pixels=metadata['max_pixels'])
    self.settings = SequenceSettings(num_compression_tokens=self.k, max_length=MAX_LENGTH,
                                     max_vision_slots=MAX_VISION_SLOTS, image=self.image)
    self.mesh = mesh or local_mesh()
    self.rules = rules if rules is not None else rules_dict([('batch', 'data')])
    # A mesh over several processes: each process feeds its slice of a batch's rows.
    self.processes = len({d.process_index for d in self.mesh.devices.flat})
    graphdef, state = nnx.split(model)
    self._state = state
    self._embed = jax.jit(under_rules(lambda s, side: embed_side(nnx.merge(graphdef, s), side, None)[:, 0],
                                      self.mesh, self.rules))
    self.truncated = 0

  @classmethod
  def load(cls, path: str, step: int | None = None, best: bool = False, preset: str | None = None) -> 'Embedder':
    """A coma_jax workdir (its final step, or `step`, or its best checkpoint) or export.

    `preset='coma_release'`: the authors' released PyTorch checkpoints (a merged Qwen2.5-VL whose
    tokenizer adds <|ctoken_pad_0..31|>), which carry no coma_embedding.json; their training recipe
    is assumed: mean pooling over the 32 compression tokens and 256-1024 visual tokens. (Their
    released eval script pools the last token instead; training pooled the mean, and so do we.)
    """
    if preset is not None:
      return cls._load_preset(path, preset)
    meta_path = os.path.join(path, 'coma_embedding.json')
    if not os.path.isfile(meta_path):
      raise FileNotFoundError(f'{path} has no coma_embedding.json: not a coma_jax workdir or export')
    with open(meta_path) as f:
      metadata = json.load(f)
    if os.path.isdir(os.path.join(path, 'checkpoints')):
      from coma_jax.training.workdir import load_model, read_config
      model = load_model(path, step=step, best=best)
      tokenizer = load_tokenizer(read_config(path).model.checkpoint or None)
    else:
      model, tokenizer = _load_hf_replicated(path), load_tokenizer(path)
    return cls(model, tokenizer, metadata)

  @classmethod
  def _load_preset(cls, path: str, preset: str) -> 'Embedder':
    if preset != 'coma_release':
      raise ValueError(f"unknown preset {preset!r}; known: 'coma_release'")
    tokenizer = load_tokenizer(path)
    if len(tokenizer.compression_ids) != RELEASE_K:
      raise ValueError(f'{path}: the coma_release preset expects a tokenizer with {RELEASE_K} <|ctoken_pad_i|> tokens, '
                       f'found {len(tokenizer.compression_ids)}')
    metadata = {'preset': preset, 'num_compression_tokens': RELEASE_K,
                'first_compression_token_id': tokenizer.compression_ids[0],
                'pooling': 'mean over the compression tokens of the final-norm hidden states', 'normalisation': 'l2',
                'min_pixels': 28 * 28 * 256, 'max_pixels': 28 * 28 * 1024}
    return cls(_load_hf_replicated(path), tokenizer, metadata)

  @property
  def dim(self) -> int:
    return self.model.config.text.hidden_size

  def _examples(self, sides: Sequence[Side], start: int, truncate: bool):
    slots = lambda grids: example_slots(grids, self.model.config)
    out = []
    for i, side in enumerate(sides):
      example = stage2_example(side, f'item {start + i}', self.tokenizer, self.ids, self.settings, slots)
      if example.cuts:
        if not truncate:
          raise ValueError(f'item {start + i}: its text is longer than {MAX_LENGTH} tokens (truncate=False)')
        self.truncated += 1
      out.append(example)
    return out

  def encode_sides(self, sides: Sequence[Side], batch_size: int = 8, truncate: bool = True,
                   progress: bool | None = None, state=None) -> np.ndarray:
    """(N, D) L2-normalised embeddings of prepared sides (text with its `<|image_1|>` and image).
    `state`: other weights of the same model (`nnx.state` of it), e.g. during training."""
    state = self._state if state is None else state
    shards = self.mesh.devices.size
    rows = -(-batch_size // shards) * shards  # whole rows per device
    per_process = rows // self.processes
    first = jax.process_index() * per_process if self.processes > 1 else 0
    cfg = self.model.config
    out = np.zeros((len(sides), self.dim), np.float32)
    self.truncated, bar = 0, None
    if progress or (progress is None and len(sides) > 4 * rows and sys.stderr.isatty()):
      from tqdm import tqdm
      bar = tqdm(total=len(sides), unit='item')
    sharding = lambda name, shape: batch_sharding(shape, BATCH_AXIS.get(name, 0), self.rules, self.mesh)
    for start in range(0, len(sides), rows):
      n = len(sides[start:start + rows])
      # Each process prepares its own slice of the rows; all agree on the bucket, as the loader does.
      examples = self._examples(sides[start + first:min(start + first + per_process, start + n)], start + first,
                                truncate)
      examples += [None] * (per_process - len(examples))
      needs = needs_of(examples, cfg, 1)
      if self.processes > 1:
        needs = Needs(*global_max(needs.as_array()).tolist())
      bucket = Bucket(power_of_two_bucket(needs.seq_len, 64),
                      power_of_two_bucket(needs.vision_slots, cfg.vision.window_patches) if needs.vision_slots else 0, 0)
      batch = collate(examples, cfg, bucket, 1, self.k)
      side = to_global({k: batch[k] for k in ('inputs', 'compression_positions', 'example_valid')}, sharding,
                       processes=self.processes)
      embedded = self._embed(state, side)
      if self.processes > 1:
        from jax.experimental import multihost_utils
        embedded = multihost_utils.process_allgather(embedded, tiled=True)
      out[start:start + n] = np.asarray(jax.device_get(embedded))[:n]
      if bar is not None:
        bar.update(n)
    if bar is not None:
      bar.close()
    if self.truncated:
      log.warning('%d of %d items were truncated to %d tokens', self.truncated, len(sides), MAX_LENGTH)
    return out

  def encode(self, texts: Sequence[str | None] | None = None, images: Sequence | None = None,
             instruction: str | None = None, role: str = 'query', batch_size: int = 8, truncate: bool = True,
             progress: bool | None = None) -> np.ndarray:
    """L2-normalised (N, D) embeddings. `texts` and `images` are parallel lists (either may be
    missing, or hold None for an item); images are paths, bytes, PIL images or arrays. CoMa encodes
    queries and targets with the same model; `role` is recorded for symmetry with the evaluation."""
    if role not in ('query', 'target'):
      raise ValueError(f"role must be 'query' or 'target', got {role!r}")
    n = len(texts) if texts is not None else len(images) if images is not None else 0
    texts = list(texts) if texts is not None else [None] * n
    images = list(images) if images is not None else [None] * n
    if len(texts) != len(images):
      raise ValueError(f'{len(texts)} texts but {len(images)} images')
    sides = []
    for text, image in zip(texts, images):
      ref = _image_ref(image)
      sides.append(Side(compose_text(text, instruction, ref is not None), ref))
    return self.encode_sides(sides, batch_size, truncate, progress)

  @staticmethod
  def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarities (the embeddings are unit vectors): (N, M)."""
    return np.asarray(a) @ np.asarray(b).T


def add_model_arguments(parser) -> None:
  """The command-line options that pick a model, shared by `evaluate` and `embed`."""
  parser.add_argument('--model', required=True, help='a coma_jax workdir or export')
  parser.add_argument('--step', type=int, default=None, help="a workdir's checkpoint step (default: the final one)")
  parser.add_argument('--best', action='store_true', help="a workdir's best checkpoint by validation")
  parser.add_argument('--batch_size', type=int, default=8)


def embedder_from_args(args) -> Embedder:
  from coma_jax.runtime import enable_compilation_cache
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
  enable_compilation_cache()
  return Embedder.load(args.model, step=args.step, best=args.best)
