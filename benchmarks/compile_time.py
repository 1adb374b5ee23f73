"""Compile / first-step time of every configuration, per backend (no timing rounds).
``python benchmarks/compile_time.py [--quick]``"""

import sys

from _cli import run

if __name__ == "__main__":
    sys.exit(run(("compile",), __doc__))
