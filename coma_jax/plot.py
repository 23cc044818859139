"""Plots of a run's metrics.jsonl: `python -m coma_jax.plot DIR` writes DIR/plots/loss.png,
validation.png (when the run has validation lines) and throughput.png (when it logged throughput)."""
import argparse
import json
import math
import os
import sys
from numbers import Number

import matplotlib

matplotlib.use('Agg')  # files only: no display on training hosts
import matplotlib.pyplot as plt  # noqa: E402

METRICS_FILE = 'metrics.jsonl'
PLOTS_DIR = 'plots'
VALIDATION_SPLIT = 'validation'
THROUGHPUT_METRICS = ('samples_per_s', 'tokens_per_s')


def read_records(path):
  """The parsable lines of a metrics file; a line torn by a crash is skipped."""
  records = []
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if isinstance(record, dict) and _is_number(record.get('step')):
        records.append(record)
  return records


def run_records(run_dir):
  """The records of a run folder's metrics file; none before its first step is written."""
  path = os.path.join(run_dir, METRICS_FILE)
  return read_records(path) if os.path.exists(path) else []


def _is_number(value):
  return isinstance(value, Number) and not isinstance(value, bool) and math.isfinite(value)


def series(records, name):
  """(steps, values) of one metric, without the lines where it is missing, null or not a number."""
  points = sorted((r['step'], r[name]) for r in records if _is_number(r.get(name)))
  return [s for s, _ in points], [v for _, v in points]


def _split_of(record):
  return record.get('split', 'train')


def _plot(path, panels):
  """One figure with a panel per (title, curves), a line per (label, steps, values) in a panel.
  Panels without points are left out; False (no file) when none is left."""
  panels = [(title, [c for c in curves if c[1]]) for title, curves in panels]
  panels = [(title, curves) for title, curves in panels if curves]
  if not panels:
    return False
  fig, axes = plt.subplots(len(panels), 1, figsize=(8, 3.2 * len(panels)), squeeze=False)
  for ax, (title, curves) in zip(axes[:, 0], panels):
    for label, steps, values in curves:
      ax.plot(steps, values, marker='o' if len(steps) < 30 else None, markersize=3, label=label)
    ax.set_title(title)
    ax.set_xlabel('step')
    ax.grid(True, alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def write_plots(run_dir):
  """Writes the plots of `run_dir` and returns their paths."""
  metrics_path = os.path.join(run_dir, METRICS_FILE)
  if not os.path.isfile(metrics_path):
    raise FileNotFoundError(f'no metrics file: {metrics_path}')
  records = read_records(metrics_path)
  train = [r for r in records if _split_of(r) == 'train']
  validation = [r for r in records if _split_of(r) == VALIDATION_SPLIT]
  plots_dir = os.path.join(run_dir, PLOTS_DIR)
  os.makedirs(plots_dir, exist_ok=True)

  validation_names = sorted({k for r in validation for k, v in r.items()
                             if k not in ('step', 'split') and _is_number(v)})
  # Metrics of different scales (samples vs tokens per second) get panels of their own.
  figures = {
      'loss.png': [('loss', [('train', *series(train, 'loss')),
                             ('validation', *series(validation, 'loss'))])],
      'validation.png': [(f'validation {name}', [(name, *series(validation, name))])
                         for name in validation_names],
      'throughput.png': [(name, [(name, *series(train, name))]) for name in THROUGHPUT_METRICS],
  }
  written = []
  for file_name, panels in figures.items():
    path = os.path.join(plots_dir, file_name)
    if _plot(path, panels):
      written.append(path)
  return written


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('run_dir', help='the directory holding metrics.jsonl')
  args = parser.parse_args(argv)
  try:
    written = write_plots(args.run_dir)
  except FileNotFoundError as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  for path in written:
    print(path)
  return 0


if __name__ == '__main__':
  sys.exit(main())
