"""A trained workdir -> a transformers Qwen2.5-VL directory (`python -m coma_jax.export`).

  DIR/config.json, model*.safetensors   adapters merged (DoRA exactly), the trained embedding rows
  DIR/tokenizer.json, tokenizer_config.json   compression tokens at the ids training used
  DIR/preprocessor_config.json          Qwen2VLImageProcessor at the run's pixel bounds
  DIR/coma_embedding.json               how the model embeds (K, ids, pooling, pixels); Embedder.load reads it
  DIR/README.md                         a PyTorch snippet computing the embedding (the tests execute it)

With `peft=True` the weights go instead to DIR/base (what the run started from: the merged stage-1
model) and DIR/adapter (this run's adapter in PEFT format, its trained embedding rows as
`trainable_token_indices`). Every process calls `export` (the gathers are collective); process 0 writes.
"""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from coma_jax.data.image import CLIP_MEAN, CLIP_STD
from coma_jax.data.tokenizer import QwenTokenizer, load_tokenizer
from coma_jax.hf import mapping
from coma_jax.hf.io import save_pretrained
from coma_jax.hf.safetensors_files import CheckpointReader, ShardedWriter
from coma_jax.model.lora import AdapterLinear, merge_adapters
from coma_jax.training.workdir import checkpoints_of, load_model, read_config

DTYPES = {'float32': np.dtype(np.float32), 'bfloat16': np.dtype(ml_dtypes.bfloat16)}
SNIPPET_MARKER = '<!-- coma_jax: embedding snippet -->'
EMBED_KEY = 'model.language_model.embed_tokens.weight'


def export(workdir: str, out: str, *, step: int | None = None, best: bool = False, dtype: str | None = None,
           peft: bool = False) -> dict:
  """Writes the export of `workdir` (its final step, or `step`, or its best) to `out`; returns a summary.
  dtype: 'float32' or 'bfloat16' (default: the run's compute dtype)."""
  workdir = os.fspath(workdir)
  c = read_config(workdir)
  meta = _read_json(os.path.join(workdir, 'coma_embedding.json'))
  dtype = dtype or meta['dtype']
  if dtype not in DTYPES:
    raise ValueError(f'dtype must be one of {sorted(DTYPES)}, got {dtype!r}')
  if os.path.isdir(out) and os.listdir(out):
    raise FileExistsError(f'{out} is not empty: export into a new directory')
  which = _resolve_step(workdir, c, step, best)
  tokenizer = _tokenizer(c, meta)
  summary = dict(out=out, step=which, dtype=dtype, layout='peft' if peft else 'merged')
  if peft:
    start_embedding = _start_embedding(c)  # loaded first: one full model in memory at a time
    model = load_model(workdir, step=which)
    adapter = _split_off_adapter(model, start_embedding)
    save_pretrained(model, os.path.join(out, 'base'), dtype=DTYPES[dtype])
    if jax.process_index() == 0:
      _write_peft_adapter(os.path.join(out, 'adapter'), adapter, c, DTYPES[dtype])
    summary['trainable_token_rows'] = len(adapter['token_indices'])
  else:
    model = load_model(workdir, step=which)
    for _, module in model.iter_modules():  # merge in fp32 even over a bf16 frozen base
      if isinstance(module, AdapterLinear):
        module.base.kernel.set_value(module.base.kernel[...].astype(jnp.float32))
    merge_adapters(model)
    save_pretrained(model, out, dtype=DTYPES[dtype])
  if jax.process_index() == 0:
    _write_companions(out, c, meta, tokenizer, model.config, summary)
  return summary


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} is missing: not a coma_jax workdir')
  with open(path) as f:
    return json.load(f)


def _resolve_step(workdir: str, c, step: int | None, best: bool) -> int:
  ckpts = checkpoints_of(workdir, c)
  which = ckpts.best_step() if best else step if step is not None else ckpts.latest_step()
  ckpts.close()
  if which is None:
    raise FileNotFoundError(f'{workdir} has no checkpoint' + (' with a validation metric' if best else ''))
  return which


def _tokenizer_dir(c) -> str | None:
  """The checkpoint whose tokenizer the run used: its own, or (stage 2) its init_from run's."""
  if c.model.checkpoint:
    return c.model.checkpoint
  if c.init_from:
    from coma_jax.training.run import parse_init_from
    return _tokenizer_dir(read_config(parse_init_from(c.init_from)[0]))
  return None


def _tokenizer(c, meta: dict) -> QwenTokenizer:
  tokenizer = load_tokenizer(_tokenizer_dir(c))
  ids = tokenizer.add_compression_tokens(meta['num_compression_tokens'])
  if ids[0] != meta['first_compression_token_id']:
    raise ValueError(f'the tokenizer gives compression token ids from {ids[0]}, but the run trained with '
                     f'{meta["first_compression_token_id"]}')
  return tokenizer


def _host(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# --- the PEFT layout ---------------------------------------------------------------------------

def _start_embedding(c) -> jax.Array | np.ndarray:
  """The embedding matrix the run started from (the PEFT base's): its init_from run's, or its
  pretrained checkpoint's."""
  if c.trainable.full or c.trainable.vision:
    raise ValueError('--peft: this run trained more than adapters and embedding rows (trainable.full or '
                     'trainable.vision); export it merged')
  if c.init_from and c.stage == 'stage2':
    from coma_jax.training.run import parse_init_from
    path, step, best = parse_init_from(c.init_from)
    return load_model(path, step=step, best=best).embed_tokens.embedding[...]
  if not c.init_from and c.model.init == 'pretrained':
    reader = CheckpointReader(c.model.checkpoint)
    try:
      key = next(k for k in reader.keys() if mapping.canonical_key(k) == EMBED_KEY)
      return reader.read_rows(key, 0, reader.info(key).shape[0])
    finally:
      reader.close()
  raise ValueError('--peft needs the weights the run started from: a stage-2 run with init_from, or a run '
                   'from a pretrained checkpoint (a random-init run records no starting embedding)')


def _split_off_adapter(model, start_embedding: jax.Array | np.ndarray) -> dict:
  """Unwraps the adapters (the model becomes the run's starting point) and returns them in PEFT
  names and layout, with the embedding rows training changed."""
  rules = {rule.path: rule for rule in mapping.rules(model.config)}
  tensors, modules = {}, []
  adapters = [(path, m) for path, m in model.iter_modules() if isinstance(m, AdapterLinear)]
  for path, adapter in adapters:
    rule = rules.get(tuple(path) + ('kernel',))
    if rule is None or rule.transform != 'linear':
      raise ValueError(f'--peft: the adapter on {adapter.hook} has no PEFT equivalent')
    a, b = _host(adapter.lora_a[...]), _host(adapter.lora_b[...])
    magnitude = _host(adapter.magnitude[...]) if adapter.dora else None
    for i in range(mapping.num_layers(model.config, rule.stack)) if rule.stack else [None]:
      name = rule.hf.format(i=i).removesuffix('.weight')
      pick = (lambda x: x) if i is None else (lambda x, i=i: x[i])
      modules.append(name)
      tensors[f'base_model.model.{name}.lora_A.weight'] = pick(a).T
      tensors[f'base_model.model.{name}.lora_B.weight'] = pick(b).T
      if magnitude is not None:
        tensors[f'base_model.model.{name}.lora_magnitude_vector'] = pick(magnitude)
    parent = model
    for attr in path[:-1]:
      parent = getattr(parent, attr)
    setattr(parent, path[-1], adapter.base)
  embedding = model.embed_tokens.embedding
  trained = embedding[...]
  if isinstance(start_embedding, np.ndarray):  # every process holds it whole: each places its blocks
    host = start_embedding.astype(trained.dtype)
    start = jax.make_array_from_callback(host.shape, trained.sharding, lambda index: host[index])
  else:
    start = jax.device_put(start_embedding.astype(trained.dtype), trained.sharding)
  rows = np.flatnonzero(_host(jnp.any(trained != start, axis=1)))
  if len(rows):
    tensors['base_model.model.model.language_model.embed_tokens.token_adapter.trainable_tokens_delta'] = (
        _host(trained)[rows])
  embedding.set_value(start)
  if not tensors:
    raise ValueError('--peft: the run trained no adapter and no embedding row: nothing to put in an adapter')
  first = adapters[0][1] if adapters else None
  return dict(tensors=tensors, modules=modules, token_indices=[int(r) for r in rows],
              rank=first.lora_a[...].shape[-1] if first else None, dora=bool(first and first.dora))


def _write_peft_adapter(path: str, adapter: dict, c, dtype: np.dtype) -> None:
  """adapter_config.json and adapter_model.safetensors, as `peft.PeftModel.from_pretrained` reads them."""
  rows = adapter['token_indices']
  config = dict(peft_type='LORA', task_type=None, base_model_name_or_path=None, inference_mode=True,
                r=adapter['rank'] or 1, lora_alpha=c.adapter.alpha, lora_dropout=c.adapter.dropout,
                use_dora=adapter['dora'], use_rslora=False, bias='none', fan_in_fan_out=False,
                init_lora_weights=True, target_modules=adapter['modules'] or None, modules_to_save=None,
                trainable_token_indices={'embed_tokens': rows} if rows else None)
  writer = ShardedWriter(path, max_shard_bytes=1 << 62)
  for key, value in adapter['tensors'].items():
    writer.add(key, value.astype(dtype))
  writer.finish()
  os.replace(os.path.join(path, 'model.safetensors'), os.path.join(path, 'adapter_model.safetensors'))
  with open(os.path.join(path, 'adapter_config.json'), 'w') as f:
    json.dump(config, f, indent=2)


# --- tokenizer, image processor, metadata and README --------------------------------------------

def _write_companions(out: str, c, meta: dict, tokenizer: QwenTokenizer, model_config, summary: dict) -> None:
  source = _tokenizer_dir(c)
  chat_template = None
  if source:
    for name in ('chat_template.json', 'chat_template.jinja'):
      if os.path.isfile(os.path.join(source, name)):
        shutil.copy(os.path.join(source, name), os.path.join(out, name))
    config_path = os.path.join(source, 'tokenizer_config.json')
    if os.path.isfile(config_path):
      chat_template = _read_json(config_path).get('chat_template')
  tokenizer.save_pretrained(out, chat_template=chat_template)
  v = model_config.vision
  processor = dict(image_processor_type='Qwen2VLImageProcessor', do_resize=True, resample=3, do_rescale=True,
                   rescale_factor=1 / 255, do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
                   do_convert_rgb=True, patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                   merge_size=v.spatial_merge_size, min_pixels=meta['min_pixels'], max_pixels=meta['max_pixels'],
                   size={'shortest_edge': meta['min_pixels'], 'longest_edge': meta['max_pixels']})
  _write_json(os.path.join(out, 'preprocessor_config.json'), processor)
  _write_json(os.path.join(out, 'coma_embedding.json'),
              dict(meta, export=dict(step=summary['step'], dtype=summary['dtype'], layout=summary['layout'])))
  with open(os.path.join(out, 'README.md'), 'w') as f:
    f.write(readme(c, meta, summary))


def _write_json(path: str, obj) -> None:
  with open(path, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)


LOAD_MERGED = "model = Qwen2_5_VLForConditionalGeneration.from_pretrained(MODEL_DIR, dtype='auto').eval()"
LOAD_PEFT = """base = Qwen2_5_VLForConditionalGeneration.from_pretrained(os.path.join(MODEL_DIR, 'base'), dtype='auto')
# get_base_model(): the transformers model itself, its layers now carrying the adapter.
model = PeftModel.from_pretrained(base, os.path.join(MODEL_DIR, 'adapter')).get_base_model().eval()"""

SNIPPET = """import json
import os

@IMPORT@import torch
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

# MODEL_DIR: this directory.
meta = json.load(open(os.path.join(MODEL_DIR, 'coma_embedding.json')))
tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
processor = Qwen2VLImageProcessorPil(size={'shortest_edge': meta['min_pixels'], 'longest_edge': meta['max_pixels']})
@LOAD@
compression = [meta['first_compression_token_id'] + i for i in range(meta['num_compression_tokens'])]
image_pad = tokenizer.convert_tokens_to_ids('<|image_pad|>')


def token_ids(text):
  # User text is plain text, as in training: a '<|im_end|>' written in it stays characters.
  return tokenizer(text, add_special_tokens=False, split_special_tokens=True)['input_ids'] if text else []


@torch.no_grad()
def embed(texts=None, images=None, instruction=None):
  \"\"\"(N, D) L2-normalised float32 embeddings; texts and images are parallel lists (PIL images),
  where an item may be None.\"\"\"
  n = len(texts if texts is not None else images)
  out = []
  for text, image in zip(texts or [None] * n, images or [None] * n):
    text = '\\n'.join(t for t in (instruction, text) if t)
    vision = {}
    if image is None:
      ids = token_ids(text)
    else:
      if '<|image_1|>' not in text:  # the image goes first, as in MMEB
        text = f'<|image_1|>\\n{text}' if text else '<|image_1|>'
      before, _, after = text.partition('<|image_1|>')
      vision = processor(images=[image], return_tensors='pt')
      slots = int(vision['image_grid_thw'].prod()) // processor.merge_size ** 2
      block = ['<|vision_start|>'] + ['<|image_pad|>'] * slots + ['<|vision_end|>']
      ids = token_ids(before) + tokenizer.convert_tokens_to_ids(block) + token_ids(after)
    ids = torch.tensor([ids + compression])
    # mm_token_type_ids marks the image tokens: without it transformers silently uses 1-D positions.
    hidden = model.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                         mm_token_type_ids=(ids == image_pad).long(), use_cache=False,
                         **vision).last_hidden_state  # after the final norm
    pooled = hidden[0, -len(compression):].float().mean(0)
    out.append(torch.nn.functional.normalize(pooled, dim=0))
  return torch.stack(out).numpy()
"""


def snippet(peft: bool = False) -> str:
  code = SNIPPET.replace('@IMPORT@', 'from peft import PeftModel\n' if peft else '')
  return code.replace('@LOAD@', LOAD_PEFT if peft else LOAD_MERGED)


def readme(c, meta: dict, summary: dict) -> str:
  peft = summary['layout'] == 'peft'
  k = meta['num_compression_tokens']
  first = meta['first_compression_token_id']
  layout = ('`base/` is the model this run started from (transformers Qwen2.5-VL) and `adapter/` this run\'s '
            'adapter in PEFT format, its trained embedding rows as `trainable_token_indices`.' if peft else
            'A transformers Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`), adapters merged, with the trained '
            'embedding rows.')
  return f"""# CoMa embedding model

Exported by coma_jax from a {c.stage} run, checkpoint step {summary['step']}, in {summary['dtype']}. {layout}

The embedding of an item is the mean of the final-norm hidden states over {k} compression tokens
(`<|ctoken_pad_0|>` .. `<|ctoken_pad_{k - 1}|>`, ids {first}..{first + k - 1}) appended to it, L2-normalised.
The sequence is the item text (the instruction, a newline, the text) with `<|image_1|>` replaced by
`<|vision_start|><|image_pad|>*N<|vision_end|>` (an image without the tag goes first), then the
compression tokens; no chat template. `coma_embedding.json` holds K, the ids and the pixel bounds
({meta['min_pixels']}..{meta['max_pixels']} pixels per image).

## Embedding with PyTorch

Needs torch, transformers 5, pillow{' and peft' if peft else ''}. Set `MODEL_DIR` to this directory, then:

{SNIPPET_MARKER}
```python
{snippet(peft)}```

For example `q = embed(texts=['a dog on a beach'])` and
`t = embed(images=[Image.open('dog.jpg')], instruction='Represent the given image.')`; the rows are
unit vectors, so `q @ t.T` gives cosine similarities. Items run one at a time: no padding enters.

- Text is tokenised as plain text, as in training, except that transformers still matches the
  two non-special added tokens `<tool_call>` and `</tool_call>` when they are written in the text.
- `Qwen2VLImageProcessorPil` is the image processor without torchvision; it equals training's
  preprocessing. Texts longer than training's 8192-token limit are not truncated here.
- In JAX, `coma_jax.Embedder.load(DIR)` gives the same embeddings from a merged export (the tests
  check this snippet against it{'; this PEFT layout against the merged one' if peft else ''}).
"""
