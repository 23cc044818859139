"""Generation on the ported Qwen2.5-VL: chat prompts, KV-cache decoding, sampling, `Generator`."""
from coma_jax.generate.decode import DecodeSettings, generate, generate_tokens
from coma_jax.generate.generator import Completion, Generator, Request

__all__ = ['Completion', 'DecodeSettings', 'Generator', 'Request', 'generate', 'generate_tokens']
