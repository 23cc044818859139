"""Evaluation: retrieval scoring (Precision@1) used by stage-2 validation; the MMEB harness grows here."""
