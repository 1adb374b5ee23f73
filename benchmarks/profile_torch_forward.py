"""Where the time of duogard's torch step goes: torch.profiler (ops) and cProfile (Python).

    python benchmarks/profile_torch_forward.py --model mlp --method fwd-K1-normal --steps 20

Prints the ops with the most self CPU time, the Python functions with the most own time,
and, for comparison, the same profile of the hand-written torch.func step.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import numpy as np


def main() -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    import duogard_bench as bench

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    p.add_argument("--method", default="fwd-K1-normal", choices=tuple(bench.METHODS))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--top", type=int, default=15)
    a = p.parse_args()

    sz = bench.sizes_for()
    x, y = bench.data_for(sz)
    model, params, ops, layers_np = bench.workload(a.model, sz, x)
    runs = {
        "duogard": bench.duogard_step("torch", model, params, x, y, a.method)[0],
        "hand": bench.torch_hand(ops, layers_np, x, y, a.method, "hand")[0],
    }
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {a.model} {a.method}, "
        f"batch {sz.batch}"
    )
    for name, run in runs.items():
        for _ in range(3):
            run()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            run()
        per = (time.perf_counter() - t0) / a.steps
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(a.steps):
                run()
        print(f"\n=== {name}: {1e3 * per:.2f} ms/step; ops by self CPU time (per step = total / {a.steps})")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top))
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(a.steps):
            run()
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(a.top)
        print(f"=== {name}: Python functions by own time ({a.steps} steps)")
        print("\n".join(s.getvalue().splitlines()[: a.top + 12]))
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    raise SystemExit(main())
