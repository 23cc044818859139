"""`sample`: the unique query/positive/negative image paths of chosen MMEB-train subsets."""
from __future__ import annotations

import logging
import os
import random

from coma_jax.data.bad_records import BadRecord
from coma_jax.data.build_tfds import discover_splits
from coma_jax.data.formats import read_rows

log = logging.getLogger('coma_jax.datagen')

REFERENCE_SUBSETS = ('N24News', 'HatefulMemes', 'VOC2007', 'SUN397', 'Visual7W', 'MSCOCO', 'VisDial', 'CIRR',
                     'MSCOCO_i2t', 'MSCOCO_t2i', 'NIGHTS', 'WebQA')
IMAGE_FIELDS = ('qry_image_path', 'pos_image_path', 'neg_image_path')
SEED, PER_SUBSET = 42, 30_000


def relative_image(path: str, image_root: str) -> str:
  """A row's image path relative to the image root (MMEB's paths already are)."""
  return os.path.relpath(path, image_root) if os.path.isabs(path) else os.path.normpath(path)


def sample_images(input_dir: str, image_root: str, subsets=REFERENCE_SUBSETS, *, seed: int = SEED,
                  per_subset: int = PER_SUBSET, split_prefix: str = '') -> list[dict]:
  """[{id, image, subset}], per subset: its unique image paths (any side), sorted, shuffled with
  `seed`, at most `per_subset`. Deterministic. A chosen subset that is missing is an error."""
  splits = discover_splits(input_dir, split_prefix)
  missing = [s for s in subsets if s not in splits]
  if missing:
    raise FileNotFoundError(f'subsets {missing} are not under {input_dir} (found: {sorted(splits)})')
  out = []
  for subset in subsets:
    paths, bad = set(), 0
    for file in splits[subset]:
      for _, row in read_rows(file):
        if isinstance(row, BadRecord):
          bad += 1
          continue
        for field in IMAGE_FIELDS:
          value = row.get(field)
          if isinstance(value, str) and value.strip():
            paths.add(relative_image(value.strip(), image_root))
    chosen = sorted(paths)
    random.Random(seed).shuffle(chosen)
    chosen = chosen[:per_subset]
    log.info('%s: %d unique images, %d sampled%s', subset, len(paths), len(chosen),
             f', {bad} unreadable rows skipped' if bad else '')
    out += [{'id': f'{subset}/{path}', 'image': path, 'subset': subset} for path in chosen]
  return out
