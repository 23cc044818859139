"""MMEB scoring: Precision@1 of one dataset's embeddings under a chosen tie rule, and the MMEB v1
averages (per meta-task, IND, OOD, overall), each computed only over a complete set of datasets."""
from __future__ import annotations

import functools
import json
import math
import os
import re
from numbers import Number

import numpy as np

TIE_RULES = ('reference', 'strict')
SPLITS = ('IND', 'OOD')
MMEB_V1 = 'MMEB-V1'
CUSTOM = 'custom'
MMEB_V1_FILE = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'data', 'mmeb_v1_datasets.json')


def score_dataset(query_emb, candidate_embs, tie_rule: str = 'reference') -> dict:
  """Precision@1 of queries (Q, D) against candidate_embs[q] (C_q, D), row 0 of each list the positive,
  ranked by dot product (cosine for the unit vectors the embedder returns).
  tie_rule 'reference': argmax takes the lowest index, so a positive tied with the best other candidate
  is a hit (as VLM2Vec's scorer); 'strict': that tie is a miss.
  Returns p_at_1, queries, hits, ties (queries whose positive scores exactly the best other score),
  chance (expected P@1 of a random ranking: mean of 1/C_q) and tie_rule."""
  if tie_rule not in TIE_RULES:
    raise ValueError(f'tie_rule must be one of {TIE_RULES}; got {tie_rule!r}')
  queries = _finite_matrix(query_emb, 'query_emb')
  if len(queries) == 0:
    raise ValueError('query_emb has no queries')
  if len(candidate_embs) != len(queries):
    raise ValueError(f'{len(candidate_embs)} candidate lists for {len(queries)} queries')
  dim = queries.shape[1]
  hits = ties = 0
  inverse_counts = []
  for i, (query, candidates) in enumerate(zip(queries, candidate_embs)):
    candidates = _finite_matrix(candidates, f'candidate_embs[{i}]')
    if candidates.shape[1] != dim or len(candidates) == 0:
      raise ValueError(f'candidate_embs[{i}] must be (C, {dim}) with C >= 1 (row 0 the positive); '
                       f'got shape {candidates.shape}')
    scores = candidates @ query  # float64, so only truly equal embeddings score equal
    best_other = np.max(scores[1:], initial=-np.inf)
    tied = bool(scores[0] == best_other)
    ties += tied
    hits += bool(scores[0] > best_other) or (tied and tie_rule == 'reference')
    inverse_counts.append(1.0 / len(candidates))
  return {'p_at_1': hits / len(queries), 'queries': len(queries), 'hits': hits, 'ties': ties,
          'chance': math.fsum(inverse_counts) / len(queries), 'tie_rule': tie_rule}


def _finite_matrix(array, what: str) -> np.ndarray:
  try:
    matrix = np.asarray(array, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise ValueError(f'{what} is not a numeric array: {e}') from None
  if matrix.ndim != 2:
    raise ValueError(f'{what} must be 2-D (rows, D); got shape {matrix.shape}')
  if not np.all(np.isfinite(matrix)):
    raise ValueError(f'{what} has non-finite values (NaN or inf)')
  return matrix


def normalize_name(name: str) -> str:
  """The spelling-free key of a dataset name: 'OK-VQA', 'OK_VQA' and 'ok vqa' all give 'okvqa'."""
  return re.sub(r'[\W_]+', '', name).lower()


@functools.lru_cache(maxsize=1)
def _mmeb_v1_table() -> tuple:
  with open(MMEB_V1_FILE, encoding='utf-8') as f:
    datasets = json.load(f)['datasets']
  return tuple((name, entry['meta_task'], entry['split']) for name, entry in datasets.items())


def mmeb_v1_table() -> dict:
  """The 36 MMEB v1 datasets, in the benchmark's order: name -> {'meta_task', 'split'}."""
  return {name: {'meta_task': task, 'split': split} for name, task, split in _mmeb_v1_table()}


def load_task_table(path: str) -> dict:
  """A task table from a JSON file: {dataset: {'meta_task': str, 'chance': float}} ('chance' optional)."""
  with open(path, encoding='utf-8') as f:
    return checked_task_table(json.load(f), source=path)


def checked_task_table(table, source: str = 'task_table') -> dict:
  """The task table with every entry checked: dataset -> {'meta_task': str, 'chance': float | None}."""
  if not isinstance(table, dict):
    raise ValueError(f'{source}: expected a JSON object of dataset -> {{meta_task, chance}}')
  checked, keys = {}, {}
  for name, entry in table.items():
    if not isinstance(entry, dict) or not isinstance(entry.get('meta_task'), str) or not entry['meta_task']:
      raise ValueError(f'{source}: {name!r} needs a non-empty string meta_task; got {entry!r}')
    chance = entry.get('chance')
    if chance is not None and not (_is_number(chance) and 0 <= chance <= 1):
      raise ValueError(f'{source}: {name!r} chance must be a number in [0, 1]; got {chance!r}')
    _claim_key(keys, name, source)
    checked[name] = {'meta_task': entry['meta_task'], 'chance': None if chance is None else float(chance)}
  return checked


def _claim_key(keys: dict, name: str, source: str) -> None:
  key = normalize_name(name)
  if not key:
    raise ValueError(f'{source}: dataset name {name!r} has no letters or digits')
  if key in keys:
    raise ValueError(f'{source}: {keys[key]!r} and {name!r} name the same dataset')
  keys[key] = name


def _is_number(value) -> bool:
  return isinstance(value, Number) and not isinstance(value, bool) and math.isfinite(value)


def aggregate(per_dataset: dict, task_table: dict | None = None) -> dict:
  """MMEB v1 averages of per_dataset: name -> P@1 (a float, or a score_dataset result).
  Returns 'datasets' (name -> p_at_1, benchmark, meta_task, split, chance), 'meta_tasks' (the MMEB ones),
  'IND', 'OOD', 'overall' and 'custom' (with its own 'meta_tasks'), each a group
  {'mean', 'datasets', 'missing'} whose mean is None unless every one of its datasets was scored.
  task_table (dataset -> {'meta_task', 'chance'}) describes datasets outside MMEB v1, which then count
  as expected in 'custom', and may add chance levels to MMEB ones."""
  expected = _expected_datasets(checked_task_table(task_table or {}))
  by_key = {normalize_name(name): name for name in expected}
  scores, keys = {}, {}
  for given, value in per_dataset.items():
    _claim_key(keys, given, 'per_dataset')
    name = by_key.get(normalize_name(given), given)
    expected.setdefault(name, {'benchmark': CUSTOM, 'meta_task': None, 'split': None, 'chance': None})
    scores[name] = _p_at_1(given, value)

  def group(names):
    missing = [name for name in names if name not in scores]
    mean = math.fsum(scores[name] for name in names) / len(names) if names and not missing else None
    return {'mean': mean, 'datasets': names, 'missing': missing}

  def members(benchmark, **where):
    return [name for name, info in expected.items()
            if info['benchmark'] == benchmark and all(info[k] == v for k, v in where.items())]

  def meta_task_groups(benchmark):
    tasks = dict.fromkeys(info['meta_task'] for info in expected.values()
                          if info['benchmark'] == benchmark and info['meta_task'] is not None)
    return {task: group(members(benchmark, meta_task=task)) for task in tasks}

  return {
      'datasets': {name: {'p_at_1': scores[name], **info} for name, info in expected.items() if name in scores},
      'meta_tasks': meta_task_groups(MMEB_V1),
      **{split: group(members(MMEB_V1, split=split)) for split in SPLITS},
      'overall': group(members(MMEB_V1)),
      'custom': {**group(members(CUSTOM)), 'meta_tasks': meta_task_groups(CUSTOM)},
  }


def _expected_datasets(task_table: dict) -> dict:
  """MMEB v1 datasets in benchmark order, then the task table's others: name -> benchmark, meta_task,
  split, chance."""
  expected = {name: {'benchmark': MMEB_V1, **entry, 'chance': None} for name, entry in mmeb_v1_table().items()}
  by_key = {normalize_name(name): name for name in expected}
  for name, entry in task_table.items():
    mmeb_name = by_key.get(normalize_name(name))
    if mmeb_name is None:
      expected[name] = {'benchmark': CUSTOM, 'meta_task': entry['meta_task'], 'split': None,
                        'chance': entry['chance']}
    elif entry['meta_task'] != expected[mmeb_name]['meta_task']:
      raise ValueError(f'task_table: {name!r} is MMEB v1 {expected[mmeb_name]["meta_task"]!r}, '
                       f'not {entry["meta_task"]!r}')
    else:
      expected[mmeb_name]['chance'] = entry['chance']
  return expected


def _p_at_1(name: str, value) -> float:
  p = value.get('p_at_1') if isinstance(value, dict) else value
  if not (_is_number(p) and 0 <= p <= 1):
    raise ValueError(f'per_dataset[{name!r}]: P@1 must be a finite number in [0, 1]; got {p!r}')
  return float(p)


def mean_cosine(embeddings) -> float:
  """Mean pairwise cosine similarity of unit vectors (1.0: every embedding is the same: collapse)."""
  embeddings = np.asarray(embeddings, np.float64)
  n = len(embeddings)
  if n < 2:
    return float('nan')
  sims = embeddings @ embeddings.T
  return float((sims.sum() - np.trace(sims)) / (n * (n - 1)))
