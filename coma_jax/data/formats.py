"""Record formats: stage-1 compression QA (LLaVA-instruct JSONL), MMEB-train pairs, MMEB-eval.

Parsers take one raw record (a dict) and return a typed record or raise `BadRecord` naming it.
Images are references here (a path, or bytes once inside a TFDS dataset); decoding happens later.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator

from coma_jax.data.bad_records import BadRecord

IMAGE_TAG = '<image>'  # LLaVA's placeholder in the first human turn
MMEB_IMAGE_TAG = '<|image_1|>'  # MMEB's placeholder
HUMAN_ROLES, GPT_ROLES = ('human', 'user'), ('gpt', 'assistant')

ImageRef = bytes | str


@dataclasses.dataclass(frozen=True)
class Stage1Record:
  id: str
  images: tuple[ImageRef, ...]
  turns: tuple[tuple[str, str], ...]  # (question, answer) pairs, <image> tags removed
  input_text: str = ''  # optional text that goes with the image(s), in the prefix


@dataclasses.dataclass(frozen=True)
class Side:
  """One side of a stage-2 pair (query, positive or negative): text and an optional image."""
  text: str
  image: ImageRef | None = None


@dataclasses.dataclass(frozen=True)
class Stage2Record:
  id: str
  subset: str
  query: Side
  positive: Side
  negative: Side | None = None


@dataclasses.dataclass(frozen=True)
class EvalRecord:
  id: str
  dataset: str
  query: Side
  candidates: tuple[Side, ...]  # index 0 is the positive


def check_text(value, record_id: str, field: str) -> str:
  """A text field as str: None is empty; bytes must be UTF-8; lone surrogates are refused."""
  if value is None:
    return ''
  if isinstance(value, bytes):
    try:
      return value.decode('utf-8')
    except UnicodeDecodeError as e:
      raise BadRecord(record_id, 'non-UTF-8 text', f'field {field}: {e}') from None
  if not isinstance(value, str):
    raise BadRecord(record_id, 'malformed record', f'field {field} is {type(value).__name__}, not text')
  try:
    value.encode('utf-8')  # lone surrogates (undecodable bytes smuggled into str) fail here
  except UnicodeEncodeError as e:
    raise BadRecord(record_id, 'non-UTF-8 text', f'field {field}: {e}') from None
  return value


def record_id_of(value, fallback: str) -> str:
  """A record's `id` field (text or an integer), else `fallback` (its file and line). A bad id
  is a bad record named by the fallback: it would otherwise crash the dataset writer."""
  if value is None or (isinstance(value, float) and not value.is_integer()):
    return fallback  # NaN: a missing id in a parquet column
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return str(int(value))  # an integer id, or one stored as float64 by a nullable column
  return check_text(value, fallback, 'id') or fallback


def _list(value, record_id: str, field: str) -> list:
  if value is None:
    return []
  if not isinstance(value, (list, tuple)):  # a str here would silently become its characters
    raise BadRecord(record_id, 'malformed record', f'field {field} is {type(value).__name__}, not a list')
  return list(value)


def check_side(side: Side, record_id: str, name: str) -> None:
  """A stage-2 side (query, positive, negative or candidate) as the sequence builder needs it:
  text or an image, and exactly one `<|image_1|>` tag exactly when there is an image. Run at
  build time (parsers) and at load time (the sequence builder)."""
  tags = side.text.count(MMEB_IMAGE_TAG)
  if not side.text and side.image is None:
    raise BadRecord(record_id, 'empty side', f'the {name} has neither text nor image')
  if tags > 1 or (tags == 1 and side.image is None):
    raise BadRecord(record_id, 'image count mismatch',
                    f'the {name} has {tags} {MMEB_IMAGE_TAG} tags for {int(side.image is not None)} images')
  if side.image is not None and tags == 0:
    raise BadRecord(record_id, 'image without tag', f'the {name} has an image but no {MMEB_IMAGE_TAG} tag')


def check_stage1(record: Stage1Record) -> Stage1Record:
  """A stage-1 record as the sequence builder needs it: at least one turn, all text valid. Run
  at build time (after parsing) and at load time (after reading the dataset)."""
  if not record.turns:
    raise BadRecord(record.id, 'no conversation', 'no complete human/gpt turn')
  check_text(record.input_text, record.id, 'input_text')
  for i, (question, answer) in enumerate(record.turns):
    check_text(question, record.id, f'turn {i} question')
    check_text(answer, record.id, f'turn {i} answer')
  return record


def _image_path(value, image_root: str | None) -> str:
  return value if image_root is None or os.path.isabs(value) else os.path.join(image_root, value)


def parse_llava(obj: dict, image_root: str | None = None, record_id: str | None = None) -> Stage1Record:
  """`{id, image | images, conversations: [{from, value}]}`; `<image>` tags in the first human turn."""
  rid = record_id_of(obj.get('id'), str(record_id))
  images = obj.get('images', obj.get('image'))
  images = [] if images in (None, '') else [images] if isinstance(images, (str, bytes)) else _list(images, rid, 'images')
  images = [_image_path(check_text(i, rid, 'image'), image_root) if not isinstance(i, bytes) else i for i in images]
  conv = obj.get('conversations')
  if not conv:
    raise BadRecord(rid, 'no conversation')
  if not isinstance(conv, list) or not all(isinstance(t, dict) for t in conv):
    raise BadRecord(rid, 'malformed record', 'conversations is not a list of {from, value}')
  roles = [str(t.get('from', '')).lower() for t in conv]
  values = [check_text(t.get('value'), rid, 'conversations.value') for t in conv]
  if roles[0] not in HUMAN_ROLES:
    raise BadRecord(rid, 'malformed record', f'the first turn is from {roles[0]!r}, not human')
  tags = values[0].count(IMAGE_TAG)
  if tags != len(images) or any(IMAGE_TAG in v for v in values[1:]):
    raise BadRecord(rid, 'image count mismatch',
                    f'{tags} <image> tags in the first human turn for {len(images)} images'
                    + ('; tags in later turns' if any(IMAGE_TAG in v for v in values[1:]) else ''))
  values[0] = values[0].replace(IMAGE_TAG + '\n', '').replace('\n' + IMAGE_TAG, '').replace(IMAGE_TAG, '').strip()
  turns = []
  for i in range(0, len(conv) - 1, 2):
    if roles[i] not in HUMAN_ROLES or roles[i + 1] not in GPT_ROLES:
      raise BadRecord(rid, 'malformed record', f'turns {i}, {i + 1} are {roles[i]!r}, {roles[i + 1]!r}: '
                      'expected human then gpt')
    turns.append((values[i], values[i + 1]))
  return check_stage1(Stage1Record(id=rid, images=tuple(images), turns=tuple(turns),
                                   input_text=check_text(obj.get('input_text'), rid, 'input_text')))


def convert_qa_generation(obj: dict, index: int) -> dict:
  """The authors' QA-generation output `{image, message: [{from, content}]}` -> LLaVA JSONL."""
  image = obj.get('image')
  messages = obj.get('message') or []
  conversations = []
  for m in messages:
    role = str(m.get('from', '')).lower()
    if role == 'system':
      continue
    conversations.append({'from': 'human' if role in HUMAN_ROLES else 'gpt' if role in GPT_ROLES else role,
                          'value': m.get('content', '')})
  if conversations and image and IMAGE_TAG not in conversations[0]['value']:
    conversations[0]['value'] = f"{IMAGE_TAG}\n{conversations[0]['value']}"
  stem = os.path.splitext(os.path.basename(image))[0] if isinstance(image, str) and image else 'noimage'
  return {'id': obj.get('id', f'{stem}_{index}'), 'image': image, 'conversations': conversations}


def _side(row: dict, text_key: str, image_key: str, rid: str, image_root: str | None) -> Side:
  text = check_text(row.get(text_key), rid, text_key)
  image = row.get(image_key)
  if isinstance(image, dict):  # a Hugging Face image struct {bytes, path}
    image = image.get('bytes') or image.get('path')
  if isinstance(image, bytes):
    return Side(text, image or None)  # b'': a parquet binary column's "no image"
  image = check_text(image, rid, image_key) or None
  return Side(text, None if image is None else _image_path(image, image_root))


def parse_mmeb_train(row: dict, subset: str, index: int, image_root: str | None = None) -> Stage2Record:
  """`qry, qry_image_path, pos_text, pos_image_path` and optional `neg_text, neg_image_path`."""
  rid = record_id_of(row.get('id'), f'{subset}/{index}')
  query = _side(row, 'qry', 'qry_image_path', rid, image_root)
  positive = _side(row, 'pos_text', 'pos_image_path', rid, image_root)
  negative = None
  if any(row.get(k) not in (None, '', b'') for k in ('neg_text', 'neg_image_path')):
    negative = _side(row, 'neg_text', 'neg_image_path', rid, image_root)
  for name, side in (('query', query), ('positive', positive), ('negative', negative)):
    if side is not None:
      check_side(side, rid, name)
  return Stage2Record(id=rid, subset=subset, query=query, positive=positive, negative=negative)


def parse_mmeb_eval(row: dict, dataset: str, index: int, image_root: str | None = None) -> EvalRecord:
  """`qry_text, qry_img_path, tgt_text[], tgt_img_path[]`; candidate 0 is the positive."""
  rid = f'{dataset}/{index}'
  query = _side(row, 'qry_text', 'qry_img_path', rid, image_root)
  texts, paths = _list(row.get('tgt_text'), rid, 'tgt_text'), _list(row.get('tgt_img_path'), rid, 'tgt_img_path')
  if not texts and not paths:
    raise BadRecord(rid, 'malformed record', 'no candidates')
  if texts and paths and len(texts) != len(paths):
    raise BadRecord(rid, 'malformed record', f'{len(texts)} tgt_text but {len(paths)} tgt_img_path')
  n = max(len(texts), len(paths))
  texts += [''] * (n - len(texts))
  paths += [''] * (n - len(paths))
  candidates = tuple(_side({'t': t, 'p': p}, 't', 'p', rid, image_root) for t, p in zip(texts, paths))
  for name, side in [('query', query)] + [(f'candidate {i}', c) for i, c in enumerate(candidates)]:
    check_side(side, rid, name)
    if isinstance(side.image, bytes):  # eval keeps paths: candidates share images across queries
      raise BadRecord(rid, 'malformed record', f'the {name} embeds image bytes; mmeb_eval takes image paths')
  return EvalRecord(id=rid, dataset=dataset, query=query, candidates=candidates)


def read_jsonl(path: str) -> Iterator[tuple[str, dict | BadRecord]]:
  """(file:line, raw dict) per line; an undecodable or non-JSON line yields a BadRecord."""
  with open(path, 'rb') as f:
    for line_no, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      rid = f'{os.path.basename(path)}:{line_no}'
      try:
        obj = json.loads(raw.decode('utf-8'))
      except UnicodeDecodeError as e:
        yield rid, BadRecord(rid, 'non-UTF-8 text', str(e))
        continue
      except (ValueError, RecursionError) as e:  # not JSON, nested too deep, an integer too long
        yield rid, BadRecord(rid, 'malformed record', f'not JSON: {type(e).__name__}: {str(e)[:200]}')
        continue
      if not isinstance(obj, dict):
        yield rid, BadRecord(rid, 'malformed record', 'a line is not a JSON object')
        continue
      yield rid, obj


def read_rows(path: str) -> Iterator[tuple[str, dict | BadRecord]]:
  """Rows of a local parquet file (needs pyarrow) or JSONL file, with ids."""
  if path.endswith('.parquet'):
    import pyarrow.parquet as pq
    for i, row in enumerate(pq.read_table(path).to_pylist()):
      yield f'{os.path.basename(path)}:{i}', row
  else:
    yield from read_jsonl(path)
