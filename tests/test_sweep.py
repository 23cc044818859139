"""The sweep runner on the shipped CoMa-effect sweep at smoke size (2 arms x 1 seed x 2 steps per
stage): the shared stage 0 runs once, each chain trains from the previous stage, every arm is
evaluated, results come with their metrics; a rerun skips everything. Stage 0 itself (K = 0)."""
import json
import os

import pytest

from coma_jax import sweep
from coma_jax.experiments.stats import mean_interval, paired_difference


def test_intervals_and_paired_differences():
  s = mean_interval([0.5, 0.7, 0.6])
  assert s['mean'] == pytest.approx(0.6) and s['low'] == pytest.approx(0.6 - 4.302653 * 0.1 / 3 ** 0.5, abs=1e-5)
  assert mean_interval([0.4])['low'] is None
  d = paired_difference({0: 0.6, 1: 0.8, 2: 0.9}, {0: 0.5, 1: 0.7, 2: 0.7})
  assert d['n'] == 3 and d['mean'] == pytest.approx(0.4 / 3)


def test_the_smoke_sweep_runs_shares_stage0_and_resumes(demo_data_dir, tmp_path, capsys, monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '')  # one device: the 8 fake ones are slow on 2 cores
  work = tmp_path / 'sweep'
  args = ['--sweep', 'configs/sweeps/coma_effect.py:smoke', '--workdir', str(work), '--data_dir', demo_data_dir,
          '--', '--config.data.num_workers=0', '--config.data.global_batch=8', '--config.validation.every=0']
  assert sweep.main(args) == 0
  out = capsys.readouterr().out
  assert out.count('stage0 (seed 0): training 2 steps') == 1  # shared by both arms
  runs = work / 'runs' / 'seed0'
  assert sorted(os.listdir(runs)) == ['stage0', 'stage0.s1_paper_k8', 'stage0.s1_paper_k8.s2', 'stage0.s2_k8_alone']
  meta = json.load(open(runs / 'stage0' / 'coma_embedding.json'))
  assert meta['num_compression_tokens'] == 0  # stage 0: no compression tokens
  config = json.load(open(runs / 'stage0.s1_paper_k8.s2' / 'config.json'))
  assert config['init_from'].endswith('stage0.s1_paper_k8')
  assert json.load(open(runs / 'stage0.s2_k8_alone' / 'config.json'))['init_from'].endswith('stage0')
  results = json.load(open(work / 'results.json'))
  assert set(results['arms']) == {'s0 -> s2', 's0 -> s1 paper K8 -> s2'}
  for r in results['arms'].values():
    assert 0 <= r['metrics']['overall']['mean'] <= 1 and r['metrics']['overall']['n'] == 1
  assert 'vs_baseline' in results['arms']['s0 -> s1 paper K8 -> s2']
  assert (work / 'results.png').stat().st_size > 0 and '| s0 -> s2 | 1 |' in (work / 'results.md').read_text()
  assert sweep.main(args) == 0  # a rerun: everything finished, nothing trains
  out = capsys.readouterr().out
  assert 'training' not in out and out.count('; skipped') == 7  # stage0 twice, 3 other stages, 2 evaluations
  assert sweep.main(['--sweep', 'configs/sweeps/coma_effect.py:smoke', '--workdir', str(work), '--arms', 'nope']) == 1
  # A user's own sweep file: their config file and data_dir, evaluate's arguments of their own.
  # It names the same stages, so training is reused; its evaluation reruns with those arguments.
  eval_raw = os.path.join(demo_data_dir, 'mmeb_eval_raw')
  mine = tmp_path / 'my_sweep.py'
  mine.write_text(f'''
def get_sweep(variant=''):
  return {{'config': {os.path.abspath('configs/demo.py')!r}, 'seeds': [0], 'baseline': 'alone',
          'data': {{'data_dir': {demo_data_dir!r}, 'evaluate': ['--mmeb_dir', {eval_raw!r},
                   '--image_root', {os.path.join(eval_raw, 'images')!r},
                   '--task_table', {os.path.join(eval_raw, 'task_table.json')!r}]}},
          'arms': {{'alone': [{{'name': 'stage0', 'variant': 'stage0', 'overrides': {{'train.steps': 2}}}},
                             {{'name': 's2_k8_alone', 'variant': 'stage2', 'overrides': {{'train.steps': 4}}}}]}}}}
''')
  report = runs / 'stage0.s2_k8_alone' / 'report'
  os.remove(report / 'report.json')
  assert sweep.main(['--sweep', str(mine), '--workdir', str(work)]) == 0
  out = capsys.readouterr().out
  assert 'training' not in out and out.count('; skipped') == 2  # its two stages
  assert '-m coma_jax.evaluate' in out and (report / 'report.json').exists()
  results = json.load(open(work / 'results.json'))
  assert list(results['arms']) == ['alone'] and results['arms']['alone']['metrics']['overall']['n'] == 1
