"""``oneencoder serve``: a retrieval explorer in the browser (see :mod:`oneencoder.apps.serve.app`)."""

from .app import Explorer, bind, create_app, run, server

__all__ = ["Explorer", "bind", "create_app", "run", "server"]
