"""Training: stage files, the generic trainer, the objective, runs and resume, data parallelism,
progressive add-modality, and the curriculum (scorers, pacers, samplers, weights).

May import evaluation/, model/, features/, data/ and the shared utilities.
"""
