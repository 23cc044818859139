"""An OpenAI-compatible chat-completions endpoint over `coma_jax.generate` (text and images).

  python -m coma_jax.serve --model Qwen2.5-VL-7B-Instruct --port 8000 --dtype bfloat16
  curl localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}]}'

POST /v1/chat/completions takes `messages` (text parts, and images as `image_url` data: URLs or
local paths), `max_tokens` / `max_completion_tokens`, `temperature` (default 1, as OpenAI's),
`top_p`, `seed` (default 0; a request's tokens depend on its seed alone, not on its batch).
`n` > 1 and streaming are refused (400). An image must come inline (a data: URL) unless the server
runs with `--allow_local_images` (then a local path the server can read is taken too: only for a
server on a trusted host). GET /v1/models and /health answer too.

Request batching: each request is checked and tokenised on its own handler thread (a bad image
fails that request alone, 400), then a single worker takes what is waiting, up to
`--batch_size`, after at most `--batch_wait_ms`, and runs one batched generation.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import http.server
import json
import logging
import queue
import sys
import threading
import time
import uuid

from coma_jax.generate.generator import Generator, Request

log = logging.getLogger('coma_jax.serve')


class BadRequest(ValueError):
  pass


def _check_images(messages: list, allow_local: bool) -> None:
  for i, message in enumerate(messages):
    if not isinstance(message, dict):
      raise BadRequest(f'messages[{i}]: a message must be an object')
    for part in message.get('content') if isinstance(message.get('content'), list) else ():
      if not isinstance(part, dict) or not ('image' in part or 'image_url' in part) or allow_local:
        continue
      url = part.get('image_url')
      url = url.get('url') if isinstance(url, dict) else url
      if not (isinstance(url, str) and url.startswith('data:')):
        raise BadRequest(f'messages[{i}]: images must be inline data: URLs (the server reads no local files '
                         'unless started with --allow_local_images)')


def parse_request(body: dict, max_new_tokens: int, allow_local_images: bool = False) -> Request:
  """An OpenAI chat-completions body -> a generator Request (BadRequest names the field)."""
  if not isinstance(body, dict) or not isinstance(body.get('messages'), list) or not body['messages']:
    raise BadRequest('messages: a non-empty list is required')
  _check_images(body['messages'], allow_local_images)
  if body.get('stream'):
    raise BadRequest('stream: streaming is not supported')
  if body.get('n', 1) != 1:
    raise BadRequest('n: only 1 completion per request is supported')
  limit = body.get('max_completion_tokens', body.get('max_tokens'))
  limit = max_new_tokens if limit is None else limit
  if not isinstance(limit, int) or not 0 < limit <= max_new_tokens:
    raise BadRequest(f'max_tokens: must be an integer in 1..{max_new_tokens} (the server\'s --max_new_tokens)')
  numbers = {}
  for name, default in (('temperature', 1.0), ('top_p', 1.0), ('seed', 0)):
    value = body.get(name)
    value = default if value is None else value
    if not isinstance(value, (int, float)) or isinstance(value, bool):
      raise BadRequest(f'{name}: must be a number')
    numbers[name] = value
  if numbers['temperature'] < 0 or not 0 < numbers['top_p'] <= 1:
    raise BadRequest('temperature must be >= 0 and top_p in (0, 1]')
  return Request(messages=body['messages'], max_new_tokens=limit, temperature=float(numbers['temperature']),
                 top_p=float(numbers['top_p']), seed=int(numbers['seed']) & 0x7FFFFFFF)


class BatchingWorker:
  """One thread runs the generator on batches of waiting requests."""

  def __init__(self, generator: Generator, wait_s: float):
    self.generator, self.wait_s = generator, wait_s
    self.queue: queue.Queue = queue.Queue()
    self.thread = threading.Thread(target=self._loop, daemon=True)
    self.thread.start()

  def submit(self, prepared) -> concurrent.futures.Future:
    future = concurrent.futures.Future()
    self.queue.put((prepared, future))
    return future

  def _loop(self):
    while True:
      batch = [self.queue.get()]
      deadline = time.monotonic() + self.wait_s
      while len(batch) < self.generator.batch_size:
        try:
          batch.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
        except queue.Empty:
          break
      try:
        results = self.generator.generate_prepared([p for p, _ in batch])
      except Exception as e:  # noqa: BLE001 -- every request of the batch gets the error
        log.exception('generation failed for a batch of %d', len(batch))
        for _, future in batch:
          future.set_exception(e)
        continue
      for (_, future), result in zip(batch, results):
        future.set_result(result)


def make_handler(generator: Generator, worker: BatchingWorker, model_name: str, allow_local_images: bool):

  class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'

    def log_message(self, fmt, *args):  # through logging, not stderr lines per request
      log.debug('%s ' + fmt, self.address_string(), *args)

    def _send(self, status: int, payload: dict):
      data = json.dumps(payload).encode()
      self.send_response(status)
      self.send_header('Content-Type', 'application/json')
      self.send_header('Content-Length', str(len(data)))
      self.end_headers()
      self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str):
      self._send(status, {'error': {'message': message, 'type': kind}})

    def do_GET(self):
      if self.path == '/health':
        self._send(200, {'status': 'ok'})
      elif self.path == '/v1/models':
        self._send(200, {'object': 'list', 'data': [{'id': model_name, 'object': 'model', 'owned_by': 'coma_jax'}]})
      else:
        self._error(404, f'no route {self.path}', 'not_found')

    def do_POST(self):
      if self.path != '/v1/chat/completions':
        return self._error(404, f'no route {self.path}', 'not_found')
      try:
        body = json.loads(self.rfile.read(int(self.headers.get('Content-Length') or 0)) or b'null')
        request = parse_request(body, generator.settings.max_new_tokens, allow_local_images)
        prepared = generator.prepare(request)
      except (ValueError, json.JSONDecodeError) as e:  # BadRequest, a bad image (BadRecord), bad JSON
        return self._error(400, str(e), 'invalid_request_error')
      try:
        completion = worker.submit(prepared).result()
      except Exception as e:  # noqa: BLE001
        return self._error(500, f'{type(e).__name__}: {e}', 'server_error')
      self._send(200, {
          'id': f'chatcmpl-{uuid.uuid4().hex}', 'object': 'chat.completion', 'created': int(time.time()),
          'model': model_name,
          'choices': [{'index': 0, 'message': {'role': 'assistant', 'content': completion.text},
                       'finish_reason': completion.finish_reason}],
          'usage': {'prompt_tokens': completion.prompt_tokens, 'completion_tokens': len(completion.token_ids),
                    'total_tokens': completion.prompt_tokens + len(completion.token_ids)}})

  return Handler


def serve(generator: Generator, host: str, port: int, wait_ms: float, model_name: str,
          allow_local_images: bool = False):
  """Builds the server (port 0: any free port; its `server_address` says which)."""
  worker = BatchingWorker(generator, wait_ms / 1000)
  server = http.server.ThreadingHTTPServer((host, port), make_handler(generator, worker, model_name,
                                                                      allow_local_images))
  server.daemon_threads = True
  return server


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model', required=True, help='a local transformers Qwen2.5-VL directory')
  parser.add_argument('--host', default='127.0.0.1')
  parser.add_argument('--port', type=int, default=8000)
  parser.add_argument('--dtype', default='bfloat16', choices=['float32', 'bfloat16'])
  parser.add_argument('--mesh_shape', default='-1,1,1', help='data,fsdp,tensor over this process\'s devices')
  parser.add_argument('--max_new_tokens', type=int, default=512)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--batch_wait_ms', type=float, default=20.0)
  parser.add_argument('--min_pixels', type=int, default=28 * 28 * 256)
  parser.add_argument('--max_pixels', type=int, default=28 * 28 * 1024)
  parser.add_argument('--served_model_name', default=None, help='the model name in responses (default: --model)')
  parser.add_argument('--allow_local_images', action='store_true',
                      help='also take images as local paths the server reads (trusted hosts only)')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
  from coma_jax.data.image import ImageSettings
  try:
    generator = Generator.load(args.model, dtype=args.dtype, mesh_shape=tuple(int(x) for x in args.mesh_shape.split(',')),
                               max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                               image=ImageSettings(min_pixels=args.min_pixels, max_pixels=args.max_pixels))
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  server = serve(generator, args.host, args.port, args.batch_wait_ms, args.served_model_name or args.model,
                 args.allow_local_images)
  host, port = server.server_address[:2]
  print(f'serving {args.model} on http://{host}:{port}/v1/chat/completions', flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  return 0


if __name__ == '__main__':
  sys.exit(main())
