"""Bulk embedding: `python -m coma_jax.embed --model PATH --input FILE.jsonl|parquet --out DIR`.

  [--image_root DIR] [--role query|target] [--shard_size N] [--batch_size N]

Input rows: `id` (required), and optionally `text`, `image` (a path, relative to --image_root)
and `instruction`. Rows are cut into shards of --shard_size; shard s belongs to process
s % process_count, which writes DIR/embeddings-{process}-{shard}.npy (float32, L2-normalised) and
DIR/ids-{process}-{shard}.json. Each file is written whole under a temporary name and renamed, so a
killed run leaves only complete shards; rerunning skips them and gives files equal to an
uninterrupted run. Process 0 writes DIR/manifest.json last.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import numpy as np

from coma_jax.data.formats import Side, check_text, read_rows
from coma_jax.eval.embedder import add_model_arguments, compose_text, embedder_from_args

log = logging.getLogger('coma_jax.embed')


class EmbedInputError(ValueError):
  """A row that cannot be embedded; the message names it."""


def read_items(path: str, image_root: str | None) -> list[dict]:
  items = []
  for location, row in read_rows(path):
    if isinstance(row, Exception):
      raise EmbedInputError(f'{location}: {row}')
    if row.get('id') in (None, ''):
      raise EmbedInputError(f'{location}: no id')
    item = {'id': str(row['id'])}
    for key in ('text', 'image', 'instruction'):
      try:
        item[key] = check_text(row.get(key), location, key) or None
      except ValueError as e:
        raise EmbedInputError(f'{location}: {e}') from None
    if item['image'] and image_root and not os.path.isabs(item['image']):
      item['image'] = os.path.join(image_root, item['image'])
    if item['image'] and not os.path.isfile(item['image']):
      raise EmbedInputError(f'{location} (id {item["id"]}): missing image {item["image"]}')
    if not item['text'] and not item['image'] and not item['instruction']:
      raise EmbedInputError(f'{location} (id {item["id"]}): neither text nor image')
    items.append(item)
  return items


def _write_atomic(path: str, write) -> None:
  tmp = f'{path}.tmp'
  with open(tmp, 'wb') as f:
    write(f)
  os.replace(tmp, path)


def shard_paths(out: str, process: int, shard: int) -> tuple[str, str]:
  return (os.path.join(out, f'embeddings-{process}-{shard}.npy'), os.path.join(out, f'ids-{process}-{shard}.json'))


def embed_file(embedder, items: list[dict], out: str, *, role: str = 'query', shard_size: int = 4096,
               batch_size: int = 8, process_index: int = 0, process_count: int = 1) -> list[dict]:
  """Writes this process's missing shards; returns every shard's entry for the manifest."""
  os.makedirs(out, exist_ok=True)
  shards = []
  for shard, start in enumerate(range(0, len(items), shard_size)):
    owner = shard % process_count
    rows = items[start:start + shard_size]
    emb_path, ids_path = shard_paths(out, owner, shard)
    shards.append({'process': owner, 'shard': shard, 'rows': len(rows), 'embeddings': os.path.basename(emb_path),
                   'ids': os.path.basename(ids_path)})
    if owner != process_index or (os.path.exists(emb_path) and os.path.exists(ids_path)):
      continue  # another process's, or done by an earlier run
    sides = [Side(compose_text(r['text'], r['instruction'], r['image'] is not None), r['image']) for r in rows]
    vectors = embedder.encode_sides(sides, batch_size)
    _write_atomic(emb_path, lambda f: np.save(f, vectors.astype(np.float32)))
    _write_atomic(ids_path, lambda f: f.write(json.dumps([r['id'] for r in rows]).encode()))
    log.info('shard %d: %d rows', shard, len(rows))
  return shards


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_model_arguments(parser)
  parser.add_argument('--input', required=True)
  parser.add_argument('--image_root', default=None)
  parser.add_argument('--role', choices=['query', 'target'], default='query')
  parser.add_argument('--shard_size', type=int, default=4096)
  parser.add_argument('--out', required=True)
  args = parser.parse_args(argv)
  from coma_jax.parallel.distributed import initialize_from_env
  initialize_from_env()  # launched on several hosts (launch/): one process each
  import jax
  try:
    items = read_items(args.input, args.image_root)
  except EmbedInputError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  embedder = embedder_from_args(args)
  shards = embed_file(embedder, items, args.out, role=args.role, shard_size=args.shard_size,
                      batch_size=args.batch_size, process_index=jax.process_index(), process_count=jax.process_count())
  if jax.process_index() == 0:
    manifest = {'model': args.model, 'input': args.input, 'role': args.role, 'rows': len(items),
                'dim': embedder.dim, 'shard_size': args.shard_size, 'shards': shards, 'embedding': embedder.metadata}
    _write_atomic(os.path.join(args.out, 'manifest.json'), lambda f: f.write(json.dumps(manifest, indent=2).encode()))
  print(f'{len(items)} rows in {len(shards)} shards under {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
