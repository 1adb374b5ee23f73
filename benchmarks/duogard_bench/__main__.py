"""``python -m duogard_bench [--quick] [--tiny]``: the whole suite, as ``duogard bench``.

``python -m duogard_bench --memory-worker SPEC`` is one memory worker (section 3), started by
:func:`duogard_bench.memory.run_workers` in a fresh process.
"""

import sys

from duogard_bench import main
from duogard_bench.memory import worker_main

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-worker":
        sys.exit(worker_main(sys.argv[2]))
    sys.exit(main(quick="--quick" in sys.argv, tiny="--tiny" in sys.argv))
