"""`python -m coma_jax.export` on the tiny stage-2 run: the README snippet, executed verbatim with
transformers, equals `Embedder.encode` (fp32 and bf16); the tokenizer directory gives our ids; the
PEFT layout loads with `peft` to the merged export's outputs."""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import torch
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image
from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

import coma_jax
from coma_jax import export
from coma_jax.data.tokenizer import QWEN2_5_VL_ADDED_TOKENS, load_tokenizer
from coma_jax.eval.embedder import local_mesh
from coma_jax.hf import load_pretrained
from coma_jax.hf.export_dir import SNIPPET_MARKER

TOL = 1e-4
INSTRUCTION = 'Represent the given image.'


def items():
  """Text only (one with a control token written as text), images with an instruction, and a text
  placing `<|image_1|>` in its middle."""
  cat, coffee = Image.fromarray(skimage.data.chelsea()), Image.fromarray(skimage.data.coffee())
  return [dict(texts=['a photo of a cat', 'A <|im_end|> cup of coffee.']),
          dict(texts=[None, 'a cup of coffee <|image_1|> on a table'], images=[cat, coffee], instruction=INSTRUCTION)]


def run_snippet(model_dir) -> dict:
  """The README's snippet, executed verbatim, with MODEL_DIR set: its namespace."""
  readme = open(os.path.join(model_dir, 'README.md')).read()
  code = re.search(re.escape(SNIPPET_MARKER) + r'\n```python\n(.*?)```', readme, re.S).group(1)
  namespace = {'MODEL_DIR': str(model_dir)}
  exec(code, namespace)
  return namespace


def exported(tmp_path_factory, workdir, name, *flags):
  out = tmp_path_factory.mktemp('export') / name
  assert export.main(['--checkpoint', str(workdir), '--out', str(out), *flags]) == 0
  return out


@pytest.fixture(scope='module')
def merged(stage2_run, tmp_path_factory):
  return exported(tmp_path_factory, stage2_run, 'merged')


@pytest.fixture(scope='module')
def merged_snippet(merged):
  return run_snippet(merged)


@pytest.fixture(scope='module')
def reference(stage2_run):
  return coma_jax.Embedder.load(str(stage2_run))


def test_the_snippet_equals_the_embedder_in_fp32(merged, merged_snippet, reference):
  config = json.load(open(merged / 'config.json'))
  assert config['dtype'] == 'float32' and merged_snippet['model'].dtype == torch.float32
  for kw in items():
    ours, ref = merged_snippet['embed'](**kw), reference.encode(**kw)
    assert ours.shape == ref.shape and np.abs(ours - ref).max() <= TOL, np.abs(ours - ref).max()  # measured 1e-7


def test_the_tokenizer_directory_gives_our_ids(merged):
  meta = json.load(open(merged / 'coma_embedding.json'))
  hf = AutoTokenizer.from_pretrained(merged)
  k, first = meta['num_compression_tokens'], meta['first_compression_token_id']
  assert [hf.convert_tokens_to_ids(f'<|ctoken_pad_{i}|>') for i in range(k)] == list(range(first, first + k))
  assert [hf.convert_tokens_to_ids(t) for t in QWEN2_5_VL_ADDED_TOKENS] == list(range(151643, 151665))
  ours = load_tokenizer(str(merged))
  text = 'Café naïve 12345 <|im_end|> <|ctoken_pad_0|> x\n\n y'
  assert hf(text, add_special_tokens=False, split_special_tokens=True)['input_ids'] == ours.encode_text(text)
  assert hf(text, add_special_tokens=False)['input_ids'] == ours.encode(text)
  processor = Qwen2VLImageProcessorPil.from_pretrained(merged)
  assert (processor.size['shortest_edge'], processor.size['longest_edge']) == (meta['min_pixels'], meta['max_pixels'])


def test_without_mm_token_type_ids_the_parity_check_fails(merged_snippet, reference):
  """Negative control: transformers' silent fallback to 1-D positions moves the image items by
  far more than the tolerance (measured 2e-3)."""
  model = merged_snippet['model'].model
  forward = model.forward
  model.forward = lambda *a, **kw: forward(*a, **{k: v for k, v in kw.items() if k != 'mm_token_type_ids'})
  try:
    kw = items()[1]
    assert np.abs(merged_snippet['embed'](**kw) - reference.encode(**kw)).max() > 10 * TOL
  finally:
    del model.forward


def test_bf16_export_matches_a_bf16_embedder(stage2_run, tmp_path_factory):
  out = exported(tmp_path_factory, stage2_run, 'bf16', '--dtype', 'bfloat16')
  snippet = run_snippet(out)
  assert snippet['model'].dtype == torch.bfloat16
  meta = json.load(open(out / 'coma_embedding.json'))
  replicated = NamedSharding(local_mesh(), PartitionSpec())  # as Embedder.load places an export
  model = load_pretrained(str(out), dtype=jnp.bfloat16, shardings=replicated)
  jax_bf16 = coma_jax.Embedder(model, load_tokenizer(str(out)), meta)
  for kw in items():
    cosine = (snippet['embed'](**kw) * jax_bf16.encode(**kw)).sum(axis=1)
    assert cosine.min() >= 0.999, cosine  # measured 0.99999


def test_peft_layout_loads_to_the_merged_outputs(stage2_run, merged, merged_snippet, reference, tmp_path_factory):
  out = exported(tmp_path_factory, stage2_run, 'peft', '--peft')
  config = json.load(open(out / 'adapter' / 'adapter_config.json'))
  assert config['use_dora'] and config['trainable_token_indices']['embed_tokens']
  snippet = run_snippet(out)  # base + adapter through peft
  for kw in items():
    ours = snippet['embed'](**kw)
    assert np.abs(ours - merged_snippet['embed'](**kw)).max() <= TOL
    assert np.abs(ours - reference.encode(**kw)).max() <= TOL
  ids = torch.tensor([[151665, 151666, 3, 100, 5000]])  # compression rows and ordinary ones
  with torch.no_grad():  # the tied head follows the trained rows too
    logits = snippet['model'](input_ids=ids).logits
    merged_logits = merged_snippet['model'](input_ids=ids).logits
  assert (logits - merged_logits).abs().max() <= TOL
  from transformers import Qwen2_5_VLForConditionalGeneration
  snippet['model'] = Qwen2_5_VLForConditionalGeneration.from_pretrained(out / 'base').eval()
  kw = items()[1]  # the base alone is another model: the adapter carries the training
  assert np.abs(snippet['embed'](**kw) - reference.encode(**kw)).max() > 10 * TOL


def test_only_process_0_writes(stage2_run, tmp_path, monkeypatch):
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  assert export.main(['--checkpoint', str(stage2_run), '--out', str(tmp_path / 'out')]) == 0
  assert not os.path.exists(tmp_path / 'out') or not os.listdir(tmp_path / 'out')


def test_refusals_are_named(uninterrupted, merged, capsys):
  assert export.main(['--checkpoint', str(uninterrupted[0]), '--out', str(merged)]) == 1
  assert 'not empty' in capsys.readouterr().err
  assert export.main(['--checkpoint', str(uninterrupted[0]), '--out', str(merged) + '_peft', '--peft']) == 1
  assert 'random-init run' in capsys.readouterr().err


def test_the_embedder_loads_the_export_too(merged, reference):
  """An exported directory carries coma_embedding.json and the tokenizer: the same embeddings."""
  again = coma_jax.Embedder.load(str(merged))
  for kw in items():
    np.testing.assert_allclose(again.encode(**kw), reference.encode(**kw), atol=1e-5)
