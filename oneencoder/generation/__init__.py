"""Generation from the shared space: a caption decoder trained on text alone.

Owns the decoder network, its vocabulary, decoding (greedy and beam search) and its
text-only training (CapDec noise, DeCap memory projection). It may import the layers below
it (utilities, data, features, model, evaluation, training); the application API and the
CLI sit above it and hand it embeddings.
"""
