"""HF bridges: the name mapping, checkpoint I/O and the processor-style forward."""
from coma_jax.hf.forward import hf_style_forward
from coma_jax.hf.io import load_pretrained, save_pretrained

__all__ = ['hf_style_forward', 'load_pretrained', 'save_pretrained']
