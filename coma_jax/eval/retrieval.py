"""Precision@1 of ranking candidates by cosine similarity: each query's candidate 0 is the positive."""
from __future__ import annotations

import numpy as np


def precision_at_1(queries: np.ndarray, candidates: list[np.ndarray]) -> float:
  """queries (Q, D) unit vectors; candidates[q] (C_q, D) unit vectors, index 0 the positive.
  A query scores 1 when the positive is strictly the most similar (ties count against it)."""
  hits = []
  for q, cands in zip(queries, candidates):
    scores = cands @ q
    hits.append(float(scores[0] > np.max(scores[1:], initial=-np.inf)))
  return float(np.mean(hits)) if hits else float('nan')


def mean_cosine(embeddings: np.ndarray) -> float:
  """Mean pairwise cosine similarity of unit vectors (1.0: every embedding is the same: collapse)."""
  n = len(embeddings)
  if n < 2:
    return float('nan')
  sims = embeddings @ embeddings.T
  return float((sims.sum() - np.trace(sims)) / (n * (n - 1)))
