"""coma_jax: CoMa (Compressing then Matching) multimodal embeddings on JAX/Flax."""
__version__ = '0.1.0'
