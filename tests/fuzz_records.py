"""Generated raw records of every bad (and odd-but-good) class, with the outcome each must have.

`expected` maps a record id to the reason it is skipped for at build time, or None when it is
kept. Images whose conversion is checked keep their source arrays in `sources`.
"""
from __future__ import annotations

import io
import json
import os

import numpy as np
import skimage.data
from PIL import Image

from coma_jax.data.tokenizer import QWEN2_5_VL_ADDED_TOKENS, compression_token

SPECIAL_STRINGS = QWEN2_5_VL_ADDED_TOKENS + (compression_token(0), compression_token(7), '<|image_1|>', '<image>')
# A text with every special-token string in it (MMEB's own tag aside, which marks the image).
SPECIAL_TEXT = 'look ' + ' and '.join(s for s in SPECIAL_STRINGS if s not in ('<|image_1|>', '<image>')) + ' end'


def _save(path: str, image: Image.Image, fmt: str) -> str:
  image.save(path, fmt)
  return os.path.basename(path)


def write_images(root: str) -> dict:
  """name -> (file name, source array the conversion is checked against, or None)."""
  os.makedirs(root, exist_ok=True)
  rng = np.random.default_rng(0)
  photo = np.asarray(Image.fromarray(skimage.data.coffee()).resize((60, 45)))
  out = {'good': (_save(f'{root}/good.jpg', Image.fromarray(photo), 'JPEG'), None)}
  cmyk = rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)
  out['cmyk'] = (_save(f'{root}/cmyk.tiff', Image.fromarray(cmyk, 'CMYK'), 'TIFF'), cmyk)
  grey16 = np.full((24, 36), 32768, np.uint16)  # mid-grey: PIL's own conversion makes it white
  grey16[:, :12] = np.linspace(0, 65535, 12 * 24).reshape(24, 12).astype(np.uint16)
  out['grey16'] = (_save(f'{root}/grey16.png', Image.fromarray(grey16), 'PNG'), grey16)
  palette = Image.fromarray(rng.integers(0, 4, (20, 20), dtype=np.uint8), 'P')
  palette.putpalette([200, 10, 10, 10, 200, 10, 10, 10, 200, 90, 90, 90])
  palette.info['transparency'] = 3
  out['palette_transparent'] = (_save(f'{root}/palette.png', palette, 'PNG'), np.asarray(palette))
  rgba = np.concatenate([photo[:20, :20], rng.integers(0, 256, (20, 20, 1), dtype=np.uint8)], axis=2)
  out['rgba'] = (_save(f'{root}/rgba.png', Image.fromarray(rgba, 'RGBA'), 'PNG'), rgba)
  one = np.array([[[12, 200, 77]]], np.uint8)
  out['one_pixel'] = (_save(f'{root}/one.png', Image.fromarray(one), 'PNG'), one)
  out['tall_ok'] = (_save(f'{root}/tall.png', Image.fromarray(np.zeros((300, 2, 3), np.uint8)), 'PNG'), None)
  out['extreme_ratio'] = (_save(f'{root}/strip.png', Image.fromarray(np.zeros((1, 300, 3), np.uint8)), 'PNG'), None)
  out['bomb'] = (_save(f'{root}/bomb.png', Image.new('1', (9000, 8000)), 'PNG'), None)  # 72 MP > 64 MP
  with open(f'{root}/truncated.jpg', 'wb') as f:
    f.write(open(f'{root}/good.jpg', 'rb').read()[:300])
  out['truncated'] = ('truncated.jpg', None)
  open(f'{root}/empty.png', 'wb').close()
  out['empty'] = ('empty.png', None)
  with open(f'{root}/noise.jpg', 'wb') as f:
    f.write(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
  out['random_bytes'] = ('noise.jpg', None)
  os.makedirs(f'{root}/folder.jpg', exist_ok=True)
  out['directory'] = ('folder.jpg', None)
  out['missing'] = ('missing.jpg', None)
  return out


IMAGE_OUTCOMES = {
    'good': None, 'cmyk': None, 'grey16': None, 'palette_transparent': None, 'rgba': None, 'one_pixel': None,
    'tall_ok': None, 'extreme_ratio': 'extreme aspect ratio', 'bomb': 'decompression bomb',
    'truncated': 'corrupt image', 'empty': 'empty image file', 'random_bytes': 'corrupt image',
    'directory': 'image path is not a file', 'missing': 'missing image file'}

SURROGATE = '\udcff'  # what an undecodable byte becomes in a str: not valid Unicode text


def qa(rid, image=None, question='What is shown?', answer='A picture.', **extra):
  conv = [{'from': 'human', 'value': ('<image>\n' if image else '') + question}, {'from': 'gpt', 'value': answer}]
  return {'id': rid, **({'image': image} if image else {}), 'conversations': conv, **extra}


def write_stage1(root: str) -> tuple[str, dict, dict]:
  """The stage-1 fuzz JSONL: (path, expected build outcome per id, image sources per id)."""
  images = write_images(os.path.join(root, 'images'))
  lines, expected, sources = [], {}, {}
  for name, (file, source) in images.items():
    lines.append(json.dumps(qa(f'img_{name}', file)))
    expected[f'img_{name}'] = IMAGE_OUTCOMES[name]
    if source is not None:
      sources[f'img_{name}'] = source
  records = {
      'no_conversation': ({'id': 'no_conversation', 'image': images['good'][0], 'conversations': []}, 'no conversation'),
      'empty_record': ({'id': 'empty_record'}, 'no conversation'),
      'count_mismatch': (qa('count_mismatch', images['good'][0]) | {'images': [images['good'][0]] * 2},
                         'image count mismatch'),
      'surrogate_id': (qa(SURROGATE + 'id', images['good'][0]), 'non-UTF-8 text'),
      'surrogate_question': (qa('surrogate_question', images['good'][0], question='Q' + SURROGATE), 'non-UTF-8 text'),
      'surrogate_answer': (qa('surrogate_answer', answer='A' + SURROGATE), 'non-UTF-8 text'),
      'surrogate_image_path': (qa('surrogate_image_path', 'x' + SURROGATE + '.jpg'), 'non-UTF-8 text'),
      'surrogate_input_text': (qa('surrogate_input_text', input_text=SURROGATE), 'non-UTF-8 text'),
      'conversations_not_a_list': ({'id': 'conversations_not_a_list', 'conversations': 'hello'}, 'malformed record'),
      'images_not_a_list': (qa('images_not_a_list') | {'images': 7}, 'malformed record'),
      'numeric_answer': (qa('numeric_answer', answer=42), 'malformed record'),
      'numeric_id': (qa(12345, images['good'][0]), None),
      'special_tokens': (qa('special_tokens', images['good'][0], question=SPECIAL_TEXT, answer=SPECIAL_TEXT,
                            input_text=SPECIAL_TEXT), None),
      'special_tokens_twin': (qa('special_tokens_twin', images['good'][0], question='look', answer='look',
                                 input_text='look'), None),
      'too_long': (qa('too_long', question='word ' * 3000), None),  # too long only for the load's buckets
  }
  for rid, (record, outcome) in records.items():
    lines.append(json.dumps(record))
    name = {'numeric_id': '12345', 'surrogate_id': f'fuzz.jsonl:{len(lines)}'}.get(rid, rid)  # an unusable id:
    expected[name] = outcome  # the record is named by its file and line
  lines += [json.dumps(qa(f'plain_{i}', images['good'][0], question=f'Question {i}?')) for i in range(6)]
  expected.update({f'plain_{i}': None for i in range(6)})
  path = os.path.join(root, 'fuzz.jsonl')
  with open(path, 'wb') as f:
    f.write(('\n'.join(lines) + '\n').encode('utf-8', 'surrogatepass'))  # JSON escapes the surrogates
    f.write(b'{"id": "non_utf8_bytes", "conversations": [{"from": "human", "value": "\xff\xfe"}]}\n')
    f.write(b'{"id": "malformed_json", "conversations": [\n')
    f.write(b'[1, 2, 3]\n')
    f.write(b'[' * 100_000 + b']' * 100_000 + b'\n')  # nested too deep for the JSON parser
    f.write(b'{"id": ' + b'7' * 5000 + b'}\n')  # an integer longer than Python converts
  n = len(lines)
  expected.update({f'fuzz.jsonl:{n + 1}': 'non-UTF-8 text', f'fuzz.jsonl:{n + 2}': 'malformed record',
                   f'fuzz.jsonl:{n + 3}': 'malformed record', f'fuzz.jsonl:{n + 4}': 'malformed record',
                   f'fuzz.jsonl:{n + 5}': 'malformed record'})
  return path, expected, sources


def write_mmeb(root: str) -> tuple[str, dict]:
  """MMEB-train subsets: 'Mixed' (every pair class) and 'AllBad' (every image missing)."""
  images = write_images(os.path.join(root, 'images'))
  good = images['good'][0]
  tagged = '<|image_1|>\nRepresent the given image.'
  pair = lambda rid, **kw: {'id': rid, 'qry': 'Find the picture.', 'qry_image_path': '', 'pos_text': tagged,
                            'pos_image_path': good, **kw}
  mixed = {
      'ok_0': (pair('ok_0'), None),
      'ok_1': (pair('ok_1', qry=tagged + ' What is it?', qry_image_path=good, pos_text='coffee', pos_image_path=''), None),
      'ok_neg': (pair('ok_neg', neg_text=tagged, neg_image_path=good), None),
      'special_tokens': (pair('special_tokens', qry=SPECIAL_TEXT, pos_text=tagged + ' ' + SPECIAL_TEXT), None),
      'missing_positive': ({'id': 'missing_positive', 'qry': 'Find the picture.'}, 'empty side'),
      'missing_image': (pair('missing_image', pos_image_path='missing.jpg'), 'missing image file'),
      'numeric_text': (pair('numeric_text', qry=5), 'malformed record'),
      'image_without_tag': (pair('image_without_tag', pos_text='Represent the given image.'), 'image without tag'),
      'two_tags': (pair('two_tags', pos_text=tagged + tagged), 'image count mismatch'),
      'surrogate_id': (pair('x' + SURROGATE), 'non-UTF-8 text'),
      'corrupt_image': (pair('corrupt_image', pos_image_path=images['random_bytes'][0]), 'corrupt image'),
  }
  raw = os.path.join(root, 'raw')
  for subset, rows in (('Mixed', [r for r, _ in mixed.values()]),
                       ('AllBad', [pair(f'allbad_{i}', pos_image_path='nowhere.jpg') for i in range(3)])):
    os.makedirs(os.path.join(raw, subset), exist_ok=True)
    with open(os.path.join(raw, subset, 'original-0.jsonl'), 'wb') as f:
      f.write(('\n'.join(json.dumps(r) for r in rows) + '\n').encode('utf-8'))
  expected = {rid: outcome for rid, (_, outcome) in mixed.items()}
  expected['Mixed/9'] = expected.pop('surrogate_id')  # named by its position: its id is unusable
  return raw, expected


PALETTE = np.array([[200, 10, 10], [10, 200, 10], [10, 10, 200], [90, 90, 90]])


def expected_rgb(kind: str, src: np.ndarray, palette: np.ndarray = PALETTE, transparent: int = 3) -> np.ndarray:
  """The RGB an odd image must become, from its source array with NumPy alone (not PIL)."""
  src = np.asarray(src)
  if kind in ('grey', 'L'):
    return np.repeat(src[..., None], 3, axis=-1).astype(np.float64)
  if kind in ('grey16', 'I;16'):
    return expected_rgb('grey', np.clip(np.rint(src / 257), 0, 255))
  if kind in ('cmyk', 'CMYK'):
    cmy, k = src[..., :3].astype(np.float64), src[..., 3:].astype(np.float64)
    return np.rint((255 - cmy) * (255 - k) / 255)
  if kind in ('palette_transparent', 'P'):
    colours = np.asarray(palette, np.float64).copy()
    if transparent is not None:
      colours[transparent] = 255  # composited on white
    return colours[src]
  if kind in ('rgba', 'RGBA', 'LA'):
    colour = src[..., :-1] if src.shape[-1] == 4 else np.repeat(src[..., :1], 3, axis=-1)
    alpha = src[..., -1:].astype(np.float64) / 255
    return colour * alpha + 255 * (1 - alpha)
  if kind == 'one_pixel':
    return src.astype(np.float64)
  raise KeyError(kind)


def image_bytes(image: Image.Image, fmt: str) -> bytes:
  buf = io.BytesIO()
  image.save(buf, fmt)
  return buf.getvalue()
