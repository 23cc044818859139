"""Evaluation: the Embedder, MMEB-eval reading, Precision@1 scoring and reports."""
