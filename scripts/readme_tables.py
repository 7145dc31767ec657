"""Regenerate the README's generated tables in place (parameters, limits, errors, settings), or check them.

    python scripts/readme_tables.py          # rewrite README.md
    python scripts/readme_tables.py --check  # exit 1 if any table is stale (tests/test_contract.py checks too)

Each table is found by its header row and replaced up to the first line that is not a table row.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def tables() -> list[str]:
    from model.pipeline.params import params_table
    from service.errors import error_table
    from service.settings import limits_table, settings_table

    return [params_table(), limits_table(), error_table(), settings_table()]


def regenerate(text: str) -> str:
    lines = text.splitlines(keepends=True)
    for table in tables():
        header = table.splitlines(keepends=True)[0]
        start = lines.index(header)
        end = start
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        lines[start:end] = table.splitlines(keepends=True)
    return "".join(lines)


def main(argv: list[str]) -> int:
    readme = REPO / "README.md"
    text = readme.read_text(encoding="utf-8")
    new = regenerate(text)
    if "--check" in argv:
        if new != text:
            print("README.md's generated tables are stale: run python scripts/readme_tables.py", file=sys.stderr)
            return 1
        return 0
    readme.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
