"""oneencoder: progressive multi-modal alignment with cross-modal contrastive curriculum learning.

Example:
    >>> import oneencoder
    >>> m = oneencoder.load("outputs/demo/model")
    >>> m.similarity(m.encode("image", ["cat.png"]), m.encode("text", ["A cat."]))
"""

from pathlib import Path as _Path

# In a source checkout (cwd on sys.path), map modalities/, stages/ and cli/ under
# this package the way the installed package does, so both import the same names.
_root = _Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and (_root / "modalities" / "__init__.py").is_file():
    __path__.append(str(_root))  # type: ignore[name-defined]

from .api import OneEncoder, load  # noqa: E402
from .backbones import freeze, load_weights  # noqa: E402
from .errors import OneEncoderError  # noqa: E402
from .index import VectorIndex, load_index  # noqa: E402
from .modality import Modality, ModalitySpec, create_modality, list_modalities, register_modality  # noqa: E402

__version__ = "0.1.0"
__all__ = ["OneEncoder", "load", "OneEncoderError", "Modality", "ModalitySpec", "create_modality",
           "list_modalities", "register_modality", "freeze", "load_weights", "VectorIndex", "load_index",
           "__version__"]
