"""Apps: what users call on a trained model: the ``oneencoder.load`` API, zero-shot classification,
vector indexes, the browser explorer and ONNX export.

May import every subpackage below it; nothing in the library imports apps/ but the package's own ``__init__``.
"""
