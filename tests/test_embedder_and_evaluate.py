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
  assert scores(a) == scores(b) and set(scores(a)) == {'ImageNet-1K', 'MSCOCO_t2i'}
  assert all(0 <= v <= 1 for v in scores(a).values())
  overall = a['aggregate']['overall']
  assert overall['mean'] is None and len(overall['missing']) == 34  # never averaged over a subset
  assert (tmp_path / 'a' / 'report.md').exists() and (tmp_path / 'a' / 'report.png').stat().st_size > 1000


def test_a_bad_eval_row_is_an_error_naming_it(stage2_run, demo_data_dir, tmp_path, capsys):
  raw = os.path.join(demo_data_dir, 'mmeb_eval_raw')
  bad = tmp_path / 'mmeb'
  shutil.copytree(os.path.join(raw, 'ImageNet-1K'), bad / 'ImageNet-1K')
  table = pq.read_table(next((bad / 'ImageNet-1K').glob('*.parquet'))).to_pylist()
  table[3]['qry_img_path'] = 'ImageNet-1K/nowhere.jpg'
  for f in (bad / 'ImageNet-1K').glob('*.parquet'):
    f.unlink()
  pq.write_table(pa.Table.from_pylist(table), str(bad / 'ImageNet-1K' / 'test.parquet'))
  assert evaluate.main(['--model', str(stage2_run), '--mmeb_dir', str(bad), '--image_root',
                        os.path.join(raw, 'images'), '--out', str(tmp_path / 'out')]) == 1
  assert 'ImageNet-1K, row 3: missing image' in capsys.readouterr().err
