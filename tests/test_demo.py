"""`make demo` (`python -m coma_jax.demo`): the whole chain at smoke size through the CLI, as a
newcomer runs it, on the session's smoke demo data; and its learned-or-not verdict."""
import json
import os
import shutil
import time

import pytest

from coma_jax import demo
from coma_jax.data.demo_records import TASKS

SMOKE = ['--config.train.steps=3', '--config.data.global_batch=8', '--config.data.num_workers=0',
         '--config.checkpoint.every=2', '--config.checkpoint.keep=2', '--config.validation.every=0']


def test_the_demo_chain_runs_resumes_and_reports(demo_data_dir, tmp_path, monkeypatch, capsys):
  monkeypatch.setenv('XLA_FLAGS', '')  # one device: the 8 fake ones are slow on 2 cores
  work = tmp_path / 'demo'
  args = ['--workdir', str(work), '--size', 'smoke', '--data_dir', demo_data_dir, '--', *SMOKE]
  assert demo.main(args) == 0, capsys.readouterr().err
  out = capsys.readouterr().out
  for task in TASKS:  # every held-out task beside its chance level
    assert f'| {task} |' in out
  assert '| **overall** (mean) |' in out and 'Wall time on ' in out and 'stage1' in out and 'evaluate' in out
  for stage in ('stage1', 'stage2'):
    assert os.path.isdir(work / stage / 'checkpoints' / '3'), stage
    assert (work / stage / 'train.log').stat().st_size > 0
  assert json.load(open(work / 'stage2' / 'config.json'))['init_from'] == str(work / 'stage1')
  report = json.load(open(work / 'report' / 'report.json'))
  table = json.load(open(os.path.join(demo_data_dir, 'mmeb_eval_raw', 'task_table.json')))
  assert {n: d['chance'] for n, d in report['aggregate']['datasets'].items()} == {
      n: t['chance'] for n, t in table.items()}
  times = json.load(open(work / demo.TIMES))
  assert set(times) == {'data', 'stage1', 'stage2', 'evaluate'}

  shutil.rmtree(work / 'stage2' / 'checkpoints' / '3')  # as if killed after step 2
  assert demo.main(args) == 0
  out = capsys.readouterr().out
  assert 'stage1: finished (3 steps)' in out and 'stage2: resuming from step 2 of 3' in out
  assert os.path.isdir(work / 'stage2' / 'checkpoints' / '3') and 'evaluate: ' not in out  # evaluated again
  times = json.load(open(work / demo.TIMES))

  start = time.monotonic()  # a rerun skips every finished stage
  assert demo.main(args) == 0
  out = capsys.readouterr().out
  assert out.count('; skipped') == 3 and 'built before; reused' in out and time.monotonic() - start < 60
  assert json.load(open(work / demo.TIMES)) == times  # the times of the runs that did the work


def _report(**p_at_1):
  table = {'SceneCaption_t2i': ('retrieval', 0.05), 'ShapeCount': ('classification', 0.25),
           'SceneVQA': ('vqa', 0.3)}
  datasets = {n: {'p_at_1': p_at_1[n], 'meta_task': t, 'chance': c} for n, (t, c) in table.items()}
  groups = {t: {'mean': p_at_1[n], 'datasets': [n]} for n, (t, _) in table.items()}
  mean = sum(p_at_1.values()) / 3
  return {'aggregate': {'datasets': datasets,
                        'custom': {'mean': mean, 'datasets': list(table), 'meta_tasks': groups}}}


@pytest.mark.parametrize('scores, failing', [
    (dict(SceneCaption_t2i=0.8, ShapeCount=0.9, SceneVQA=0.1), []),  # VQA is not held to the bar
    (dict(SceneCaption_t2i=0.2, ShapeCount=0.9, SceneVQA=0.9), ['SceneCaption_t2i']),  # 4 x chance, < 0.5
    (dict(SceneCaption_t2i=0.8, ShapeCount=0.7, SceneVQA=0.9), ['ShapeCount']),  # >= 0.5, 2.8 x chance
])
def test_the_verdict_holds_retrieval_and_classification_to_the_bar(scores, failing):
  problems = demo.learned(_report(**scores))
  assert [p.split(':')[0] for p in problems] == failing
  text = demo.table(_report(**scores))
  assert '| SceneCaption_t2i | retrieval | ' + f'{scores["SceneCaption_t2i"]:.3f} | 0.050 |' in text
