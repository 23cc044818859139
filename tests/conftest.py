"""Test-wide JAX settings: fp32 matmuls at highest precision, a persistent compile cache."""
import os

os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(os.path.dirname(os.path.dirname(__file__)), '.cache', 'jax'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

import jax  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')
