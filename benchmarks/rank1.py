"""Rank-1 tangents (``estimator("forward", tangents="rank1")``): the rank-1 steps beside backprop
and the dense-tangent steps of the same K and distribution, duogard beside hand-written rank-1
steps, at the full run's sizes and rounds; then the ways of drawing tangents (duogard's portable
generator against each framework's own; both backends needed).
``python benchmarks/rank1.py [--tiny] [--json FILE] [--backends torch] [--torch-threads 1]``"""

import argparse
import sys

if __name__ == "__main__":
    import duogard_bench

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tiny", action="store_true", help="tiny sizes (a smoke test)")
    p.add_argument("--json", default=None, help="write every figure here")
    p.add_argument("--backends", default="jax,torch", help="comma-separated: jax, torch (default both)")
    p.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads first")
    a = p.parse_args()
    if a.torch_threads:
        import torch

        torch.set_num_threads(a.torch_threads)
    sys.exit(
        duogard_bench.main(
            tiny=a.tiny,
            json_path=a.json,
            sections=("step", "draw"),
            rank1=True,
            backends=tuple(a.backends.split(",")),
        )
    )
