"""Step time of every backend x gradient method x model, duogard beside hand-written steps,
plus the tangent cost and first-step (compile) time. ``python benchmarks/step_time.py --quick``"""

import sys

from _cli import run

if __name__ == "__main__":
    sys.exit(run(("step", "draw"), __doc__))
