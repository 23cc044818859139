"""An MMEB evaluation's report: report.json (everything), report.md (tables) and report.png (P@1 bars)."""
from __future__ import annotations

import json
import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from coma_jax.eval.mmeb_scores import SPLITS, normalize_name

REPORT_JSON = 'report.json'
REPORT_MD = 'report.md'
REPORT_PNG = 'report.png'


def write_report(out_dir: str, per_dataset_scores: dict, aggregate_output: dict, meta: dict) -> list:
  """Writes the three report files into out_dir and returns their paths.
  per_dataset_scores: name -> score_dataset result; aggregate_output: aggregate() of the same scores;
  meta: what produced them (model path, tie rule, ...)."""
  rows = _dataset_rows(per_dataset_scores, aggregate_output)
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, name) for name in (REPORT_JSON, REPORT_MD, REPORT_PNG)]
  with open(paths[0], 'w', encoding='utf-8') as f:
    json.dump({'meta': meta, 'datasets': rows, 'aggregate': aggregate_output}, f, indent=2, default=str)
    f.write('\n')
  with open(paths[1], 'w', encoding='utf-8') as f:
    f.write(_markdown(rows, aggregate_output, meta))
  _bar_chart(rows, aggregate_output, meta, paths[2])
  return paths


def _dataset_rows(per_dataset_scores: dict, aggregate_output: dict) -> dict:
  """Each scored dataset's score_dataset result joined with its aggregate entry (meta-task, split, chance);
  the chance of a random ranking stands in where the task table gave none."""
  scores = {normalize_name(name): score for name, score in per_dataset_scores.items()}
  rows = {}
  for name, info in aggregate_output['datasets'].items():
    score = scores.pop(normalize_name(name), None)
    if score is None:
      raise ValueError(f'aggregate_output has {name!r}, which per_dataset_scores lacks')
    if abs(score['p_at_1'] - info['p_at_1']) > 1e-12:
      raise ValueError(f'{name!r}: P@1 {score["p_at_1"]} in per_dataset_scores, {info["p_at_1"]} in aggregate_output')
    chance = info['chance'] if info['chance'] is not None else score.get('chance')
    rows[name] = {**score, **info, 'chance': chance}
  if scores:
    raise ValueError(f'per_dataset_scores has datasets missing from aggregate_output: {sorted(scores)}')
  return rows


def _percent(value) -> str:
  return '–' if value is None else f'{100 * value:.2f}'


def _summary_groups(aggregate_output: dict) -> list:
  """(label, group) of every average, MMEB v1 first, then the custom ones."""
  groups = list(aggregate_output['meta_tasks'].items())
  groups += [(split, aggregate_output[split]) for split in SPLITS] + [('overall', aggregate_output['overall'])]
  custom = aggregate_output['custom']
  if custom['datasets']:
    groups += [(f'custom: {task}', group) for task, group in custom['meta_tasks'].items()] + [('custom', custom)]
  return groups


def _markdown(rows: dict, aggregate_output: dict, meta: dict) -> str:
  lines = ['# MMEB evaluation', '']
  lines += [f'- {key}: {value}' for key, value in meta.items()]
  lines += ['', '| dataset | meta-task | split | P@1 (%) | ties | queries | chance (%) |',
            '|---|---|---|---:|---:|---:|---:|']
  for name, row in rows.items():
    split = row['split'] or row['benchmark']
    lines.append(f"| {name} | {row['meta_task'] or '–'} | {split} | {_percent(row['p_at_1'])} | "
                 f"{row.get('ties', '–')} | {row.get('queries', '–')} | {_percent(row['chance'])} |")
  lines += ['', '| average | P@1 (%) | datasets |', '|---|---:|---:|']
  groups = _summary_groups(aggregate_output)
  for label, group in groups:
    scored = len(group['datasets']) - len(group['missing'])
    lines.append(f"| {label} | {_percent(group['mean'])} | {scored}/{len(group['datasets'])} |")
  missing = [f'missing: {label}: {", ".join(group["missing"])}' for label, group in groups if group['missing']]
  if missing:
    lines += [''] + [f'{line}  ' for line in missing]  # two spaces: a markdown line break
  return '\n'.join(lines) + '\n'


def _bar_chart(rows: dict, aggregate_output: dict, meta: dict, path: str) -> None:
  names = list(rows)
  tasks = list(dict.fromkeys(row['meta_task'] or row['benchmark'] for row in rows.values()))
  palette = [f'C{i % 10}' for i in range(len(tasks))]
  figure = Figure(figsize=(8, 1.5 + 0.28 * max(len(names), 1)))
  FigureCanvasAgg(figure)  # the Agg backend: files only, no display
  axes = figure.add_subplot()
  for task, colour in zip(tasks, palette):
    ys = [i for i, name in enumerate(names) if (rows[name]['meta_task'] or rows[name]['benchmark']) == task]
    axes.barh(ys, [100 * rows[names[i]]['p_at_1'] for i in ys], color=colour, label=task)
  chance = [(i, 100 * row['chance']) for i, row in enumerate(rows.values()) if row['chance'] is not None]
  if chance:
    axes.scatter([x for _, x in chance], [y for y, _ in chance], marker='|', s=200, color='black',
                 zorder=3, label='chance')
  axes.set_yticks(range(len(names)), names, fontsize=8)
  axes.set_ylim(len(names) - 0.5, -0.5)  # first dataset at the top
  axes.set_xlim(0, 100)
  axes.set_xlabel('P@1 (%)')
  overall = aggregate_output['overall']['mean']
  title = f"MMEB P@1{'' if overall is None else f' (overall {100 * overall:.2f}%)'}"
  if meta.get('model'):
    title += f"\n{meta['model']}"
  axes.set_title(title, fontsize=9)
  if names:
    axes.legend(fontsize=7, loc='lower right')
  axes.grid(axis='x', alpha=0.3)
  figure.tight_layout()
  figure.savefig(path, dpi=100)
