"""Write the docs' operator table: ``python -m duogard_torch.port.optable [docs/torch-ops.md]``.

The table lists every core ATen operator the torch.export lowering supports (and the fx
fallback's Python spellings); ``tests/test_aten_port.py`` fails when the file is out of date.
"""

from __future__ import annotations

import sys

from .aten import write_table


def main(argv: list[str] | None = None) -> int:
    """Write the table to ``argv[0]`` (default ``docs/torch-ops.md``); returns 0."""
    argv = sys.argv[1:] if argv is None else argv
    target = argv[0] if argv else "docs/torch-ops.md"
    print(f"wrote {write_table(target)}")
    return 0


if __name__ == "__main__":  # pragma: no cover - a docs helper
    raise SystemExit(main())
