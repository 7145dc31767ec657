"""``python -m service``: the same as ``anydoor serve``."""

import sys

from service.cli import serve_main

sys.exit(serve_main())
