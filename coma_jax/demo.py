"""`make demo`: the whole CoMa method on the learnable demo data, on a laptop's CPU.

  python -m coma_jax.demo [--workdir runs/demo] [--size full] [--data_dir DIR] [-- --config.key=value ...]

1. builds the demo data (`python -m coma_jax.data.demo`: drawn scenes and real photo crops);
2. trains stage 1 (compression, paper mask): `python -m coma_jax.train --config configs/demo.py:stage1`;
3. trains stage 2 (contrastive) from it: `configs/demo.py:stage2 --config.init_from=<stage-1 workdir>`;
4. evaluates on the held-out eval set: `python -m coma_jax.evaluate ... --task_table`;
5. prints Precision@1 per task beside its chance level, each stage's wall time and where every
   artefact is, and checks that the model learned (exit status 1 if it did not).

Each stage is the command a user would type, run as a subprocess with its log in the workdir.
A rerun reuses the built data, skips finished stages and resumes an interrupted one. Arguments
after `--` go to both training commands (the tests use them for a smoke-size chain).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from coma_jax.experiments.stage_runs import StageFailed, config_value, evaluate_stage, show, train_stage
from coma_jax.plot import run_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, 'configs', 'demo.py')
TIMES = 'demo_times.json'  # the wall time of each stage when it last ran
# What "learned" means (the demo issue): on retrieval and classification, P@1 >= 3x chance and >= 0.5.
LEARNED_TASKS, MIN_RATIO, MIN_P_AT_1 = ('retrieval', 'classification'), 3.0, 0.5


def machine() -> str:
  """The cores this process may use and the CPU model: the demo's timings depend on them."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  model = platform.processor() or platform.machine()
  if os.path.exists('/proc/cpuinfo'):
    names = [line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if line.startswith('model name')]
    model = names[0] if names else model
  return f'{cores} CPU cores ({model})'


def _train(stage: str, workdir: str, data_dir: str, extra: list[str], times: dict, init_from: str | None = None):
  wall = train_stage(stage, f'{CONFIG}:{stage}', workdir, data_dir, extra, _steps_of(stage, extra), init_from)
  if wall is not None:
    times[stage] = wall


def _steps_of(stage: str, extra: list[str]) -> int:
  """train.steps as the command will see it: the last override after `--`, else configs/demo.py."""
  for arg in reversed(extra):
    if arg.startswith('--config.train.steps='):
      return int(arg.split('=', 1)[1])
  return config_value(CONFIG, stage, {}, 'train.steps')


def _evaluate(model: str, data: dict, out: str, times: dict) -> None:
  wall = evaluate_stage(model, ['--mmeb_dir', data['mmeb_eval_raw'], '--image_root', data['mmeb_eval_images'],
                                '--task_table', data['task_table']], out)
  if wall is not None:
    times['evaluate'] = wall


def loss_fell(workdir: str, window: int = 10) -> tuple[float, float]:
  """The mean training loss over the first and the last `window` steps."""
  losses = [r['loss'] for r in run_records(workdir) if 'split' not in r]
  w = max(1, min(window, len(losses) // 2))
  return sum(losses[:w]) / w, sum(losses[-w:]) / w


def learned(report: dict) -> list[str]:
  """Why the model did not learn, per retrieval / classification dataset; empty when it did."""
  problems = []
  for name, d in report['aggregate']['datasets'].items():
    if d['meta_task'] in LEARNED_TASKS and d.get('chance'):
      if d['p_at_1'] < MIN_P_AT_1 or d['p_at_1'] < MIN_RATIO * d['chance']:
        problems.append(f'{name}: P@1 {d["p_at_1"]:.3f} (chance {d["chance"]:.3f}) is below '
                        f'max({MIN_P_AT_1}, {MIN_RATIO:g} x chance)')
  return problems


def table(report: dict) -> str:
  """The P@1 table: each dataset beside its chance level, then each meta-task and the overall mean."""
  agg = report['aggregate']
  rows = ['| task | meta-task | P@1 | chance | x chance |', '|---|---|---|---|---|']
  for name, d in agg['datasets'].items():
    ratio = f'{d["p_at_1"] / d["chance"]:.1f}' if d.get('chance') else '-'
    chance = f'{d["chance"]:.3f}' if d.get('chance') is not None else '-'
    rows.append(f'| {name} | {d["meta_task"]} | {d["p_at_1"]:.3f} | {chance} | {ratio} |')
  custom = agg['custom']
  for task, g in custom['meta_tasks'].items():
    chance = _mean_chance(agg, g['datasets'])
    rows.append(f'| **{task}** (mean) | | {g["mean"]:.3f} | {chance:.3f} | {g["mean"] / chance:.1f} |')
  chance = _mean_chance(agg, custom['datasets'])
  rows.append(f'| **overall** (mean) | | {custom["mean"]:.3f} | {chance:.3f} | {custom["mean"] / chance:.1f} |')
  return '\n'.join(rows)


def _mean_chance(agg: dict, names: list[str]) -> float:
  return sum(agg['datasets'][n]['chance'] for n in names) / len(names)


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  extra = argv[argv.index('--') + 1:] if '--' in argv else []
  argv = argv[:argv.index('--')] if '--' in argv else argv
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', default=os.path.join('runs', 'demo'), help='everything the demo writes')
  parser.add_argument('--size', default='full', choices=['smoke', 'full'], help='the demo data size')
  parser.add_argument('--seed', type=int, default=0, help='the demo data seed')
  parser.add_argument('--data_dir', default=None, help='built demo data to use (default: WORKDIR/data)')
  args = parser.parse_args(argv)
  if not os.path.isfile(CONFIG):
    print(f'error: {CONFIG} not found: run the demo from a clone of the repository', file=sys.stderr)
    return 1
  from coma_jax.data.demo import build_demo_data
  work = os.path.abspath(args.workdir)
  os.makedirs(work, exist_ok=True)
  times_path = os.path.join(work, TIMES)
  times = json.load(open(times_path)) if os.path.exists(times_path) else {}
  stage1, stage2, report_dir = (os.path.join(work, n) for n in ('stage1', 'stage2', 'report'))
  try:
    print(f'data: building the demo data ({args.size}, seed {args.seed})', flush=True)
    start = time.monotonic()
    data = build_demo_data(os.path.abspath(args.data_dir or os.path.join(work, 'data')), args.size, args.seed)
    if data['reused_raw'] and 'data' in times:
      print(f'data: {show(data["data_dir"])} (built before; reused)', flush=True)
    else:
      times['data'] = round(time.monotonic() - start, 1)
      print(f'data: {show(data["data_dir"])} ({times["data"]} s)', flush=True)
    _train('stage1', stage1, data['data_dir'], extra, times)
    _train('stage2', stage2, data['data_dir'], extra, times, init_from=stage1)
    _evaluate(stage2, data, report_dir, times)
  except StageFailed as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  finally:
    with open(times_path, 'w') as f:
      json.dump(times, f, indent=1)
  report = json.load(open(os.path.join(report_dir, 'report.json')))
  print('\nHeld-out evaluation (Precision@1; chance = 1 / candidates):\n' + table(report))
  print(f'\nWall time on {machine()}: ' + ', '.join(f'{k} {v:.0f} s' for k, v in times.items()))
  falls = {stage: loss_fell(d) for stage, d in (('stage 1', stage1), ('stage 2', stage2))}
  print('Training loss (mean of the first and last 10 steps): '
        + '; '.join(f'{s} {a:.3f} -> {b:.3f}' for s, (a, b) in falls.items()))
  print(show(f'\nArtefacts:\n  data:     {data["data_dir"]} (built datasets; raw/ and mmeb_eval_raw/ hold the files)\n'
              f'  stage 1:  {stage1} (checkpoints/, metrics.jsonl, tensorboard/, plots/, train.log)\n'
              f'  stage 2:  {stage2} (the same, and the embedding model: coma_jax.Embedder.load)\n'
              f'  report:   {report_dir} (report.md, report.json, report.png, evaluate.log)'))
  if args.size != 'full':
    print('\n(smoke size: too little training to check what was learned)')
    return 0
  problems = learned(report) + [f'{s}: the training loss did not fall ({a:.3f} -> {b:.3f})'
                                for s, (a, b) in falls.items() if not b < a]
  if problems:
    print('\nThe demo did not learn what it should:\n  ' + '\n  '.join(problems), file=sys.stderr)
    return 1
  print('\nLearned: retrieval and classification P@1 >= 0.5 and >= 3x chance; both losses fell.')
  return 0


if __name__ == '__main__':
  sys.exit(main())
