"""The model-side subcommands of ``anydoor``: ``generate``, ``batch`` and ``weights``.

Each module exposes ``register(subparsers)``; the ``anydoor`` entry point (:mod:`service.cli`) adds them
explicitly, next to ``serve``. Nothing here imports the web stack.
"""

from model.cli import batch, generate, weights

__all__ = ["batch", "generate", "weights"]
