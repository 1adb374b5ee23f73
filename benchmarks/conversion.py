"""DLPack conversion time against array size, both directions, duogard.convert and bare
calls. ``python benchmarks/conversion.py [--quick]``"""

import sys

from _cli import run

if __name__ == "__main__":
    sys.exit(run(("conversion",), __doc__))
