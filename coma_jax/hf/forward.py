"""`hf_style_forward`: run our model on exactly what a transformers Qwen2.5-VL processor returns."""
from __future__ import annotations

import jax
import numpy as np

from coma_jax.model.inputs import build_model_inputs
from coma_jax.model.qwen2_5_vl import Qwen25VL, forward


def hf_style_forward(model: Qwen25VL, input_ids, attention_mask=None, pixel_values=None,
                     image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
                     second_per_grid_ts=None, mm_token_type_ids=None) -> np.ndarray:
  """Logits (B, L, V) as NumPy float32.

  Converts the processor's NumPy outputs into the static-shape input contract on the host and
  calls the same jitted forward that training uses. `mm_token_type_ids`, when given, must agree
  with the placeholder ids (our positions are derived from the ids themselves).
  """
  cfg = model.config
  if mm_token_type_ids is not None:
    ids = np.asarray(input_ids)
    expected = np.where(ids == cfg.image_token_id, 1, np.where(ids == cfg.video_token_id, 2, 0))
    if not np.array_equal(np.asarray(mm_token_type_ids), expected):
      raise ValueError('mm_token_type_ids disagree with the image/video placeholder tokens in input_ids')
  inputs = build_model_inputs(
      cfg, np.asarray(input_ids), None if attention_mask is None else np.asarray(attention_mask),
      pixel_values=pixel_values, image_grid_thw=image_grid_thw,
      pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
      second_per_grid_ts=second_per_grid_ts)
  return np.asarray(jax.device_get(forward(model, inputs)))
