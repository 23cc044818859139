"""Run a grid of arms x seeds, each arm a chain of training stages, and report the evaluation with
95 % intervals over seeds.

  python -m coma_jax.sweep --sweep configs/sweeps/coma_effect.py --workdir runs/coma_effect
  python -m coma_jax.sweep --sweep my_sweep.py --workdir DIR [--arms A,B] [--seeds 0,1] [-- --config.key=value ...]

The sweep file says which configs each stage uses and with which overrides (see
`coma_jax/experiments/grid.py`); point it at your own configs and data unchanged. Every stage is
the command a user would type (`python -m coma_jax.train ...`, then `python -m coma_jax.evaluate`),
run as a subprocess with its log in its workdir. A rerun skips finished stages and evaluations and
resumes an interrupted stage, so a killed sweep continues where it stopped. Arguments after `--` go
to every training stage (the tests use them for a smoke-size sweep). Writes DIR/results.json,
DIR/results.md and DIR/results.png, also after a stage fails (with what finished).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from coma_jax.experiments import results as results_lib
from coma_jax.experiments.grid import SweepError, chains, load_sweep, stage_dir
from coma_jax.experiments.stage_runs import StageFailed, config_value, evaluate_stage, show, train_stage


def _data(sweep: dict, workdir: str, demo_dir: str | None) -> tuple[str, list[str]]:
  """(data_dir, evaluate's data arguments)."""
  data = sweep['data']
  if 'demo' in data:
    from coma_jax.data.demo import build_demo_data
    d = build_demo_data(os.path.abspath(demo_dir or os.path.join(workdir, 'data')), data['demo'].get('size', 'full'),
                        data['demo'].get('seed', 0))
    return d['data_dir'], ['--mmeb_dir', d['mmeb_eval_raw'], '--image_root', d['mmeb_eval_images'],
                           '--task_table', d['task_table']]
  if 'data_dir' not in data or 'evaluate' not in data:
    raise SweepError("data: give {'demo': {...}} or {'data_dir': DIR, 'evaluate': [evaluate's arguments]}")
  return data['data_dir'], list(data['evaluate'])


def _steps(stage, extra: list[str]) -> int:
  for arg in reversed(extra):
    if arg.startswith('--config.train.steps='):
      return int(arg.split('=', 1)[1])
  file, _, variant = stage.config.rpartition(':')
  return int(config_value(file, variant, dict(stage.overrides), 'train.steps'))


def run_sweep(spec: str, workdir: str, arms: list[str] | None = None, seeds: list[int] | None = None,
              extra: list[str] = (), demo_dir: str | None = None) -> int:
  sweep = load_sweep(spec)
  all_chains = chains(sweep)
  unknown = [a for a in arms or [] if a not in all_chains]
  if unknown:
    raise SweepError(f'--arms {unknown}: not in the sweep ({list(all_chains)})')
  chosen = {a: c for a, c in all_chains.items() if not arms or a in arms}
  seeds = list(seeds if seeds is not None else sweep['seeds'])
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  times_path = os.path.join(workdir, 'sweep_times.json')
  times = json.load(open(times_path)) if os.path.exists(times_path) else {}
  title = sweep.get('title', os.path.basename(spec.partition(':')[0]))
  reports = {arm: {} for arm in chosen}
  start = time.monotonic()
  status = 0
  try:
    data_dir, eval_args = _data(sweep, workdir, demo_dir)
    for seed in seeds:
      for arm, chain in chosen.items():
        print(f'== {arm}, seed {seed}', flush=True)
        previous = None
        for i, stage in enumerate(chain):
          run_dir = stage_dir(workdir, seed, chain, i)
          wall = train_stage(f'{stage.name} (seed {seed})', stage.config, run_dir, data_dir, stage.flags(seed) + list(extra),
                             _steps(stage, extra), init_from=previous)
          if wall is not None:
            times[os.path.relpath(run_dir, workdir)] = wall
          previous = run_dir
        out = os.path.join(previous, 'report')
        wall = evaluate_stage(previous, eval_args, out)
        if wall is not None:
          times[os.path.relpath(out, workdir)] = wall
        reports[arm][seed] = os.path.join(out, 'report.json')
        with open(times_path, 'w') as f:
          json.dump(times, f, indent=1)
  except StageFailed as e:
    print(f'error: {e}', file=sys.stderr)
    status = 1
  results = results_lib.collect(reports, sweep.get('baseline'))
  results['wall_s_this_run'] = round(time.monotonic() - start, 1)
  results['wall_s_recorded'] = round(sum(times.values()), 1)
  results_lib.write(results, workdir, title)
  print('\n' + results_lib.markdown(results, title))
  print(f'results: {show(os.path.join(workdir, "results.md"))} (and results.json, results.png); '
        f'this run {results["wall_s_this_run"]:.0f} s, all recorded stages {results["wall_s_recorded"]:.0f} s')
  return status


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  extra = argv[argv.index('--') + 1:] if '--' in argv else []
  argv = argv[:argv.index('--')] if '--' in argv else argv
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--sweep', required=True, help='a sweep file, FILE[:variant]')
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--arms', default='', help='only these arms (comma-separated names)')
  parser.add_argument('--seeds', default='', help='only these seeds (comma-separated)')
  parser.add_argument('--data_dir', default=None, help="demo data: where to build (or reuse) it; default WORKDIR/data")
  args = parser.parse_args(argv)
  try:
    return run_sweep(args.sweep, args.workdir, [a for a in args.arms.split(',') if a] or None,
                     [int(s) for s in args.seeds.split(',') if s] or None, extra, args.data_dir)
  except SweepError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1


if __name__ == '__main__':
  sys.exit(main())
