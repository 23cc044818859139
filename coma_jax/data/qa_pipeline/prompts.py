"""The requests the reference sends, and the parsing of the replies."""
from __future__ import annotations

import random
import re

QUESTION_PROMPT = (
    'Look at this image carefully and write 3 to 5 specific questions that together capture its key '
    'visual information, so that someone who reads the questions and their answers could find this '
    'image among many similar ones. Ask about the main objects and their attributes (colour, number, '
    'size, material), the scene and setting, any visible text or logos, and the spatial relations '
    'between things. Every question must be answerable from the image alone; do not ask subjective '
    'questions or questions about things that are not visible. Write the questions as a numbered list, '
    'one per line, and nothing else.')

CAPTION_PROMPTS = (
    'Describe the image briefly.',
    'Write a short caption for this image.',
    'Summarise the visual content of the image in one sentence.',
    'Give a brief description of the image.',
    'What does this image show? Answer in one short sentence.',
    'Provide a concise caption for the picture.',
)

QUESTION_TEMPERATURE = 0.7
_NUMBERED = re.compile(r'^\s*(?:[-*\u2022]\s*)?(?:(?:Q(?:uestion)?\s*)?\d{1,2}\s*[.):\]]|\(\d{1,2}\))\s*(.+?)\s*$', re.I)


def parse_questions(reply: str) -> list[str]:
  """The numbered (or bulleted) items of a reply, numbering and markdown bold stripped; lines that
  are not list items (a preamble) are dropped. Empty when the reply holds no list."""
  questions = []
  for line in reply.splitlines():
    m = _NUMBERED.match(line) or re.match(r'^\s*[-*\u2022]\s+(.+?)\s*$', line)
    if m:
      text = m.group(1).replace('**', '').strip()
      if len(text) > 3:
        questions.append(text)
  return questions


def caption_prompt(seed: int, image_id: str) -> str:
  """One of the short-caption prompts, chosen from (seed, image id): a rerun asks the same."""
  return random.Random(f'{seed}/{image_id}').choice(CAPTION_PROMPTS)


def user_turn(text: str, image: str | None = None) -> dict:
  content = ([{'type': 'image', 'image': image}] if image else []) + [{'type': 'text', 'text': text}]
  return {'role': 'user', 'content': content}
