"""Evaluation: retrieval metrics and their chance levels, zero-shot retrieval between modalities,
exact top-k search, and results tables.

May import model/, features/, data/ and the shared utilities.
"""
