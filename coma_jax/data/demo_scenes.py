"""Images a tiny model can learn from, with text that depends on them: procedurally drawn scenes
(1-4 coloured shapes, one per quadrant) and augmented crops of real photos shipped with
scikit-image. Every caption, question and answer is computed from what was drawn, so retrieval,
classification, VQA and grounding are all decidable from the pixels. Deterministic by the rng.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import skimage.data
from PIL import Image, ImageDraw, ImageEnhance

COLOURS = {'red': (220, 40, 40), 'green': (40, 170, 60), 'blue': (40, 80, 220), 'yellow': (235, 210, 40),
           'purple': (150, 60, 190), 'orange': (245, 140, 30)}
SHAPES = ('circle', 'square', 'triangle')
SIZES = ('small', 'large')
POSITIONS = ('top left', 'top right', 'bottom left', 'bottom right')  # quadrant i
COUNTS = ('one', 'two', 'three', 'four')
# Photo subject -> its skimage loader: all ship with the package (no download).
PHOTOS = {'astronaut': skimage.data.astronaut, 'brick wall': skimage.data.brick, 'cameraman': skimage.data.camera,
          'cat': skimage.data.chelsea, 'clock': skimage.data.clock, 'coffee cup': skimage.data.coffee,
          'coins': skimage.data.coins, 'horse': skimage.data.horse, 'galaxies': skimage.data.hubble_deep_field,
          'moon': skimage.data.moon, 'retina': skimage.data.retina, 'rocket': skimage.data.rocket}
SCENE_PX = 112


@dataclasses.dataclass(frozen=True)
class Shape:
  colour: str
  kind: str
  size: str
  position: int  # quadrant index into POSITIONS

  @property
  def name(self) -> str:
    return f'{self.colour} {self.kind}'

  def phrase(self) -> str:
    return f'a {self.size} {self.colour} {self.kind} at the {POSITIONS[self.position]}'


@dataclasses.dataclass(frozen=True)
class Scene:
  shapes: tuple[Shape, ...]  # in quadrant order
  background: tuple[int, int, int]
  jitter: tuple[tuple[int, int], ...]  # per shape: centre offset in pixels

  @property
  def count(self) -> int:
    return len(self.shapes)


def random_scene(rng: np.random.Generator, count: int | None = None) -> Scene:
  """1-4 shapes in distinct quadrants; no two share colour and kind, so each is named uniquely."""
  count = int(rng.integers(1, 5)) if count is None else count
  quadrants = sorted(rng.choice(4, count, replace=False).tolist())
  names = rng.choice(len(COLOURS) * len(SHAPES), count, replace=False)
  colours = list(COLOURS)
  shapes = tuple(Shape(colours[n // len(SHAPES)], SHAPES[n % len(SHAPES)], SIZES[int(rng.integers(2))], q)
                 for n, q in zip(names, quadrants))
  grey = int(rng.integers(190, 245))
  background = tuple(int(np.clip(grey + rng.integers(-12, 13), 0, 255)) for _ in range(3))
  jitter = tuple((int(rng.integers(-5, 6)), int(rng.integers(-5, 6))) for _ in shapes)
  return Scene(shapes, background, jitter)


def _quadrant_box(position: int, px: int) -> tuple[int, int, int, int]:
  half = px // 2
  x0, y0 = (position % 2) * half, (position // 2) * half
  return x0, y0, x0 + half, y0 + half


def draw_scene(scene: Scene, rng: np.random.Generator, px: int = SCENE_PX) -> Image.Image:
  """The scene as an RGB image, colours jittered and mild pixel noise added."""
  img = Image.new('RGB', (px, px), scene.background)
  draw = ImageDraw.Draw(img)
  for shape, (dx, dy) in zip(scene.shapes, scene.jitter):
    x0, y0, x1, y1 = _quadrant_box(shape.position, px)
    cx, cy = (x0 + x1) // 2 + dx, (y0 + y1) // 2 + dy
    r = int(px * (0.09 if shape.size == 'small' else 0.19))
    fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLOURS[shape.colour])
    if shape.kind == 'circle':
      draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape.kind == 'square':
      draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
      draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
  noise = rng.normal(0, 6, (px, px, 3))
  return Image.fromarray(np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8))


def crop_shape(image: Image.Image, shape: Shape) -> Image.Image:
  """The quadrant that holds `shape` (grounding targets)."""
  return image.crop(_quadrant_box(shape.position, image.width))


def caption(scene: Scene) -> str:
  noun = 'shape' if scene.count == 1 else 'shapes'
  return f'{COUNTS[scene.count - 1]} {noun}: ' + ' and '.join(s.phrase() for s in scene.shapes) + '.'


def questions(scene: Scene, rng: np.random.Generator, n: int) -> list[tuple[str, str, list[str]]]:
  """n distinct (question, answer, answer vocabulary) about the scene: count, colour, shape, size,
  position. The vocabulary is every answer the question type allows (VQA candidates)."""
  pool = [('How many shapes are there?', COUNTS[scene.count - 1], list(COUNTS))]
  for s in scene.shapes:
    where = POSITIONS[s.position]
    pool += [(f'What colour is the {s.kind} at the {where}?', s.colour, list(COLOURS)),
             (f'What shape is at the {where}?', s.kind, list(SHAPES)),
             (f'Where is the {s.name}?', where, list(POSITIONS)),
             (f'Is the {s.name} small or large?', s.size, list(SIZES))]
  picks = rng.choice(len(pool), min(n, len(pool)), replace=False)
  return [pool[i] for i in picks]


_photo_cache: dict = {}


def _source(subject: str) -> np.ndarray:
  if subject not in _photo_cache:
    img = np.asarray(PHOTOS[subject]())
    if img.ndim == 2:
      img = np.stack([img] * 3, -1)
    _photo_cache[subject] = img[..., :3].astype(np.uint8)
  return _photo_cache[subject]


def photo_crop(subject: str, rng: np.random.Generator, px: int = SCENE_PX) -> Image.Image:
  """A random crop (55-100 % of the side, any position) of the subject's photo, maybe mirrored,
  with brightness and contrast jitter, resized to px x px."""
  src = _source(subject)
  h, w = src.shape[:2]
  side = int(min(h, w) * rng.uniform(0.55, 1.0))
  y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
  img = Image.fromarray(src[y:y + side, x:x + side]).resize((px, px), Image.BILINEAR)
  if rng.random() < 0.5:
    img = img.transpose(Image.FLIP_LEFT_RIGHT)
  img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.75, 1.25))
  return ImageEnhance.Contrast(img).enhance(rng.uniform(0.75, 1.25))


def photo_questions(subject: str) -> list[tuple[str, str]]:
  return [('What does this photo show?', subject), ('What is the main subject of this picture?', subject)]
