"""The flags every script here takes (the same as ``duogard bench``)."""

from __future__ import annotations

import argparse


def run(sections: tuple[str, ...], description: str) -> int:
    """Parse ``--quick``, ``--tiny`` and ``--json``, then run ``sections`` of the suite.

    Args:
        sections: the sections of :func:`duogard_bench.main` to run.
        description: the script's help text.

    Returns:
        The suite's exit code.
    """
    import duogard_bench

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a reduced set")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (a smoke test)")
    p.add_argument("--json", default=None, help="write every figure here")
    a = p.parse_args()
    return duogard_bench.main(quick=a.quick, tiny=a.tiny, json_path=a.json, sections=sections)
