"""Qwen2.5-VL image preprocessing (as transformers' `Qwen2VLImageProcessorPil`), in NumPy + PIL.

smart_resize to a multiple of patch*merge within [min_pixels, max_pixels], bicubic resampling,
rescale to [0, 1], CLIP normalisation, then patchify into (grid_h*grid_w, C*T*P*P) rows in the
merge-unit-major order the vision tower expects (the still image is repeated over T frames).
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import warnings

import numpy as np
from PIL import Image

from coma_jax.data.bad_records import BadRecord

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200  # Qwen's smart_resize refuses longer / shorter side above this


@dataclasses.dataclass(frozen=True)
class ImageSettings:
  min_pixels: int = 56 * 56
  max_pixels: int = 28 * 28 * 1280
  patch_size: int = 14
  merge_size: int = 2
  temporal_patch_size: int = 2
  max_source_pixels: int = 64 * 1024 * 1024  # larger is refused as a decompression bomb
  max_file_bytes: int = 256 * 1024 * 1024  # larger is refused before it is read

  def grid(self, height: int, width: int) -> tuple[int, int, int]:
    """The (t, h, w) patch grid an image of this size becomes."""
    h, w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
    return 1, h // self.patch_size, w // self.patch_size

  @property
  def factor(self) -> int:
    return self.patch_size * self.merge_size


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
  """Target (height, width): multiples of `factor`, area within the bounds, aspect ratio kept."""
  if min(height, width) <= 0:
    raise ValueError(f'image has zero size ({height}x{width})')
  if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
    raise ValueError(f'absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {height}x{width}')
  h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt(height * width / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def patchify(image_chw: np.ndarray, s: ImageSettings, out: np.ndarray | None = None) -> np.ndarray:
  """(C, H, W) -> (grid_h*grid_w, C*T*P*P), merge-unit-major; written into `out` when given."""
  c, h, w = image_chw.shape
  p, m, t = s.patch_size, s.merge_size, s.temporal_patch_size
  gh, gw = h // p, w // p
  x = image_chw.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
  x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))
  if out is None:
    return x.reshape(gh * gw, c * t * p * p)
  out.reshape(gh // m, gw // m, m, m, c, t, p, p)[...] = x
  return out


class ResizedImage:
  """A resized uint8 RGB image: 8x smaller than its float32 patches (which repeat each frame T
  times), so workers hand these to the collator, which patchifies straight into the batch."""

  def __init__(self, pixels: np.ndarray, settings: ImageSettings):
    self.pixels, self.settings = pixels, settings
    h, w = pixels.shape[:2]
    self.grid = (1, h // settings.patch_size, w // settings.patch_size)

  def __len__(self) -> int:
    return self.grid[1] * self.grid[2]

  def write_patches(self, out: np.ndarray) -> np.ndarray:
    """Rescale, CLIP-normalise and patchify into `out` (len(self), C*T*P*P) float32."""
    normalized = (self.pixels.astype(np.float32) * np.float32(1 / 255.0) - np.asarray(CLIP_MEAN, np.float32)) \
        / np.asarray(CLIP_STD, np.float32)
    return patchify(normalized.transpose(2, 0, 1), self.settings, out)

  def patches(self) -> np.ndarray:
    s = self.settings
    return self.write_patches(np.empty((len(self), 3 * s.temporal_patch_size * s.patch_size**2), np.float32))


def resize_image(image: Image.Image, settings: ImageSettings = ImageSettings()) -> ResizedImage:
  image = to_rgb(image)
  h, w = smart_resize(image.height, image.width, settings.factor, settings.min_pixels, settings.max_pixels)
  return ResizedImage(np.asarray(image.resize((w, h), Image.Resampling.BICUBIC), np.uint8), settings)


def preprocess_image(image: Image.Image, settings: ImageSettings = ImageSettings()) -> tuple[np.ndarray, tuple[int, int, int]]:
  """PIL image -> (pixel patches (N, C*T*P*P) float32, grid (1, grid_h, grid_w))."""
  resized = resize_image(image, settings)
  return resized.patches(), resized.grid


def to_rgb(image: Image.Image, record_id: str = 'image') -> Image.Image:
  """Any PIL mode to RGB; transparency is composited on white (as transformers does).

  16-bit and 32-bit greyscale are scaled by value (see `high_depth_to_uint8`): PIL's
  `convert('RGB')` clamps them at 255, which turns a 16-bit photo white. transformers' processor
  has that clamp; this is a deliberate deviation (README, "Deviations").
  """
  if image.mode == 'RGB':
    return image
  if image.mode in ('I', 'F') or image.mode.startswith('I;16'):
    return Image.fromarray(np.repeat(high_depth_to_uint8(image, record_id)[:, :, None], 3, axis=2), 'RGB')
  if image.mode in ('RGBA', 'LA', 'PA') or (image.mode == 'P' and 'transparency' in image.info):
    rgba = image.convert('RGBA')
    canvas = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    canvas.alpha_composite(rgba)
    return canvas.convert('RGB')
  try:
    return image.convert('RGB')  # L, 1, P, CMYK, YCbCr, ...
  except ValueError as e:  # a mode PIL cannot convert
    raise BadRecord(record_id, 'unsupported image mode', f'{image.mode}: {e}') from None


def high_depth_to_uint8(image: Image.Image, record_id: str = 'image') -> np.ndarray:
  """(H, W) uint8 of a greyscale image of mode I;16*, I or F, scaled by value.

  Integers divide by 257 (65535 -> 255); floats multiply by 255 when their maximum is <= 1,
  else are taken as 0-255 values. Rounded to nearest, clipped to 0-255.
  """
  values = np.asarray(image).astype(np.float64)
  if image.mode == 'F':
    if not np.isfinite(values).all():
      raise BadRecord(record_id, 'corrupt image', 'non-finite pixel values in a float image')
    if values.max() <= 1:
      values = values * 255
  else:
    values = values / 257
  return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def decode_image(source: bytes | str, record_id: str, settings: ImageSettings = ImageSettings()) -> Image.Image:
  """Bytes or a file path -> a fully decoded RGB image, or a BadRecord naming the record.

  The one check of an image that does not depend on a run's config, used by the dataset build
  and the loaders alike. Refused: a missing path or one that is not a file, an empty file, a
  corrupt or truncated image, a zero-size image, an aspect ratio beyond `MAX_ASPECT_RATIO`
  (Qwen's resize refuses it), and more than `max_source_pixels` (checked from the header).
  """
  if isinstance(source, str):
    if not os.path.exists(source):
      raise BadRecord(record_id, 'missing image file', source)
    if not os.path.isfile(source):
      raise BadRecord(record_id, 'image path is not a file', source)
    try:
      size = os.path.getsize(source)
      if size > settings.max_file_bytes:
        raise BadRecord(record_id, 'image file too large', f'{source}: {size} bytes > max_file_bytes')
      with open(source, 'rb') as f:
        source = f.read()
    except OSError as e:  # permissions, I/O errors
      raise BadRecord(record_id, 'unreadable image file', f'{type(e).__name__}: {e}') from None
  if len(source) == 0:
    raise BadRecord(record_id, 'empty image file')
  if len(source) > settings.max_file_bytes:
    raise BadRecord(record_id, 'image file too large', f'{len(source)} bytes > max_file_bytes')
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('error', Image.DecompressionBombWarning)
      image = Image.open(io.BytesIO(source))
      width, height = image.size
      if width * height > settings.max_source_pixels:
        raise BadRecord(record_id, 'decompression bomb',
                        f'{width}x{height} px > max_source_pixels {settings.max_source_pixels}')
      if width == 0 or height == 0:
        raise BadRecord(record_id, 'zero-size image', f'{width}x{height}')
      if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise BadRecord(record_id, 'extreme aspect ratio', f'{width}x{height} px, more than {MAX_ASPECT_RATIO}:1')
      image.load()
  except BadRecord:
    raise
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise BadRecord(record_id, 'decompression bomb', str(e)) from None
  except Exception as e:  # noqa: BLE001 -- only PIL's decoders run here, on untrusted bytes: any
    # error they raise (OSError, SyntaxError, NotImplementedError for an unsupported variant...) is the data's
    raise BadRecord(record_id, 'corrupt image', f'{type(e).__name__}: {e}') from None
  return to_rgb(image, record_id)
