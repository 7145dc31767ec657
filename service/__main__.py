"""``python -m service``: the same as ``anydoor serve``."""

import sys

from .cli import main

sys.exit(main())
