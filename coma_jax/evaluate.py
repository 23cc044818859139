"""MMEB evaluation: `python -m coma_jax.evaluate --model PATH --mmeb_dir DIR --out OUT`.

  [--image_root DIR] [--datasets A B ...] [--tie_rule reference|strict] [--task_table FILE]
  [--step N | --best]

The model is a coma_jax workdir (or an export): pooling, K, resolution and the compression tokens
come from its coma_embedding.json, so evaluation embeds exactly as training did. Each dataset's
text is used verbatim (MMEB-eval's queries carry their instruction); each unique (text, image) is
encoded once per role. Precision@1 against each query's own candidates (index 0 the positive).
Writes OUT/report.json, report.md and report.png.
"""
from __future__ import annotations

import argparse
import logging
import sys

import numpy as np


def _unique(sides):
  """Unique sides in first-seen order, and each input's index among them."""
  index, order = {}, []
  positions = []
  for side in sides:
    key = (side.text, side.image)
    if key not in index:
      index[key] = len(order)
      order.append(side)
    positions.append(index[key])
  return order, np.asarray(positions, np.int64)


def encode_spread(embedder, sides, batch_size: int) -> np.ndarray:
  """Each process encodes its contiguous share of `sides`; the embeddings are gathered everywhere.
  (With one process: a plain encode. Not yet exercised with several processes in the tests.)"""
  import jax
  count, index = jax.process_count(), jax.process_index()
  if count == 1:
    return embedder.encode_sides(sides, batch_size)
  from jax.experimental import multihost_utils
  per = -(-len(sides) // count)
  local = np.zeros((per, embedder.dim), np.float32)
  mine = sides[index * per:(index + 1) * per]
  if mine:
    local[:len(mine)] = embedder.encode_sides(mine, batch_size)
  gathered = np.asarray(multihost_utils.process_allgather(local))  # (processes, per, D)
  return gathered.reshape(count * per, embedder.dim)[:len(sides)]


def evaluate(embedder, data: dict, tie_rule: str = 'reference', task_table=None, batch_size: int = 8) -> tuple:
  """Per-dataset scores and their aggregate (see eval/mmeb_scores.py)."""
  from coma_jax.data.bad_records import BadRecord
  from coma_jax.eval.mmeb_data import EvalDataError
  from coma_jax.eval.mmeb_scores import aggregate, score_dataset
  per_dataset = {}
  for name, records in data.items():
    queries, q_index = _unique([r.query for r in records])
    candidates, c_index = _unique([c for r in records for c in r.candidates])
    try:
      q = encode_spread(embedder, queries, batch_size)
      c = encode_spread(embedder, candidates, batch_size)
    except BadRecord as e:  # a corrupt image: no skip, it would change the score
      raise EvalDataError(f'{name}: {e}') from None
    lists, start = [], 0
    for r in records:
      lists.append(c[c_index[start:start + len(r.candidates)]])
      start += len(r.candidates)
    per_dataset[name] = score_dataset(q[q_index], lists, tie_rule)
    logging.getLogger('coma_jax.eval').info('%s: P@1 %.4f over %d queries', name, per_dataset[name]['p_at_1'],
                                            len(records))
  return per_dataset, aggregate({n: s['p_at_1'] for n, s in per_dataset.items()}, task_table)


def main(argv=None) -> int:
  from coma_jax.eval.embedder import add_model_arguments
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_model_arguments(parser)
  parser.add_argument('--mmeb_dir', required=True, help='MMEB-eval (published layout) or a data_dir with mmeb_eval')
  parser.add_argument('--image_root', default=None)
  parser.add_argument('--datasets', nargs='*', default=None)
  parser.add_argument('--tie_rule', choices=['reference', 'strict'], default='reference')
  parser.add_argument('--task_table', default=None, help='JSON: dataset -> {meta_task, chance} for non-MMEB data')
  parser.add_argument('--out', required=True)
  args = parser.parse_args(argv)
  from coma_jax.parallel.distributed import initialize_from_env
  initialize_from_env()  # launched on several hosts (launch/): one process each
  from coma_jax.eval.embedder import embedder_from_args
  from coma_jax.eval.mmeb_data import EvalDataError, read_mmeb_eval
  from coma_jax.eval.mmeb_report import write_report
  from coma_jax.eval.mmeb_scores import load_task_table
  try:
    data = read_mmeb_eval(args.mmeb_dir, args.image_root, args.datasets)
    embedder = embedder_from_args(args)
    table = load_task_table(args.task_table) if args.task_table else None
    per_dataset, summary = evaluate(embedder, data, args.tie_rule, table, args.batch_size)
  except (EvalDataError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  import jax
  if jax.process_index() == 0:
    meta = {'model': args.model, 'step': args.step, 'best': args.best, 'tie_rule': args.tie_rule,
            'mmeb_dir': args.mmeb_dir, 'embedding': embedder.metadata}
    for path in write_report(args.out, per_dataset, summary, meta):
      print(path)
  return 0


if __name__ == '__main__':
  sys.exit(main())
