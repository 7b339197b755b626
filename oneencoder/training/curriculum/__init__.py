"""Curriculum learning: difficulty scorers, pacing functions, batch samplers and the online loss predictor."""

from . import agreement  # noqa: F401  (registers the pair_agreement scorer)
from .difficulty import DifficultyTable, compute_difficulty, difficulty_path
from .online import LossPredictor
from .pacers import create_pacer, list_pacers, register_pacer, schedule
from .samplers import CurriculumBatchSampler, RandomBatchSampler, build_sampler, mine_neighbours
from .scorers import create_scorer, list_scorers, register_scorer

__all__ = [
    "CurriculumBatchSampler", "DifficultyTable", "LossPredictor", "RandomBatchSampler", "build_sampler",
    "compute_difficulty", "create_pacer", "create_scorer", "difficulty_path", "list_pacers", "list_scorers",
    "mine_neighbours", "register_pacer", "register_scorer", "schedule",
]
