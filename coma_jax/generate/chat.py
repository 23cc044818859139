"""Qwen2.5-VL chat prompts, built exactly as its chat template builds them, as token ids.

Messages are OpenAI-style: `{'role': 'system' | 'user' | 'assistant', 'content': str | [part]}`,
a part `{'type': 'text', 'text': ...}` or an image (`{'type': 'image', ...}` or `{'type':
'image_url', ...}`) or a video. Without a leading system message the template adds the default one.

`QWEN25_VL_CHAT_TEMPLATE` is the template Qwen2.5-VL's processor ships (chat_template.json); the
tests render it with transformers' `apply_chat_template` and compare. The token ids are encoded
segment by segment between the template's control tokens, as a tokenizer does with added tokens,
except that message text is always plain text: a message that writes `<|im_end|>` cannot end its
turn or inject a vision placeholder.
"""
from __future__ import annotations

from typing import Sequence

DEFAULT_SYSTEM = 'You are a helpful assistant.'

QWEN25_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

IMAGE, VIDEO = 'image', 'video'


def part_kind(part: dict) -> str:
  """'image', 'video' or 'text', in the template's order of tests."""
  if not isinstance(part, dict):
    raise ValueError(f'a content part must be a dict, got {type(part).__name__}')
  kind = part.get('type')
  if kind == 'image' or 'image' in part or 'image_url' in part:
    return IMAGE
  if kind == 'video' or 'video' in part:
    return VIDEO
  if 'text' in part:
    return 'text'
  raise ValueError(f'a content part needs a text, an image or a video: {sorted(part)}')


def chat_pieces(messages: Sequence[dict], add_generation_prompt: bool = True) -> list[tuple[str, str]]:
  """The rendered prompt as pieces: ('special', token) for template control tokens, ('text', s)
  for plain text (template text and message text, adjacent pieces merged)."""
  if not messages:
    raise ValueError('a chat needs at least one message')
  pieces: list[tuple[str, str]] = []

  def text(s: str):
    if pieces and pieces[-1][0] == 'text':
      pieces[-1] = ('text', pieces[-1][1] + s)
    elif s:
      pieces.append(('text', s))

  special = lambda token: pieces.append(('special', token))
  for i, message in enumerate(messages):
    role, content = message.get('role'), message.get('content')
    if role not in ('system', 'user', 'assistant'):
      raise ValueError(f'message {i}: role {role!r} is not system, user or assistant')
    if i == 0 and role != 'system':
      special('<|im_start|>'), text(f'system\n{DEFAULT_SYSTEM}'), special('<|im_end|>'), text('\n')
    special('<|im_start|>')
    text(f'{role}\n')
    if isinstance(content, str):
      text(content)
    elif isinstance(content, list):
      for part in content:
        kind = part_kind(part)
        if kind == 'text':
          text(str(part['text']))
        else:
          special('<|vision_start|>'), special('<|image_pad|>' if kind == IMAGE else '<|video_pad|>')
          special('<|vision_end|>')
    else:
      raise ValueError(f'message {i}: content must be a string or a list of parts')
    special('<|im_end|>')
    text('\n')
  if add_generation_prompt:
    special('<|im_start|>')
    text('assistant\n')
  return pieces


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
  """The prompt string the template renders."""
  return ''.join(s for _, s in chat_pieces(messages, add_generation_prompt))


def encode_chat(messages: Sequence[dict], tokenizer, vision_tokens: Sequence[int] = (),
                add_generation_prompt: bool = True) -> list[int]:
  """Token ids of the prompt; the k-th image or video placeholder becomes `vision_tokens[k]`
  pad tokens (its merged token count), in the order they appear."""
  ids: list[int] = []
  counts = iter(vision_tokens)
  for kind, s in chat_pieces(messages, add_generation_prompt):
    if kind == 'text':
      ids += tokenizer.encode_text(s)
    elif s in ('<|image_pad|>', '<|video_pad|>'):
      n = next(counts, None)
      if n is None:
        raise ValueError(f'the chat has more images and videos than the {len(vision_tokens)} given')
      ids += [tokenizer.id_of(s)] * int(n)
    else:
      ids.append(tokenizer.id_of(s))
  if next(counts, None) is not None:
    raise ValueError(f'{len(vision_tokens)} vision items given, but the chat has fewer')
  return ids


def media_parts(messages: Sequence[dict]) -> list[tuple[str, dict]]:
  """(kind, part) for every image and video part, in prompt order."""
  out = []
  for message in messages:
    if isinstance(message.get('content'), list):
      out += [(k, p) for p in message['content'] if (k := part_kind(p)) != 'text']
  return out
