"""The LocalMixer's learning rates: backprop, LG-BP and the local forward gradients on 28x28 data.

Trains ``build_model("local-mixer", ...)`` (default sizes: 3 blocks of 64 channels in 8
groups, 4x4 patches, so 49 tokens on 28x28 images) with plain SGD, batch 64, for every method
and learning rate given, and prints one row per (method, lr): the test accuracy of each seed,
their mean and the training seconds. The data are MNIST IDX files (``--data-dir``), or by
default the digits upsampled to 28x28 (``duogard.data.write_digits_idx``, in a temporary
folder): what ``duogard.methods.LEARNING_RATES["local-mixer"]`` was chosen on.

    python benchmarks/local_mixer_sweep.py                         # the grid, 500 steps, seed 0
    python benchmarks/local_mixer_sweep.py --methods backprop --lrs 0.1,0.2 --steps 2500 \\
        --data-dir ~/data/mnist --seeds 0,1,2

``--json FILE`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np

import duogard as dg
from duogard import optim
from duogard.train import Evaluate, build_model

#: The learning-rate grid, by method name.
GRID = {
    "backprop": (0.05, 0.1, 0.2, 0.4),
    "local-backprop": (0.05, 0.1, 0.2, 0.4),
    "local-forward-activity": (0.02, 0.05, 0.1, 0.2),
    "local-forward": (0.005, 0.01, 0.02),
    "forward-guess": (0.05, 0.1, 0.2),
}


def run_one(method, lr, seed, args, data):
    hidden = tuple(int(h) for h in args.hidden.split(","))
    model = build_model("local-mixer", data.num_classes, hidden=hidden, groups=args.groups, patch=args.patch)
    params = model.init(seed, data.example_input)
    start = time.perf_counter()
    try:
        result = dg.fit(model, params, data, optimizer=optim.sgd(lr), estimator=dg.estimator(method),
                        backend=args.backend, steps=args.steps, batch_size=args.batch_size, seed=seed,
                        callbacks=[Evaluate(args.steps)])  # fmt: skip
    except dg.train.NonFiniteError:
        return float("nan"), time.perf_counter() - start  # diverged: the lr is too large
    return result.test_accuracy, time.perf_counter() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(GRID), help="comma-separated method names")
    p.add_argument("--lrs", default=None, help="comma-separated learning rates (default: each method's grid)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden", default="64,64,64")
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--backend", default="jax")
    p.add_argument("--data-dir", default=None, help="MNIST IDX files (default: the digits at 28x28)")
    p.add_argument("--dataset", default="mnist", help="mnist or fashion-mnist (with --data-dir)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        where = args.data_dir or dg.data.write_digits_idx(tmp)
        data = dg.data.load(args.dataset, data_dir=where)
    seeds = [int(s) for s in args.seeds.split(",")]
    sizes = f"{args.hidden} groups {args.groups} patch {args.patch}"
    print(f"local-mixer {sizes} on {data!r}, {args.steps} steps")
    print(f"{'method':<24} {'lr':>6}  {'accuracy per seed':<24} {'mean':>6} {'s':>6}")
    rows = []
    for method in args.methods.split(","):
        lrs = [float(v) for v in args.lrs.split(",")] if args.lrs else GRID[method]
        for lr in lrs:
            accs, secs = zip(*(run_one(method, lr, s, args, data) for s in seeds))
            row = {"method": method, "lr": lr, "seeds": seeds, "accuracy": list(accs),
                   "mean": float(np.mean(accs)), "seconds": float(np.median(secs))}  # fmt: skip
            rows.append(row)
            each = " ".join(f"{a:.4f}" for a in accs)
            print(f"{method:<24} {lr:>6g}  {each:<24} {row['mean']:>6.4f} {row['seconds']:>6.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
