"""Builders that write JSONL manifests from real, locally installed data."""
