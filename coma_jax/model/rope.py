"""Rotary embeddings on device: the vision tower's 2-D rotary and the LLM's 3-D M-RoPE.

The position ids themselves are computed on the host (`rope_index.py`, `vision_layout.py`).
Angles are computed and applied in fp32, then cast back, as transformers does for the vision tower.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rotate_half(x: jax.Array) -> jax.Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x: (..., T, heads, head_dim); cos/sin: (..., T, head_dim), broadcast over heads."""
  x32 = x.astype(jnp.float32)
  cos, sin = cos[..., None, :], sin[..., None, :]
  return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


def vision_cos_sin(rope_ids: jax.Array, head_dim: int, theta: float):
  """rope_ids (..., 2) int (h, w) per patch -> cos, sin (..., head_dim).

  Axial rotary: head_dim/4 frequencies, angle layout [h-freqs, w-freqs] repeated twice.
  """
  spatial_dim = head_dim // 2
  inv_freq = 1.0 / (theta ** (np.arange(0, spatial_dim, 2, dtype=np.float32) / spatial_dim))
  angles = rope_ids.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # (..., 2, hd/4)
  angles = angles.reshape(*angles.shape[:-2], -1)  # (..., hd/2) = [h, w]
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def mrope_cos_sin(positions: jax.Array, head_dim: int, theta: float, mrope_section):
  """positions (3, B, L) int (t, h, w) -> cos, sin (B, L, head_dim).

  Frequency j of the head_dim/2 takes its position from axis t, h or w according to
  `mrope_section` (e.g. [16, 24, 24]); the half is then repeated, as in Qwen2.5-VL.
  """
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  axis_of_freq = np.repeat(np.arange(3), mrope_section)  # (head_dim/2,)
  pos = positions.astype(jnp.float32)[axis_of_freq]  # (hd/2, B, L)
  angles = jnp.moveaxis(pos, 0, -1) * jnp.asarray(inv_freq)  # (B, L, hd/2)
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)
