"""oneencoder: progressive multi-modal alignment with cross-modal contrastive curriculum learning.

The package follows the data flow, lowest first; a subpackage imports only those below it
(``tests/test_layout.py`` checks this):

- shared utilities (this folder): ``errors``, ``fileio``, ``names``, ``progress``, ``registry``,
  ``options`` (the one option schema), ``runtime``, ``deps`` and ``modality``, the one
  interface a modality implements;
- ``data``: manifests, table import, builders of real data sets (``data.sources``);
- ``features``: frozen backbones, the feature cache, its shards and banks;
- ``model``: adapters, modality tokens, the Universal Projection, losses, the model directory;
- ``evaluation``: retrieval and caption metrics, zero-shot retrieval, exact top-k, results tables;
- ``training``: stage files, the trainer, runs, data parallelism, add-modality, the curriculum;
- ``generation``: the caption decoder, trained on text alone, for any modality of the space;
- ``apps``: ``load`` and the inference API, classification, indexes, ``serve``, ONNX export.

Three top-level folders of the repository are installed inside this namespace, so that
``import modalities`` never leaks into a user's environment: ``modalities/`` is
``oneencoder.modalities``, ``cli/`` is ``oneencoder.cli`` and ``stages/`` is
``oneencoder.stages`` (``pyproject.toml``'s ``package-dir``). In a source checkout the
lines below give the same names by adding the repository root to this package's path.

Example:
    >>> import oneencoder
    >>> m = oneencoder.load("outputs/demo/model")
    >>> m.similarity(m.encode("image", ["cat.png"]), m.encode("text", ["A cat."]))
"""

from pathlib import Path as _Path

# In a source checkout, map modalities/, stages/ and cli/ under this package the way the
# installed package does (see above), so both import the same names.
_root = _Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and (_root / "modalities" / "__init__.py").is_file():
    __path__.append(str(_root))  # type: ignore[name-defined]

from .apps.api import OneEncoder, load  # noqa: E402
from .apps.index import VectorIndex, load_index  # noqa: E402
from .errors import OneEncoderError  # noqa: E402
from .features.backbones import freeze, load_weights  # noqa: E402
from .modality import Modality, ModalitySpec, create_modality, list_modalities, register_modality  # noqa: E402

__version__ = "0.1.0"
__all__ = ["OneEncoder", "load", "OneEncoderError", "Modality", "ModalitySpec", "create_modality",
           "list_modalities", "register_modality", "freeze", "load_weights", "VectorIndex", "load_index",
           "__version__"]
