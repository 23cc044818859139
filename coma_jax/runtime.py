"""Process-wide JAX settings shared by the entry points."""
from __future__ import annotations

import os

import jax


def enable_compilation_cache(path: str | None = None) -> str:
  """Turns on JAX's persistent compilation cache (default: $JAX_COMPILATION_CACHE_DIR or ~/.cache)."""
  path = path or os.environ.get('JAX_COMPILATION_CACHE_DIR') or os.path.expanduser('~/.cache/coma_jax/jax')
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  return path
