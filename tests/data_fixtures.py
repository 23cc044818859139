"""Test settings for the data tests; the raw files come from `coma_jax.data.demo_data`."""
from __future__ import annotations

import io
import os

from PIL import Image

from coma_jax.data.demo_data import write_mmeb_train, write_photos, write_stage1_jsonl  # noqa: F401
from coma_jax.data.image import ImageSettings
from coma_jax.model import ModelConfig

CONFIG_3B = os.path.join(os.path.dirname(__file__), '..', 'coma_jax', 'model', 'hf_configs', 'qwen2_5_vl_3b.json')
# Small images keep the tests fast; sizes still vary (grids from 2x2 up to 8x8 merged units).
SMALL_IMAGES = ImageSettings(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)


def model_config() -> ModelConfig:
  return ModelConfig.from_json_file(CONFIG_3B)


def image_bytes(image: Image.Image, fmt: str) -> bytes:
  buf = io.BytesIO()
  image.save(buf, fmt)
  return buf.getvalue()
