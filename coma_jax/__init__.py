"""coma_jax: CoMa (Compressing then Matching) multimodal embeddings on JAX/Flax."""
__version__ = '0.1.0'


def __getattr__(name):
  if name == 'Embedder':  # imported on use: `import coma_jax` stays light
    from coma_jax.eval.embedder import Embedder
    return Embedder
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
