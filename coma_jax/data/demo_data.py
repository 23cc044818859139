"""Synthetic raw datasets from real photos (shipped with scikit-image), for the demo, the
benchmarks and the tests: stage-1 QA JSONL and MMEB-train subsets, optionally with one record of
each bad kind, and MMEB-eval datasets in the published layout. Sizes, modes and dialogue lengths
vary, as real data does. Everything is deterministic by seed.
"""
from __future__ import annotations

import json
import os

import numpy as np
import skimage.data
from PIL import Image


# Photo i shows the subject PHOTOS[i % 5].
PHOTOS = (('astronaut', skimage.data.astronaut), ('coffee', skimage.data.coffee), ('cat', skimage.data.chelsea),
          ('cameraman', skimage.data.camera), ('rocket', skimage.data.rocket))
EVAL_FILE = 'test-00000-of-00001.parquet'  # one per dataset folder, as MMEB-eval publishes it


def photo_subject(index: int) -> str:
  return PHOTOS[index % len(PHOTOS)][0]


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


def write_qa_jsonl(path: str, photos: list[str], n: int, seed: int = 0, prefix: str = 'qa') -> str:
  """A stage-1 JSONL file of n good records over existing photos (paths relative to their root)."""
  with open(path, 'w') as f:
    f.write('\n'.join(qa_lines(photos, n, np.random.default_rng(seed), prefix)) + '\n')
  return path


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


def write_mmeb_eval(root: str, seed: int = 0, sizes=(60, 420), queries: int = 8, photo_count: int = 10) -> str:
  """MMEB-eval as published: `root/<dataset>/EVAL_FILE` and `root/images/<dataset>/`, image paths
  relative to `root/images`. Two datasets of `queries` queries and 5 candidates (index 0 the
  positive): ImageNet-1K (image -> its subject among the 5 labels) and MSCOCO_t2i (caption ->
  the photo of its subject among 4 photos of the others). Returns root."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  labels = [name for name, _ in PHOTOS]
  # A multiple of 5: photo (i + j) % photos then shows another subject than photo i for j in 1..4.
  photos = max(len(PHOTOS), photo_count - photo_count % len(PHOTOS))
  image_tag = '<|image_1|>\nRepresent the given image.'
  datasets = {}
  for k, name in enumerate(('ImageNet-1K', 'MSCOCO_t2i')):
    files = write_photos(os.path.join(root, 'images', name), photos, seed=seed + k, sizes=sizes)
    datasets[name] = [f'{name}/{f}' for f in files]
  classify = [{'qry_text': '<|image_1|>\nRepresent the given image for classification',
               'qry_img_path': datasets['ImageNet-1K'][i % photos], 'tgt_img_path': [''] * len(labels),
               'tgt_text': [photo_subject(i)] + [photo_subject(i + j) for j in range(1, len(labels))]}
              for i in range(queries)]
  caption = 'Find me an everyday image that matches the given caption: a photo of {}.'
  retrieve = [{'qry_text': caption.format(photo_subject(i)),
               'qry_img_path': '', 'tgt_text': [image_tag] * len(labels),
               'tgt_img_path': [datasets['MSCOCO_t2i'][(i + j) % photos] for j in range(len(labels))]}
              for i in range(queries)]
  for name, rows in (('ImageNet-1K', classify), ('MSCOCO_t2i', retrieve)):
    os.makedirs(os.path.join(root, name), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(root, name, EVAL_FILE))
  return root
