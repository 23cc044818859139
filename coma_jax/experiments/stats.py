"""Means with 95 % intervals over seeds (Student's t), and paired differences."""
from __future__ import annotations

import math


def t_quantile(df: int, p: float = 0.975) -> float:
  from scipy import stats
  return float(stats.t.ppf(p, df))


def mean_interval(values: list[float]) -> dict:
  """{'n', 'mean', 'low', 'high', 'sd'}: the 95 % interval of the mean (none from one value)."""
  n = len(values)
  mean = sum(values) / n
  if n < 2:
    return {'n': n, 'mean': mean, 'low': None, 'high': None, 'sd': None}
  sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
  half = t_quantile(n - 1) * sd / math.sqrt(n)
  return {'n': n, 'mean': mean, 'low': mean - half, 'high': mean + half, 'sd': sd}


def paired_difference(values: dict, baseline: dict) -> dict | None:
  """Seed by seed (the seeds both have): value - baseline, with its interval."""
  seeds = sorted(set(values) & set(baseline))
  return mean_interval([values[s] - baseline[s] for s in seeds]) if seeds else None
