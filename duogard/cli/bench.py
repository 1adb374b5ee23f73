"""``duogard bench``: the benchmark suite (the ``duogard_bench`` package beside the library)."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]

HELP = "step time, tangent cost, memory and conversion benchmarks"


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``bench`` command to the subparsers ``sub``."""
    b = sub.add_parser(
        "bench", help=HELP, description="Benchmarks, side by side in one process (the duogard_bench package)."
    )
    b.add_argument("--quick", action="store_true", help="a reduced set, about a minute")
    b.add_argument("--json", default=None, help="write every figure here")
    b.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    return b


def run(args) -> int:
    """Run the suite; its exit code."""
    from duogard.cli._errors import UsageError
    from duogard.cli._outputs import check_output_file

    if args.json:
        check_output_file(args.json, "--json")
    try:
        import duogard_bench
    except ImportError as exc:  # pragma: no cover - shipped in the same distribution
        raise UsageError(
            "duogard bench needs the duogard_bench package, shipped with duogard's source "
            "distribution (benchmarks/): reinstall with pip install -e ."
        ) from exc
    return duogard_bench.main(quick=args.quick, json_path=args.json, tiny=args.tiny)
