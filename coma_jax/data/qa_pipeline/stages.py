"""The resumable stages: questions, answers (turn by turn) and captions.

Every stage reads input records `{id, image, ...}` (image relative to the image root), skips ids
already in its output or failed permanently before, and works in chunks of the backend's batch
size. A transient failure (after the backend's own retries) leaves the item for a retry pass, at
most `max_passes` of them; a permanent one is written to the failures file. Each request's seed is
`request_seed(seed, image id, turn)`, so a resumed run asks the same.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os

from coma_jax.data.qa_pipeline.backends import Call, Permanent, Transient
from coma_jax.data.qa_pipeline.prompts import (QUESTION_PROMPT, QUESTION_TEMPERATURE, caption_prompt,
                                               parse_questions, user_turn)
from coma_jax.data.qa_pipeline.store import JsonlStore
from coma_jax.generate.sampling import request_seed

log = logging.getLogger('coma_jax.datagen')


@dataclasses.dataclass
class StageOptions:
  image_root: str
  seed: int = 0
  temperature: float = QUESTION_TEMPERATURE
  top_p: float = 1.0
  max_tokens: int = 512
  max_passes: int = 2
  progress: bool = True


def read_records(path: str) -> list[dict]:
  """Input JSONL records; a line that is not a record with `id` and `image` stops the run, named."""
  records = []
  with open(path, encoding='utf-8') as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path} line {n}: not JSON ({e})') from None
      if not isinstance(record, dict) or not isinstance(record.get('id'), str) or not isinstance(record.get('image'), str):
        raise ValueError(f'{path} line {n}: a record needs string "id" and "image" fields')
      records.append(record)
  return records


def take_shard(records: list[dict], shard: str) -> list[dict]:
  """`K/N`: every N-th record from the K-th (one process per host of a pod, each with its own
  --output; concatenate the outputs)."""
  try:
    k, n = (int(x) for x in shard.split('/'))
  except ValueError:
    raise ValueError(f'--shard {shard!r}: expected K/N, e.g. 0/4') from None
  if not 0 <= k < n:
    raise ValueError(f'--shard {shard!r}: K must be in 0..N-1')
  return records[k::n]


class _Progress:
  def __init__(self, total: int, desc: str, enabled: bool):
    self.bar = None
    if enabled:
      from tqdm import tqdm
      self.bar = tqdm(total=total, desc=desc, unit='img', dynamic_ncols=True, smoothing=0.1)

  def update(self, n: int, counts: collections.Counter):
    if self.bar is not None:
      self.bar.update(n)
      failed = sum(v for k, v in counts.items() if k.startswith(('failed', 'retry')))
      self.bar.set_postfix(written=counts['written'], failed=failed, refresh=False)

  def close(self):
    if self.bar is not None:
      self.bar.close()


def run_stage(records: list[dict], output: str, work, backend, options: StageOptions, desc: str) -> dict:
  """work(chunk, backend, options) -> [(record, output record | Transient | Permanent)]."""
  store = JsonlStore(output)
  todo = [r for r in records if r['id'] not in store.done and r['id'] not in store.failed]
  counts = collections.Counter(skipped_done=len(records) - len(todo))
  if counts['skipped_done']:
    log.info('%s: %d of %d already done or failed permanently: skipped', desc, counts['skipped_done'], len(records))
  progress = _Progress(len(todo), desc, options.progress)
  pending, passes = todo, 0
  try:
    while pending:
      retry = []
      for start in range(0, len(pending), backend.batch_size):
        chunk = pending[start:start + backend.batch_size]
        for record, result in work(chunk, backend, options):
          if isinstance(result, Permanent):
            store.fail(record['id'], result.reason, result.detail)
            counts[f'failed: {result.reason}'] += 1
          elif isinstance(result, Transient):
            retry.append(record)
            counts[f'retry: {result.reason}'] += 1
          else:
            store.append(result)
            counts['written'] += 1
        progress.update(len(chunk) if passes == 0 else 0, counts)
      if retry and passes >= options.max_passes:
        counts['left for a rerun (transient)'] = len(retry)
        log.warning('%s: %d items still failing after %d retry passes; a rerun tries them again',
                    desc, len(retry), passes)
        break
      pending, passes = retry, passes + 1
      if pending:
        log.info('%s: retry pass %d over %d items', desc, passes, len(pending))
  finally:
    progress.close()
    store.close()
  summary = dict(sorted(counts.items()))
  log.info('%s: %s', desc, json.dumps(summary))
  return summary


def _image_path(record: dict, options: StageOptions) -> str:
  return os.path.join(options.image_root, record['image'])


def ask_questions(chunk, backend, options: StageOptions):
  calls = [Call([user_turn(QUESTION_PROMPT, _image_path(r, options))], options.temperature,
                request_seed(options.seed, r['id'], 0), options.max_tokens, options.top_p) for r in chunk]
  out = []
  for record, reply in zip(chunk, backend.complete(calls)):
    if isinstance(reply, Exception):
      out.append((record, reply))
      continue
    questions = parse_questions(reply)
    if not questions:
      out.append((record, Permanent('no usable question', reply[:200])))
    else:
      out.append((record, dict(record, questions=questions)))
  return out


def answer_questions(chunk, backend, options: StageOptions):
  """Multi-turn: the image and Q1 give A1; Q2 joins the running chat (the image in the first turn
  only); and so on. All items of the chunk advance one turn per backend call."""
  results = {}
  chats, turns = {}, {}
  for r in chunk:
    questions = r.get('questions')
    if not isinstance(questions, list) or not questions or not all(isinstance(q, str) and q.strip() for q in questions):
      results[r['id']] = Permanent('no questions', 'the record has no "questions" list')
    else:
      chats[r['id']], turns[r['id']] = [], []
  for t in range(max((len(r['questions']) for r in chunk if r['id'] in chats), default=0)):
    active = [r for r in chunk if r['id'] in chats and r['id'] not in results and t < len(r['questions'])]
    calls = []
    for r in active:
      chats[r['id']].append(user_turn(r['questions'][t], _image_path(r, options) if t == 0 else None))
      calls.append(Call(list(chats[r['id']]), options.temperature, request_seed(options.seed, r['id'], t),
                        options.max_tokens, options.top_p))
    for r, reply in zip(active, backend.complete(calls)):
      if isinstance(reply, Exception):
        results[r['id']] = reply
      else:
        chats[r['id']].append({'role': 'assistant', 'content': reply})
        turns[r['id']] += [{'from': 'human', 'content': r['questions'][t]}, {'from': 'gpt', 'content': reply}]
  return [(r, results.get(r['id']) or {'id': r['id'], 'image': r['image'], 'message': turns[r['id']]})
          for r in chunk]


def write_captions(chunk, backend, options: StageOptions):
  prompts = [caption_prompt(options.seed, r['id']) for r in chunk]
  calls = [Call([user_turn(p, _image_path(r, options))], options.temperature, request_seed(options.seed, r['id'], 0),
                options.max_tokens, options.top_p) for r, p in zip(chunk, prompts)]
  out = []
  for record, prompt, reply in zip(chunk, prompts, backend.complete(calls)):
    if isinstance(reply, Exception):
      out.append((record, reply))
    elif not reply.strip():
      out.append((record, Permanent('empty caption')))
    else:
      out.append((record, {'id': record['id'], 'image': record['image'],
                           'message': [{'from': 'human', 'content': prompt}, {'from': 'gpt', 'content': reply.strip()}]}))
  return out
