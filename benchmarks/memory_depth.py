"""Peak memory against MLP depth, backprop vs forward gradients, one subprocess per
configuration. ``python benchmarks/memory_depth.py [--quick]``"""

import sys

from _cli import run

if __name__ == "__main__":
    sys.exit(run(("memory",), __doc__))
