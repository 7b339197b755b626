"""Model: the trainable parts (adapters, modality tokens, Universal Projection), losses, and the
checksummed model directory.

May import features/, data/ and the shared utilities.
"""
