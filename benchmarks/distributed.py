"""Data-parallel forward gradients against backprop: what goes on the wire, and the step time.

The section ``duogard bench`` runs as its sixth (``duogard_bench.distributed``), alone:

``python benchmarks/distributed.py [--procs 1,2,4] [--backends torch,jax] [--steps 30] [--small]
[--json FILE]``  (``--small``: narrow models, for a shared machine)
"""

from __future__ import annotations

import sys

from duogard_bench.distributed import main

if __name__ == "__main__":
    sys.exit(main())
