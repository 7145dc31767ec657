"""The model-side subcommands of ``anydoor``: ``generate`` and ``weights`` (``batch`` and ``merge`` are in the top
layer, :mod:`anydoor_batch`).

Each module exposes ``register(subparsers)``; the ``anydoor`` entry point (:mod:`service.cli`) adds them
explicitly, next to ``serve``. Nothing here imports the web stack.
"""

from model.cli import generate, weights

__all__ = ["generate", "weights"]
