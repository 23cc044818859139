"""The sweep's results: per arm, the evaluation metrics of each seed, their mean with a 95 %
interval, and the paired difference from the baseline arm; as results.json, results.md and a plot."""
from __future__ import annotations

import json
import os

from coma_jax.experiments.stats import mean_interval, paired_difference


def metrics_of(report: dict) -> dict[str, float]:
  """'overall' and each meta-task's mean P@1: the custom task table's when there is one (the
  demo's), else MMEB's."""
  agg = report['aggregate']
  group = agg['custom'] if agg.get('custom', {}).get('mean') is not None else agg
  out = {'overall': group['mean'] if 'mean' in group else agg['overall']['mean']}
  for task, g in group.get('meta_tasks', {}).items():
    if g.get('mean') is not None:
      out[task] = g['mean']
  return out


def collect(reports: dict[str, dict[int, str]], baseline: str | None) -> dict:
  """reports: arm -> seed -> report.json path (arms or seeds not evaluated yet are left out)."""
  arms = {}
  for arm, by_seed in reports.items():
    per_seed = {seed: metrics_of(json.load(open(path))) for seed, path in sorted(by_seed.items())}
    if not per_seed:
      continue
    names = sorted({m for v in per_seed.values() for m in v}, key=lambda m: (m != 'overall', m))
    arms[arm] = {'seeds': per_seed,
                 'metrics': {m: mean_interval([v[m] for v in per_seed.values() if m in v]) for m in names}}
  if baseline in arms:
    base = {s: v['overall'] for s, v in arms[baseline]['seeds'].items()}
    for arm, r in arms.items():
      if arm != baseline:
        r['vs_baseline'] = paired_difference({s: v['overall'] for s, v in r['seeds'].items()}, base)
  return {'baseline': baseline, 'arms': arms}


def _fmt(s: dict | None, signed: bool = False) -> str:
  if not s:
    return '-'
  f = (lambda x: f'{x:+.3f}') if signed else (lambda x: f'{x:.3f}')
  return f(s['mean']) + (f' [{f(s["low"])}, {f(s["high"])}]' if s['low'] is not None else '')


def markdown(results: dict, title: str) -> str:
  arms = results['arms']
  tasks = sorted({m for r in arms.values() for m in r['metrics'] if m != 'overall'})
  lines = [f'# {title}', '', 'Precision@1 on the held-out evaluation set: mean over seeds, 95 % interval '
           "(Student's t) in brackets" + (f'; the difference from **{results["baseline"]}** is paired by seed.'
                                         if results.get('baseline') else '.'), '',
           '| arm | seeds | overall P@1 | vs baseline | ' + ' | '.join(tasks) + ' |',
           '|---|---|---|---|' + '---|' * len(tasks)]
  for arm, r in arms.items():
    m = r['metrics']
    lines.append(f'| {arm} | {m["overall"]["n"]} | {_fmt(m["overall"])} | {_fmt(r.get("vs_baseline"), True)} | '
                 + ' | '.join(f'{m[t]["mean"]:.3f}' if t in m else '-' for t in tasks) + ' |')
  lines += ['', 'Per seed (overall P@1): ' + '; '.join(
      f'{arm}: ' + ', '.join(f'{v["overall"]:.3f}' for v in r['seeds'].values()) for arm, r in arms.items())]
  return '\n'.join(lines) + '\n'


def plot(results: dict, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  arms = list(results['arms'])
  fig, ax = plt.subplots(figsize=(1.6 * len(arms) + 2, 4))
  for i, arm in enumerate(arms):
    r = results['arms'][arm]
    s = r['metrics']['overall']
    err = None if s['low'] is None else [[s['mean'] - s['low']], [s['high'] - s['mean']]]
    ax.bar(i, s['mean'], color='tab:blue' if arm != results.get('baseline') else 'tab:gray', alpha=0.6)
    ax.errorbar(i, s['mean'], yerr=err, color='black', capsize=6)
    values = [v['overall'] for v in r['seeds'].values()]
    ax.scatter([i] * len(values), values, color='black', s=12, zorder=3)
  ax.set_xticks(range(len(arms)), arms, rotation=20, ha='right')
  ax.set_ylabel('overall P@1')
  ax.set_title('mean over seeds, 95 % interval; dots: seeds', fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(results: dict, workdir: str, title: str) -> None:
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(markdown(results, title))
  if results['arms']:
    plot(results, os.path.join(workdir, 'results.png'))
