"""Curriculum learning: difficulty scorers, pacing functions and batch samplers."""

from .samplers import RandomBatchSampler, build_sampler

__all__ = ["RandomBatchSampler", "build_sampler"]
