"""Every kind of bad input: a clear error naming the record, or a counted, logged skip."""

import numpy as np
import pytest
import skimage.data
from PIL import Image

from coma_jax.data.bad_records import BadRecord, BadRecordLog
from coma_jax.data.formats import parse_llava, read_jsonl
from coma_jax.data.image import ImageSettings, decode_image
from tests.data_fixtures import image_bytes
from tests.fuzz_records import expected_rgb

PHOTO = Image.fromarray(skimage.data.coffee()).resize((200, 150))


def conv(n_images=1):
  return [{'from': 'human', 'value': '<image>\n' * n_images + 'Q?'}, {'from': 'gpt', 'value': 'A.'}]


@pytest.mark.parametrize('make,reason', [
    (lambda tmp: str(tmp / 'nope.jpg'), 'missing image file'),
    (lambda tmp: image_bytes(PHOTO, 'JPEG')[:200], 'corrupt image'),
    (lambda tmp: b'', 'empty image file'),
    (lambda tmp: b'not an image at all', 'corrupt image'),
])
def test_bad_images_name_the_record(tmp_path, make, reason):
  with pytest.raises(BadRecord, match=f"bad record 'rec7': {reason}"):
    decode_image(make(tmp_path), 'rec7')


def test_decompression_bomb_is_refused_before_decoding():
  with pytest.raises(BadRecord, match="'rec8': decompression bomb"):
    decode_image(image_bytes(PHOTO, 'PNG'), 'rec8', ImageSettings(max_source_pixels=100 * 100))
  # A real bomb: a 20000 x 20000 PNG header over a few KB of zeros; refused from the header.
  bomb = Image.new('1', (20000, 20000))
  with pytest.raises(BadRecord, match='decompression bomb'):
    decode_image(image_bytes(bomb, 'PNG'), 'rec9')


@pytest.mark.parametrize('mode', ['L', 'RGBA', 'P', 'CMYK', 'LA', 'I;16'])
def test_other_modes_are_converted_by_value(mode):
  """Pixel values against an independent NumPy conversion of the stored array."""
  rng = np.random.default_rng(0)
  if mode == 'I;16':
    grey = np.asarray(PHOTO.convert('L'), np.uint32) * 257 + 100
    img = Image.fromarray(np.minimum(grey, 65535).astype(np.uint16))  # the full 16-bit range
  elif mode in ('RGBA', 'LA'):
    img = PHOTO.convert(mode)
    img.putalpha(Image.fromarray(rng.integers(0, 256, PHOTO.size[::-1], dtype=np.uint8)))
  else:
    img = PHOTO.convert(mode)
  out = decode_image(image_bytes(img, 'TIFF' if mode in ('CMYK', 'I;16') else 'PNG'), 'r')
  palette = np.asarray(img.getpalette()).reshape(-1, 3) if mode == 'P' else None
  expected = expected_rgb(mode, np.asarray(img), palette=palette, transparent=None)
  assert out.mode == 'RGB' and out.size == PHOTO.size
  assert np.abs(np.asarray(out, np.float64) - expected).max() <= (1 if mode in ('RGBA', 'LA') else 0)
  if mode == 'I;16':
    assert np.asarray(out).mean() < 200  # PIL's own convert('RGB') clamps this photo to white


def test_transparent_pixels_become_white():
  rgba = Image.new('RGBA', (30, 30), (10, 20, 30, 0))
  assert decode_image(image_bytes(rgba, 'PNG'), 'r').getpixel((5, 5)) == (255, 255, 255)


def test_record_level_problems():
  with pytest.raises(BadRecord, match="'r1': no conversation"):
    parse_llava({'id': 'r1', 'image': 'a.jpg', 'conversations': []})
  with pytest.raises(BadRecord, match="'r1': no conversation"):
    parse_llava({'id': 'r1', 'image': 'a.jpg'})
  with pytest.raises(BadRecord, match="'r2': image count mismatch.*2 <image> tags.*1 images"):
    parse_llava({'id': 'r2', 'image': 'a.jpg', 'conversations': conv(2)})
  with pytest.raises(BadRecord, match="'r3': non-UTF-8 text"):
    parse_llava({'id': 'r3', 'image': 'a.jpg', 'conversations': [
        {'from': 'human', 'value': '<image>\n' + b'\xff'.decode('utf-8', 'surrogateescape')},
        {'from': 'gpt', 'value': 'A'}]})
  with pytest.raises(BadRecord, match="'r4': malformed record.*not human"):
    parse_llava({'id': 'r4', 'conversations': [{'from': 'gpt', 'value': 'A'}]})


def test_non_utf8_and_non_json_lines_are_named(tmp_path):
  path = tmp_path / 'x.jsonl'
  path.write_bytes(b'{"id": "ok", "conversations": []}\n{"id": "\xff"}\nnot json\n')
  out = list(read_jsonl(str(path)))
  assert out[0] == ('x.jsonl:1', {'id': 'ok', 'conversations': []})
  assert isinstance(out[1][1], BadRecord) and "'x.jsonl:2': non-UTF-8 text" in str(out[1][1])
  assert isinstance(out[2][1], BadRecord) and "'x.jsonl:3': malformed record" in str(out[2][1])


def test_skip_policy_counts_and_logs_the_first_offenders(caplog):
  skip = BadRecordLog('skip', keep_first=2)
  for i in range(5):
    skip.handle(BadRecord(f'r{i}', 'corrupt image' if i % 2 else 'missing image file'))
  skip.kept += 7
  assert skip.summary() == {'records': 12, 'kept': 7, 'skipped': 5, 'by_reason': {'missing image file': 3, 'corrupt image': 2},
                            'first': ["bad record 'r0': missing image file", "bad record 'r1': corrupt image"]}
  assert sum('skipping' in r.message for r in caplog.records) == 2
  with pytest.raises(BadRecord, match="'r9'"):
    BadRecordLog('error').handle(BadRecord('r9', 'corrupt image'))
