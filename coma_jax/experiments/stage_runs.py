"""One stage of a chain as a subprocess (`python -m coma_jax.train ...`, `python -m coma_jax.evaluate
...`), its log in its workdir, progress printed from its metrics; a finished stage is skipped and an
interrupted one resumes (the trainer resumes from its last checkpoint)."""
from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import time

from coma_jax.plot import run_records

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class StageFailed(RuntimeError):
  pass


def show(text: str) -> str:
  """Paths under the current folder, shown relative to it (shorter, and what a user would type)."""
  return text.replace(os.path.join(os.getcwd(), ''), '')


def latest_step(workdir: str) -> int | None:
  from coma_jax.training.workdir import checkpoints_of
  if not os.path.isfile(os.path.join(workdir, 'config.json')):
    return None
  logging.getLogger('absl').setLevel(logging.ERROR)  # orbax warns that a read-only manager is read-only
  ckpts = checkpoints_of(workdir)
  try:
    return ckpts.latest_step()
  finally:
    ckpts.close()


def config_value(config_file: str, variant: str, overrides: dict, key: str):
  """A key of `config_file:variant` after `overrides` ({'train.steps': 10}), as the trainer sees it."""
  spec = importlib.util.spec_from_file_location('_stage_config', config_file)
  module = importlib.util.module_from_spec(spec)
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  spec.loader.exec_module(module)
  if key in overrides:
    return overrides[key]
  value = module.get_config(variant)
  for part in key.split('.'):
    value = value[part]
  return value


def run_command(name: str, cmd: list[str], log_path: str, workdir: str | None = None, total: int | None = None,
                quiet: bool = False) -> None:
  """Runs a stage's command with its output in log_path, printing progress from its metrics."""
  if not quiet:
    print(f'  $ python {show(" ".join(cmd[1:]))}\n    log: {show(log_path)}', flush=True)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get('PYTHONPATH')])))
  with open(log_path, 'a') as log:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    shown, last_print = 0, time.monotonic()
    while proc.poll() is None:
      time.sleep(1.0)
      if workdir is None or quiet:
        continue
      train = [r for r in run_records(workdir) if 'split' not in r]
      if train and train[-1]['step'] != shown and (time.monotonic() - last_print > 15 or train[-1]['step'] == total):
        r = train[-1]
        eta = (total - r['step']) / max(r.get('steps_per_s') or 0, 1e-9) if total else 0
        print(f'    step {r["step"]}/{total}  loss {r["loss"]:.4f}  {r.get("steps_per_s", 0):.2f} steps/s  '
              f'eta {eta:.0f} s', flush=True)
        shown, last_print = r['step'], time.monotonic()
  if proc.returncode != 0:
    tail = open(log_path, errors='replace').read().splitlines()[-30:]
    raise StageFailed(f'{name} failed (exit status {proc.returncode}); the end of {log_path}:\n' + '\n'.join(tail))


def train_stage(name: str, config: str, workdir: str, data_dir: str, overrides: list[str], total: int,
                init_from: str | None = None, quiet: bool = False) -> float | None:
  """Trains `config` (FILE:variant) into workdir unless it has `total` steps already; returns the
  wall time, or None when skipped."""
  cmd = [sys.executable, '-m', 'coma_jax.train', '--config', config, '--workdir', workdir,
         f'--config.data.data_dir={data_dir}'] + ([f'--config.init_from={init_from}'] if init_from else []) + overrides
  latest = latest_step(workdir)
  if latest is not None and latest >= total:
    if not quiet:
      print(f'{name}: finished ({latest} steps) in {show(workdir)}; skipped')
    return None
  print(f'{name}: ' + (f'resuming from step {latest} of {total}' if latest else f'training {total} steps'), flush=True)
  os.makedirs(workdir, exist_ok=True)
  start = time.monotonic()
  run_command(name, cmd, os.path.join(workdir, 'train.log'), workdir, total, quiet)
  return round(time.monotonic() - start, 1)


def evaluate_stage(model: str, eval_args: list[str], out: str, quiet: bool = False) -> float | None:
  """`python -m coma_jax.evaluate --model MODEL EVAL_ARGS --out OUT`, unless OUT/report.json is
  newer than the model's checkpoints; returns the wall time, or None when skipped."""
  report = os.path.join(out, 'report.json')
  latest = os.path.join(model, 'checkpoints')
  if os.path.isfile(report) and os.path.getmtime(report) > os.path.getmtime(latest):
    if not quiet:
      print(f'evaluate: {show(report)} is newer than the model\'s checkpoints; skipped')
    return None
  os.makedirs(out, exist_ok=True)
  cmd = [sys.executable, '-m', 'coma_jax.evaluate', '--model', model, *eval_args, '--out', out]
  start = time.monotonic()
  run_command('evaluate', cmd, os.path.join(out, 'evaluate.log'), quiet=quiet)
  return round(time.monotonic() - start, 1)
