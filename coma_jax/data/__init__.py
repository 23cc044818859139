"""Data: tokenizer, image preprocessing, record formats and pipelines."""
