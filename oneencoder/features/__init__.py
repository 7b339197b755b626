"""Features: the modality interface, frozen backbones, the LMDB feature cache, its shards and banks.

Owns everything upstream of the trainable parts: a sample in, token features out, cached once.
May import data/ and the shared utilities.
"""
