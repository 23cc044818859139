"""Synthetic raw datasets from real photos (shipped with scikit-image), for the benchmarks and the
data tests: stage-1 QA JSONL and MMEB-train subsets, optionally with one record of each bad kind.
Sizes, modes and dialogue lengths vary, as real data does; the text does not depend on the image
(the learnable demo data is demo_scenes / demo_records). Everything is deterministic by seed.
"""
from __future__ import annotations

import json
import os

import numpy as np
import skimage.data
from PIL import Image


PHOTOS = (('astronaut', skimage.data.astronaut), ('coffee', skimage.data.coffee), ('cat', skimage.data.chelsea),
          ('cameraman', skimage.data.camera), ('rocket', skimage.data.rocket))


def write_photos(root: str, count: int = 12, seed: int = 0, sizes=(60, 420)) -> list[str]:
  """Real photos at mixed sizes (pixels in [sizes)) and modes (RGB, L, RGBA, P, CMYK)."""
  rng = np.random.default_rng(seed)
  sources = [load() for _, load in PHOTOS]
  os.makedirs(root, exist_ok=True)
  paths = []
  for i in range(count):
    img = Image.fromarray(sources[i % len(sources)])
    w, h = int(rng.integers(*sizes)), int(rng.integers(*sizes))
    img = img.resize((w, h))
    mode, ext = [('RGB', 'jpg'), ('L', 'png'), ('RGBA', 'png'), ('P', 'png'), ('CMYK', 'jpg')][i % 5]
    img = img.convert(mode)
    path = os.path.join(root, f'photo_{i}.{ext}')
    img.save(path)
    paths.append(os.path.relpath(path, root))
  return paths


def qa_record(rid, images, turns, rng):
  conv = []
  for t in range(turns):
    q = ' '.join(['what', 'is', 'shown'] * int(rng.integers(1, 6))) + f' #{t}?'
    a = ' '.join(['a', 'photo', 'of', 'something'] * int(rng.integers(1, 12)))
    conv += [{'from': 'human', 'value': ('<image>\n' * len(images) if t == 0 else '') + q},
             {'from': 'gpt', 'value': a}]
  out = {'id': rid, 'conversations': conv}
  if len(images) == 1:
    out['image'] = images[0]
  elif images:
    out['images'] = images
  return out


def qa_lines(photos: list[str], n: int, rng, prefix: str = 'qa') -> list[str]:
  """n good records as JSON lines: 1-2 of `photos` each, 1-5 turns."""
  lines = []
  for i in range(n):
    k = 2 if i % 7 == 3 else 1
    lines.append(json.dumps(qa_record(f'{prefix}{i}', list(rng.choice(photos, k)), int(rng.integers(1, 6)), rng)))
  return lines


def write_stage1_jsonl(root: str, n: int = 40, bad: bool = True, seed: int = 0, sizes=(60, 420)) -> str:
  """n good records (1-2 images, 1-5 turns) plus, if `bad`, one of each bad kind."""
  rng = np.random.default_rng(seed)
  photos = write_photos(os.path.join(root, 'images'), seed=seed, sizes=sizes)
  lines = qa_lines(photos, n, rng)
  if bad:
    img = os.path.join(root, 'images')
    with open(os.path.join(img, 'truncated.jpg'), 'wb') as f:
      f.write(open(os.path.join(img, photos[0]), 'rb').read()[:300])
    open(os.path.join(img, 'empty.png'), 'wb').close()
    lines.append(json.dumps(qa_record('bad_missing', ['does_not_exist.jpg'], 1, rng)))
    lines.append(json.dumps(qa_record('bad_truncated', ['truncated.jpg'], 1, rng)))
    lines.append(json.dumps(qa_record('bad_empty', ['empty.png'], 1, rng)))
    lines.append(json.dumps({'id': 'bad_noconv', 'image': photos[0], 'conversations': []}))
    lines.append(json.dumps(qa_record('bad_count', [photos[0], photos[1]], 1, rng) | {'images': [photos[0]]}))
  path = os.path.join(root, 'qa.jsonl')
  with open(path, 'wb') as f:
    f.write(('\n'.join(lines) + '\n').encode('utf-8'))
    if bad:
      f.write(b'{"id": "bad_utf8", "image": "x.jpg", "conversations": [{"from": "human", "value": "\xff\xfe"}]}\n')
  return path


def write_mmeb_train(root: str, seed: int = 0, sizes=(60, 420), scale: int = 1) -> str:
  """Three subsets (JSONL and parquet; 24, 16 and 20 pairs times `scale`), one with hard negatives."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  rng = np.random.default_rng(seed)
  photos = write_photos(os.path.join(root, 'images'), seed=seed, sizes=sizes)
  raw = os.path.join(root, 'subsets')
  os.makedirs(os.path.join(raw, 'VOC2007'), exist_ok=True)
  os.makedirs(os.path.join(raw, 'MSCOCO_t2i'), exist_ok=True)
  os.makedirs(os.path.join(raw, 'OK-VQA'), exist_ok=True)
  voc = [{'qry': '<|image_1|>\nRepresent the given image for classification', 'qry_image_path': photos[i % 12],
          'pos_text': f'class {i % 5}', 'pos_image_path': ''} for i in range(24 * scale)]
  coco = [{'qry': f'Find me an everyday image that matches the caption: caption {i}', 'qry_image_path': '',
           'pos_text': '<|image_1|>\nRepresent the given image.', 'pos_image_path': photos[(i * 5) % 12],
           'neg_text': '<|image_1|>\nRepresent the given image.', 'neg_image_path': photos[(i * 5 + 1) % 12]}
          for i in range(16 * scale)]
  okvqa = [{'qry': '<|image_1|>\nRepresent the given image with the question: ' + 'why ' * int(rng.integers(1, 30)),
            'qry_image_path': photos[i % 12], 'pos_text': f'answer {i}', 'pos_image_path': ''} for i in range(20 * scale)]
  with open(os.path.join(raw, 'VOC2007', 'original-0.jsonl'), 'w') as f:
    f.write('\n'.join(json.dumps(r) for r in voc) + '\n')
  pq.write_table(pa.Table.from_pylist(coco), os.path.join(raw, 'MSCOCO_t2i', 'original-0.parquet'))
  pq.write_table(pa.Table.from_pylist(okvqa), os.path.join(raw, 'OK-VQA', 'original-0.parquet'))
  return raw
