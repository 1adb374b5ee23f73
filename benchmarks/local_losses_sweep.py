"""Local losses on digits: the accuracy of backprop-free methods against backprop.

Trains, with ``duogard compare``'s data settings (digits, 2500 steps, batch 64, plain SGD),
the ``local-mlp`` model (Flatten, then blocks of LayerNorm without affine, Linear(h), ReLU,
each block's h units in G groups with a linear head each; then LayerNorm and Linear(10)) with
end-to-end backprop, local greedy backprop (LG-BP), activity-perturbed local forward
gradients (LG-FG-A), weight-perturbed ones (LG-FG-W) and guessed tangents, for every
learning rate and seed given, on every backend given, and prints one row per (backend,
method, lr): the test accuracy of each seed, their mean, and the median ms per step.

    python benchmarks/local_losses_sweep.py                         # the chosen rows, 3 seeds
    python benchmarks/local_losses_sweep.py --sweep                 # every method x lr grid
    python benchmarks/local_losses_sweep.py --methods local-forward-activity --lrs 0.05,0.1 \\
        --hidden 256,256,256 --groups 32 --backends jax --seeds 0

``--json FILE`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import duogard as dg
from duogard import optim
from duogard.methods import parse_method
from duogard.train import build_model

#: The rows reported, as ``duogard compare --methods`` writes them (``lr=``: the best SGD
#: learning rate on the default model, found with ``--sweep`` over seeds 0-2 on JAX).
CHOSEN = (
    "backprop:lr=0.15",
    "local-backprop:lr=0.2",
    "local-forward-activity:distribution=rademacher,lr=0.1",
    "local-forward:distribution=rademacher,lr=0.01",
    "forward-guess:lr=0.1",
)
#: The learning-rate grid of ``--sweep``, by method name.
GRID = {
    "backprop": (0.05, 0.1, 0.15, 0.2, 0.4),
    "local-backprop": (0.05, 0.1, 0.2, 0.4),
    "local-forward-activity": (0.03, 0.05, 0.1, 0.15),
    "local-forward": (0.003, 0.01, 0.03),
    "forward-guess": (0.1, 0.2, 0.4),
}


def run_one(backend, spec, lr, seed, *, hidden, groups, head_norm, steps, batch_size, data):
    model = build_model("local-mlp", data.num_classes, hidden=hidden, groups=groups, head_norm=head_norm)
    params = model.init(seed, data.example_input)
    try:
        result = _fit(model, params, data, spec.estimator, lr, backend, steps, batch_size, seed)
    except dg.train.NonFiniteError:
        return float("nan"), float("nan"), float("nan")  # diverged: the lr is too large
    summary = result.summary()
    return summary["test_accuracy"], summary["time_per_step"], summary["total_seconds"]


def _fit(model, params, data, estimator, lr, backend, steps, batch_size, seed):
    return dg.fit(
        model,
        params,
        data,
        estimator=estimator,
        optimizer=optim.sgd(lr),
        backend=backend,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        callbacks=[dg.train.Evaluate()],
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="jax,torch")
    p.add_argument(
        "--methods", default=None, help="semicolon-separated, name[:option=value,...] (default: CHOSEN)"
    )
    p.add_argument("--lrs", default=None, help="comma-separated learning rates (default: the chosen one)")
    p.add_argument("--sweep", action="store_true", help="every method over its learning-rate grid")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--hidden", default="256,256,256")
    p.add_argument("--groups", type=int, default=8)
    p.add_argument(
        "--head-norm",
        default=True,
        action=argparse.BooleanOptionalAction,
        help="the heads read their group normalised (default: on)",
    )
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    methods = [
        parse_method(m, flag="--methods") for m in (args.methods.split(";") if args.methods else CHOSEN)
    ]
    seeds = [int(s) for s in args.seeds.split(",")]
    hidden = tuple(int(h) for h in args.hidden.split(","))
    print(
        f"local-mlp {'-'.join(map(str, (64, *hidden, 10)))}, {args.groups} groups"
        f"{' (normalised)' if args.head_norm else ''}, LayerNorm; digits, "
        f"{args.steps} steps, batch {args.batch_size}, SGD; seeds {seeds}"
    )
    data = dg.data.load("digits", seed=0)
    rows = []
    head = f"{'backend':<6} {'method':<44} {'lr':>6}  " + "  ".join(f"seed{s:<2}" for s in seeds)
    print(head + "    mean  ms/step  s/run")
    for backend in backends:
        for spec in methods:
            if args.lrs:
                lrs = [float(v) for v in args.lrs.split(",")]
            else:
                lrs = list(GRID[spec.name]) if args.sweep else [spec.learning_rate("local-mlp")]
            for lr in lrs:
                accs, times, totals = [], [], []
                for seed in seeds:
                    acc, per_step, total = run_one(
                        backend,
                        spec,
                        lr,
                        seed,
                        hidden=hidden,
                        groups=args.groups,
                        head_norm=args.head_norm,
                        steps=args.steps,
                        batch_size=args.batch_size,
                        data=data,
                    )
                    accs.append(acc)
                    times.append(per_step)
                    totals.append(total)
                row = {
                    "backend": backend,
                    "method": spec.label,
                    "lr": lr,
                    "seeds": seeds,
                    "accuracy": accs,
                    "mean": float(np.mean(accs)),  # NaN when a seed diverged
                    "ms_per_step": 1e3 * float(np.median(times)),
                    "seconds_per_run": float(np.median(totals)),
                }
                rows.append(row)
                print(
                    f"{backend:<6} {spec.label:<44} {lr:>6g}  "
                    + "  ".join(f"{a:.4f}" for a in accs)
                    + f"  {row['mean']:.4f}  {row['ms_per_step']:7.2f}  {row['seconds_per_run']:5.1f}",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"time": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args), "rows": rows}, f, indent=1
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
