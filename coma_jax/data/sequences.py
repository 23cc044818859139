"""Token sequences of the two CoMa stages, with per-token roles, labels and truncation.

Stage 1:  [vision blocks] [input text + instruction] [K compression tokens] [chat turns]
          roles:  PREFIX ...                          COMPRESSION           DIALOGUE
Stage 2:  [text with <|image_1|> -> vision block] [K compression tokens]

Record text is encoded as plain text (`encode_text`): only this module places special tokens, so a
record that writes `<|image_pad|>` or `<|im_end|>` gets those characters, not control tokens.

Truncation never cuts a compression token or an image: stage 1 first drops trailing dialogue
turns (keeping one), then trims the input text; stage 2 trims the text. Each cut is counted in
`Example.cuts`; what still does not fit is a BadRecord.
"""
from __future__ import annotations

import collections
import dataclasses

import numpy as np

from coma_jax.data.bad_records import BadRecord
from coma_jax.data.formats import MMEB_IMAGE_TAG, Side, Stage1Record, check_side
from coma_jax.data.image import ImageSettings, decode_image, resize_image
from coma_jax.data.tokenizer import QwenTokenizer

ROLE_PAD, ROLE_PREFIX, ROLE_COMPRESSION, ROLE_DIALOGUE = 0, 1, 2, 3
IGNORE = -100
LABEL_MODES = ('answers', 'dialogue')
STAGE1_INSTRUCTION = '\nSummarize above image and text in a few words.'


@dataclasses.dataclass(frozen=True)
class SequenceSettings:
  num_compression_tokens: int = 32
  max_length: int = 8192          # the largest length bucket
  max_label_tokens: int = 4096    # the largest label budget (stage 1)
  max_vision_slots: int = 16384   # the largest vision budget of one example
  label_mode: str = 'answers'
  multi_turn: bool = True
  instruction: str = STAGE1_INSTRUCTION
  image: ImageSettings = ImageSettings(min_pixels=28 * 28 * 256, max_pixels=28 * 28 * 1024)

  def __post_init__(self):
    if self.label_mode not in LABEL_MODES:
      raise ValueError(f'label_mode must be one of {LABEL_MODES}, got {self.label_mode!r}')
    if self.num_compression_tokens < 0:  # 0: stage 0, the plain LM loss without compression tokens
      raise ValueError(f'num_compression_tokens must be >= 0, got {self.num_compression_tokens}')


@dataclasses.dataclass
class Example:
  """One sequence, unpadded: what the collator turns into a static-shape batch row."""
  id: str
  tokens: np.ndarray         # (n,) int32
  roles: np.ndarray          # (n,) int8
  labels: np.ndarray         # (n,) int32, IGNORE where unsupervised (HF style, unshifted)
  images: list               # ResizedImage per image (uint8; patchified by the collator)
  grids: list                # [(t, h, w)] per image
  cuts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  positions: np.ndarray | None = None  # (3, n) M-RoPE positions, set by the worker's contract check

  @property
  def num_patches(self) -> int:
    return sum(len(i) for i in self.images)

  @property
  def num_labels(self) -> int:
    return int((self.labels != IGNORE).sum())


@dataclasses.dataclass(frozen=True)
class TokenIds:
  """The special ids the sequences use, resolved once per tokenizer."""
  vision_start: int
  vision_end: int
  image_pad: int
  im_start: int
  im_end: int
  compression: tuple[int, ...]

  @classmethod
  def of(cls, tok: QwenTokenizer, k: int) -> 'TokenIds':
    return cls(tok.id_of('<|vision_start|>'), tok.id_of('<|vision_end|>'), tok.id_of('<|image_pad|>'),
               tok.id_of('<|im_start|>'), tok.id_of('<|im_end|>'), tuple(tok.add_compression_tokens(k)) if k else ())


def _images(refs, record_id: str, settings: ImageSettings):
  images = [resize_image(decode_image(ref, record_id, settings), settings) for ref in refs]
  return images, [i.grid for i in images]


def _vision_block(ids: TokenIds, grid, merge: int) -> list[int]:
  t, h, w = grid
  return [ids.vision_start] + [ids.image_pad] * (t * h * w // merge**2) + [ids.vision_end]


def _check_vision_fits(record_id, grids, settings: SequenceSettings, slots_of):
  slots = slots_of(grids)
  if slots > settings.max_vision_slots:
    raise BadRecord(record_id, 'too long', f'its images need {slots} vision slots, the largest '
                    f'budget is {settings.max_vision_slots}')


def stage1_example(record: Stage1Record, tok: QwenTokenizer, ids: TokenIds, settings: SequenceSettings,
                   slots_of) -> Example:
  """The stage-1 sequence of one record. `slots_of(grids)` gives the vision slots images take."""
  images, grids = _images(record.images, record.id, settings.image)
  _check_vision_fits(record.id, grids, settings, slots_of)
  merge = settings.image.merge_size
  vision = [t for g in grids for t in _vision_block(ids, g, merge)]
  input_text = tok.encode_text(record.input_text) if record.input_text else []
  instruction = tok.encode_text(settings.instruction)
  compression = list(ids.compression)

  turns = []  # per turn: (tokens, labels); the chat template, its control tokens placed by id
  newline, assistant = tok.encode_text('\n'), tok.encode_text('assistant\n')
  for question, answer in (record.turns if settings.multi_turn else record.turns[:1]):
    head = [ids.im_start] + tok.encode_text(f'user\n{question}') + [ids.im_end] + newline + [ids.im_start] + assistant
    reply = tok.encode_text(answer) + [ids.im_end]
    tail = newline
    tokens = head + reply + tail
    if settings.label_mode == 'answers':
      labels = [IGNORE] * len(head) + reply + [IGNORE] * len(tail)
    else:
      labels = list(tokens)
    turns.append((tokens, labels))

  cuts = collections.Counter()
  fixed = len(vision) + len(instruction) + len(compression)
  dialogue_len = lambda: sum(len(t) for t, _ in turns)
  label_count = lambda: sum(sum(1 for x in lab if x != IGNORE) for _, lab in turns)
  while len(turns) > 1 and (fixed + len(input_text) + dialogue_len() > settings.max_length
                            or label_count() > settings.max_label_tokens):
    turns.pop()
    cuts['dropped_turns'] += 1
  overflow = fixed + len(input_text) + dialogue_len() - settings.max_length
  if overflow > 0 and input_text:
    cut = min(overflow, len(input_text))
    input_text = input_text[:len(input_text) - cut]
    cuts['trimmed_input_text'] += 1
  total = fixed + len(input_text) + dialogue_len()
  if total > settings.max_length or label_count() > settings.max_label_tokens:
    raise BadRecord(record.id, 'too long', f'{total} tokens and {label_count()} labels after truncation; '
                    f'max_length {settings.max_length}, max_label_tokens {settings.max_label_tokens}')

  prefix = vision + input_text + instruction
  dialogue = [t for tokens, _ in turns for t in tokens]
  labels = [IGNORE] * (len(prefix) + len(compression)) + [x for _, lab in turns for x in lab]
  roles = [ROLE_PREFIX] * len(prefix) + [ROLE_COMPRESSION] * len(compression) + [ROLE_DIALOGUE] * len(dialogue)
  return Example(id=record.id, tokens=np.asarray(prefix + compression + dialogue, np.int32),
                 roles=np.asarray(roles, np.int8), labels=np.asarray(labels, np.int32),
                 images=images, grids=grids, cuts=cuts)


def stage2_example(side: Side, record_id: str, tok: QwenTokenizer, ids: TokenIds,
                   settings: SequenceSettings, slots_of) -> Example:
  """One side of a pair (query, positive or negative): text with its image, then K tokens."""
  check_side(side, record_id, 'side')
  images, grids = _images([] if side.image is None else [side.image], record_id, settings.image)
  _check_vision_fits(record_id, grids, settings, slots_of)
  before, _, after = side.text.partition(MMEB_IMAGE_TAG) if grids else ('', '', side.text)
  vision = _vision_block(ids, grids[0], settings.image.merge_size) if grids else []
  before, after = tok.encode_text(before) if before else [], tok.encode_text(after) if after else []
  compression = list(ids.compression)
  cuts = collections.Counter()
  overflow = len(before) + len(vision) + len(after) + len(compression) - settings.max_length
  if overflow > 0 and (before or after):
    cuts['trimmed_text'] += 1
    cut_after = min(overflow, len(after))
    after = after[:len(after) - cut_after]
    before = before[:max(0, len(before) - (overflow - cut_after))]
  prefix = before + vision + after
  if len(prefix) + len(compression) > settings.max_length:
    raise BadRecord(record_id, 'too long', f'{len(prefix) + len(compression)} tokens after truncation; '
                    f'max_length {settings.max_length}')
  n = len(prefix) + len(compression)
  return Example(id=record_id, tokens=np.asarray(prefix + compression, np.int32),
                 roles=np.asarray([ROLE_PREFIX] * len(prefix) + [ROLE_COMPRESSION] * len(compression), np.int8),
                 labels=np.full(n, IGNORE, np.int32), images=images, grids=grids, cuts=cuts)
