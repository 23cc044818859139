"""Our Qwen image preprocessing equals transformers' Qwen2VLImageProcessorPil on real photos."""
import numpy as np
import pytest
import skimage.data
from PIL import Image
from transformers import Qwen2VLImageProcessorPil

from coma_jax.data.image import ImageSettings, preprocess_image, smart_resize


@pytest.mark.parametrize('photo,max_tokens', [('astronaut', 256), ('chelsea', 1024), ('coffee', 64)])
def test_pixel_values_equal_the_processor(photo, max_tokens):
  image = Image.fromarray(getattr(skimage.data, photo)())
  settings = ImageSettings(min_pixels=28 * 28 * 16, max_pixels=28 * 28 * max_tokens)
  ref = Qwen2VLImageProcessorPil(min_pixels=settings.min_pixels, max_pixels=settings.max_pixels)(
      images=[image], return_tensors='np')
  patches, grid = preprocess_image(image, settings)
  assert list(grid) == ref['image_grid_thw'][0].tolist()
  assert np.abs(patches - ref['pixel_values']).max() <= 1e-5


def test_degenerate_sizes_are_errors():
  with pytest.raises(ValueError, match='zero size'):
    smart_resize(0, 10, 28, 16, 1000)
  with pytest.raises(ValueError, match='aspect ratio'):
    smart_resize(10, 3000, 28, 16, 10**6)
