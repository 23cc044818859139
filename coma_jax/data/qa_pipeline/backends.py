"""Where the replies come from: any OpenAI-compatible server, or coma_jax's own JAX generator.

A backend answers a list of `Call`s with, per call, the reply text or an exception: `Transient`
(a timeout, a 5xx, malformed JSON: retried) or `Permanent` (a 4xx, an unreadable image: never
retried). The openai back-end retries transient failures itself with exponential backoff.
"""
from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import json
import logging
import mimetypes
import socket
import time
import urllib.error
import urllib.request

from coma_jax.data.bad_records import BadRecord
from coma_jax.data.image import ImageSettings, decode_image

log = logging.getLogger('coma_jax.datagen')


class Transient(Exception):
  def __init__(self, reason: str, detail: str = ''):
    super().__init__(f'{reason}: {detail}' if detail else reason)
    self.reason, self.detail = reason, detail


class Permanent(Exception):
  def __init__(self, reason: str, detail: str = ''):
    super().__init__(f'{reason}: {detail}' if detail else reason)
    self.reason, self.detail = reason, detail


@dataclasses.dataclass
class Call:
  messages: list  # user turns hold the image as {'type': 'image', 'image': <absolute path>}
  temperature: float
  seed: int
  max_tokens: int
  top_p: float = 1.0


def check_image(path: str, record_id: str, settings: ImageSettings) -> bytes:
  """The file's bytes once it decodes as an image (Permanent 'unreadable image' otherwise)."""
  try:
    decode_image(path, record_id, settings)
  except BadRecord as e:
    raise Permanent('unreadable image', f'{path}: {e.reason} {e.detail}'.strip()) from None
  with open(path, 'rb') as f:
    return f.read()


class OpenAIBackend:

  def __init__(self, base_url: str, model: str, *, api_key: str | None = None, concurrency: int = 8,
               timeout_s: float = 120.0, retries: int = 3, backoff_s: float = 1.0,
               image: ImageSettings = ImageSettings()):
    self.url = base_url.rstrip('/') + '/chat/completions'
    self.model, self.api_key, self.timeout_s = model, api_key, timeout_s
    self.retries, self.backoff_s, self.image = retries, backoff_s, image
    self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=concurrency)
    self.batch_size = 2 * concurrency

  def _payload(self, call: Call) -> bytes:
    messages = []
    for m in call.messages:
      content = m['content']
      if isinstance(content, list):
        parts = []
        for part in content:
          if part.get('type') == 'image':
            data = check_image(part['image'], part['image'], self.image)
            mime = mimetypes.guess_type(part['image'])[0] or 'image/png'
            parts.append({'type': 'image_url',
                          'image_url': {'url': f'data:{mime};base64,{base64.b64encode(data).decode()}'}})
          else:
            parts.append(part)
        content = parts
      messages.append({'role': m['role'], 'content': content})
    return json.dumps({'model': self.model, 'messages': messages, 'temperature': call.temperature,
                       'top_p': call.top_p, 'seed': call.seed, 'max_tokens': call.max_tokens}).encode()

  def _once(self, payload: bytes) -> str:
    headers = {'Content-Type': 'application/json'}
    if self.api_key:
      headers['Authorization'] = f'Bearer {self.api_key}'
    request = urllib.request.Request(self.url, data=payload, headers=headers, method='POST')
    try:
      with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
        body = response.read()
    except urllib.error.HTTPError as e:
      detail = e.read()[:300].decode('utf-8', 'replace')
      if e.code in (408, 409, 429) or e.code >= 500:
        raise Transient(f'http {e.code}', detail) from None
      raise Permanent(f'http {e.code}', detail) from None
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
      reason = 'timeout' if 'timed out' in str(e) else 'connection error'
      raise Transient(reason, str(e)[:300]) from None
    try:
      reply = json.loads(body)['choices'][0]['message']['content']
    except (json.JSONDecodeError, KeyError, IndexError, TypeError):
      raise Transient('malformed response', body[:300].decode('utf-8', 'replace')) from None
    if not isinstance(reply, str):
      raise Transient('malformed response', 'message content is not a string')
    return reply

  def _call(self, call: Call):
    try:
      payload = self._payload(call)
    except Permanent as e:
      return e
    for attempt in range(self.retries + 1):
      try:
        return self._once(payload)
      except Permanent as e:
        return e
      except Transient as e:
        if attempt == self.retries:
          return e
        time.sleep(self.backoff_s * 2 ** attempt)
    raise AssertionError('unreachable')

  def complete(self, calls: list[Call]) -> list:
    return list(self.pool.map(self._call, calls))


class JaxBackend:
  """coma_jax.generate on this process's devices (or the mesh given to `Generator.load`)."""

  def __init__(self, generator):
    self.generator = generator
    self.batch_size = generator.batch_size

  def complete(self, calls: list[Call]) -> list:
    from coma_jax.generate.generator import Request
    results, prepared, where = [None] * len(calls), [], []
    for i, call in enumerate(calls):
      request = Request(call.messages, max_new_tokens=min(call.max_tokens, self.generator.settings.max_new_tokens),
                        temperature=call.temperature, top_p=call.top_p, seed=call.seed)
      try:
        prepared.append(self.generator.prepare(request, i))
        where.append(i)
      except BadRecord as e:
        results[i] = Permanent('unreadable image', f'{e.reason} {e.detail}'.strip())
      except ValueError as e:
        results[i] = Permanent('bad request', str(e))
    for i, completion in zip(where, self.generator.generate_prepared(prepared)):
      results[i] = completion.text
    return results
