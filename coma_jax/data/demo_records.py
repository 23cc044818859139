"""The demo's raw datasets, drawn from `demo_scenes`: stage-1 multi-turn QA (JSONL), MMEB-train
style pairs (one folder per task), and a held-out eval set in the published MMEB-eval layout with
its task table. Every text is computed from what the image shows. Deterministic by seed.

Tasks (the same names in training and evaluation; the eval images are drawn from other seeds):
  SceneCaption_t2i  retrieval       caption -> its scene among others
  SceneCaption_i2t  retrieval       scene -> its caption among others
  ShapeColour       classification  a one-shape scene -> the shape's colour (6)
  ShapeCount        classification  a scene -> how many shapes (4)
  PhotoSubject      classification  a crop of a real photo -> its subject (12)
  SceneVQA          vqa             scene + question -> the answer among the question type's answers
  SceneGrounding    grounding       scene + an object's name -> the crop that holds it
"""
from __future__ import annotations

import json
import os

import numpy as np

from coma_jax.data import demo_scenes as S
from coma_jax.data.qa_pipeline.prompts import CAPTION_PROMPTS

EVAL_FILE = 'test-00000-of-00001.parquet'  # one per dataset folder, as MMEB-eval publishes it
TASK_TABLE = 'task_table.json'
IMAGE_TARGET = '<|image_1|>\nRepresent the given image.'
INSTRUCTIONS = {
    'SceneCaption_t2i': 'Find me an everyday image that matches the given caption: {}',
    'SceneCaption_i2t': '<|image_1|>\nFind an image caption describing the given everyday image.',
    'ShapeColour': '<|image_1|>\nRepresent the given image for classification by colour.',
    'ShapeCount': '<|image_1|>\nRepresent the given image for classification by the number of shapes.',
    'PhotoSubject': '<|image_1|>\nRepresent the given image for classification by subject.',
    'SceneVQA': '<|image_1|>\nRepresent the given image with the following question: {}',
    'SceneGrounding': '<|image_1|>\nSelect the portion of the image that isolates the object labeled as "{}".',
}
GROUNDING_TARGET = '<|image_1|>\nRepresent the given cropped image of the object.'
META_TASKS = {'SceneCaption_t2i': 'retrieval', 'SceneCaption_i2t': 'retrieval', 'ShapeColour': 'classification',
              'ShapeCount': 'classification', 'PhotoSubject': 'classification', 'SceneVQA': 'vqa',
              'SceneGrounding': 'grounding'}
TASKS = tuple(META_TASKS)
RETRIEVAL_CANDIDATES, GROUNDING_CANDIDATES = 20, 6


class ImageWriter:
  """Saves images under `root/folder/` and returns their paths relative to root."""

  def __init__(self, root: str, folder: str):
    self.root, self.folder, self.count = root, folder, 0
    os.makedirs(os.path.join(root, folder), exist_ok=True)

  def __call__(self, image) -> str:
    rel = f'{self.folder}/{self.count:06d}.jpg'
    image.save(os.path.join(self.root, rel), quality=92)
    self.count += 1
    return rel


def _unique_scenes(rng, n: int, count: int | None = None) -> list:
  """n scenes with pairwise distinct captions (a caption must single out its scene)."""
  scenes, seen = [], set()
  while len(scenes) < n:
    scene = S.random_scene(rng, count)
    if S.caption(scene) not in seen:
      seen.add(S.caption(scene))
      scenes.append(scene)
  return scenes


# ---- stage 1 ---------------------------------------------------------------------------------

def stage1_records(n: int, rng, save, prefix: str, two_images_every: int = 0) -> list[dict]:
  """n LLaVA-style records: a scene with 2-3 questions (3 in 5), a scene with a caption request and
  its caption (1 in 5: the short-caption prompts of `coma_jax.datagen captions`), or a photo crop
  with one question; with `two_images_every`, one record in that many shows two scenes (multi-image
  rows, for the tests). Captions are as long as 39 tokens, answers a few."""
  records = []
  for i in range(n):
    if two_images_every and i % two_images_every == 3:
      scenes = [S.random_scene(rng) for _ in range(2)]
      images = [save(S.draw_scene(s, rng)) for s in scenes]
      conv = [{'from': 'human', 'value': '<image>\n<image>\nHow many shapes are in the first image?'},
              {'from': 'gpt', 'value': S.COUNTS[scenes[0].count - 1]},
              {'from': 'human', 'value': 'And in the second?'}, {'from': 'gpt', 'value': S.COUNTS[scenes[1].count - 1]}]
      records.append({'id': f'{prefix}{i}', 'images': images, 'conversations': conv})
      continue
    if i % 5 == 4:
      subject = list(S.PHOTOS)[int(rng.integers(len(S.PHOTOS)))]
      image = save(S.photo_crop(subject, rng))
      turns = [S.photo_questions(subject)[int(rng.integers(2))]]
    elif i % 5 == 2:
      scene = S.random_scene(rng)
      image = save(S.draw_scene(scene, rng))
      turns = [(CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))], S.caption(scene))]
    else:
      scene = S.random_scene(rng)
      image = save(S.draw_scene(scene, rng))
      turns = [(q, a) for q, a, _ in S.questions(scene, rng, int(rng.integers(2, 4)))]
    conv = []
    for t, (q, a) in enumerate(turns):
      conv += [{'from': 'human', 'value': ('<image>\n' if t == 0 else '') + q}, {'from': 'gpt', 'value': a}]
    records.append({'id': f'{prefix}{i}', 'image': image, 'conversations': conv})
  return records


def write_jsonl(path: str, rows: list[dict]) -> str:
  with open(path, 'w') as f:
    f.write(''.join(json.dumps(r) + '\n' for r in rows))
  return path


# ---- pairs (training) and eval rows ----------------------------------------------------------

def _pair(qry: str, pos: str, qry_image: str = '', pos_image: str = '') -> dict:
  return {'qry': qry, 'qry_image_path': qry_image, 'pos_text': pos, 'pos_image_path': pos_image}


def train_pairs(task: str, n: int, rng, save) -> list[dict]:
  """n MMEB-train rows (qry, qry_image_path, pos_text, pos_image_path) of one task."""
  rows = []
  for _ in range(n):
    if task == 'PhotoSubject':
      subject = list(S.PHOTOS)[int(rng.integers(len(S.PHOTOS)))]
      rows.append(_pair(INSTRUCTIONS[task], subject, save(S.photo_crop(subject, rng))))
      continue
    count = 1 if task == 'ShapeColour' else int(rng.integers(2, 5)) if task == 'SceneGrounding' else None
    scene = S.random_scene(rng, count)
    image = S.draw_scene(scene, rng)
    if task == 'SceneCaption_t2i':
      rows.append(_pair(INSTRUCTIONS[task].format(S.caption(scene)), IMAGE_TARGET, pos_image=save(image)))
    elif task == 'SceneCaption_i2t':
      rows.append(_pair(INSTRUCTIONS[task], S.caption(scene), save(image)))
    elif task == 'ShapeColour':
      rows.append(_pair(INSTRUCTIONS[task], scene.shapes[0].colour, save(image)))
    elif task == 'ShapeCount':
      rows.append(_pair(INSTRUCTIONS[task], S.COUNTS[scene.count - 1], save(image)))
    elif task == 'SceneVQA':
      q, a, _ = S.questions(scene, rng, 1)[0]
      rows.append(_pair(INSTRUCTIONS[task].format(q), a, save(image)))
    elif task == 'SceneGrounding':
      shape = scene.shapes[int(rng.integers(scene.count))]
      rows.append(_pair(INSTRUCTIONS[task].format(shape.name), GROUNDING_TARGET, save(image),
                        save(S.crop_shape(image, shape))))
    else:
      raise ValueError(f'unknown demo task {task!r}')
  return rows


def _eval_row(qry: str, qry_image: str, targets: list[tuple[str, str]]) -> dict:
  return {'qry_text': qry, 'qry_img_path': qry_image, 'tgt_text': [t for t, _ in targets],
          'tgt_img_path': [p for _, p in targets]}


def _others(rng, n: int, i: int, k: int) -> list[int]:
  """k indices of 0..n-1 other than i."""
  return [int(j) for j in rng.choice([j for j in range(n) if j != i], k, replace=False)]


def _labels_first(answer: str, vocabulary) -> list[tuple[str, str]]:
  return [(answer, '')] + [(v, '') for v in vocabulary if v != answer]


def eval_rows(task: str, n: int, rng, save) -> tuple[list[dict], float]:
  """n MMEB-eval rows (candidate 0 the positive) and the task's chance level of Precision@1."""
  if task in ('SceneCaption_t2i', 'SceneCaption_i2t'):
    scenes = _unique_scenes(rng, n)
    images = [save(S.draw_scene(s, rng)) for s in scenes]
    k = min(RETRIEVAL_CANDIDATES, n) - 1
    rows = []
    for i, scene in enumerate(scenes):
      order = [i] + _others(rng, n, i, k)
      if task == 'SceneCaption_t2i':
        rows.append(_eval_row(INSTRUCTIONS[task].format(S.caption(scene)), '', [(IMAGE_TARGET, images[j]) for j in order]))
      else:
        rows.append(_eval_row(INSTRUCTIONS[task], images[i], [(S.caption(scenes[j]), '') for j in order]))
    return rows, 1 / (k + 1)
  if task == 'PhotoSubject':
    subjects = [list(S.PHOTOS)[i % len(S.PHOTOS)] for i in range(n)]
    rows = [_eval_row(INSTRUCTIONS[task], save(S.photo_crop(s, rng)), _labels_first(s, S.PHOTOS)) for s in subjects]
    return rows, 1 / len(S.PHOTOS)
  if task in ('ShapeColour', 'ShapeCount'):
    rows = []
    for i in range(n):
      scene = S.random_scene(rng, 1 if task == 'ShapeColour' else i % 4 + 1)
      answer, vocabulary = ((scene.shapes[0].colour, S.COLOURS) if task == 'ShapeColour'
                            else (S.COUNTS[scene.count - 1], S.COUNTS))
      rows.append(_eval_row(INSTRUCTIONS[task], save(S.draw_scene(scene, rng)), _labels_first(answer, vocabulary)))
    return rows, 1 / len(vocabulary)
  if task == 'SceneVQA':
    rows, chance = [], 0.0
    for _ in range(n):
      scene = S.random_scene(rng)
      q, a, vocabulary = S.questions(scene, rng, 1)[0]
      rows.append(_eval_row(INSTRUCTIONS[task].format(q), save(S.draw_scene(scene, rng)), _labels_first(a, vocabulary)))
      chance += 1 / len(vocabulary) / n
    return rows, chance
  if task == 'SceneGrounding':
    scenes = [S.random_scene(rng, int(rng.integers(2, 5))) for _ in range(n)]
    images = [S.draw_scene(s, rng) for s in scenes]
    crops = [[save(S.crop_shape(img, shape)) for shape in s.shapes] for s, img in zip(scenes, images)]
    rows = []
    for i, scene in enumerate(scenes):
      t = int(rng.integers(scene.count))
      targets = [crops[i][t]] + [c for j, c in enumerate(crops[i]) if j != t]  # the scene's other objects
      for j in _others(rng, n, i, GROUNDING_CANDIDATES):  # then objects of other scenes
        targets.append(crops[j][int(rng.integers(len(crops[j])))])
      targets = targets[:GROUNDING_CANDIDATES]
      rows.append(_eval_row(INSTRUCTIONS[task].format(scene.shapes[t].name), save(images[i]),
                            [(GROUNDING_TARGET, p) for p in targets]))
    return rows, 1 / GROUNDING_CANDIDATES
  raise ValueError(f'unknown demo task {task!r}')


def write_mmeb_train(root: str, pairs_per_task: int, seed: int) -> str:
  """`root/subsets/<task>/original-0.jsonl`, images under `root/images/<task>/`. Returns the subsets folder."""
  subsets = os.path.join(root, 'subsets')
  for k, task in enumerate(TASKS):
    rng = np.random.default_rng([seed, 2, k])
    rows = train_pairs(task, pairs_per_task, rng, ImageWriter(os.path.join(root, 'images'), task))
    os.makedirs(os.path.join(subsets, task), exist_ok=True)
    write_jsonl(os.path.join(subsets, task, 'original-0.jsonl'), rows)
  return subsets


def write_mmeb_eval(root: str, queries: int, seed: int) -> str:
  """The published layout (`root/<task>/EVAL_FILE`, images under `root/images/<task>/`) and
  `root/TASK_TABLE` (task -> meta_task, chance). Returns root."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  table = {}
  for k, task in enumerate(TASKS):
    rng = np.random.default_rng([seed, 3, k])  # other streams than training's: held-out images
    rows, chance = eval_rows(task, queries, rng, ImageWriter(os.path.join(root, 'images'), task))
    os.makedirs(os.path.join(root, task), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(root, task, EVAL_FILE))
    table[task] = {'meta_task': META_TASKS[task], 'chance': round(chance, 6)}
  with open(os.path.join(root, TASK_TABLE), 'w') as f:
    json.dump(table, f, indent=1)
  return root
