"""The OpenAI-compatible server: :func:`create_app` over an already-built engine, run by ``nabla-lc serve``.

Needs the ``serve`` extra (``pip install 'nabla-lc[serve]'``: FastAPI and uvicorn).
"""

from .app import ServerSettings, create_app, serving

__all__ = ["ServerSettings", "create_app", "serving"]
