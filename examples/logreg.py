"""Logistic regression on MNIST, Baydin et al. (2022), "Gradients without Backpropagation".

Reproduces their logistic-regression experiment: a linear classifier 784-10 with softmax
cross-entropy, trained by SGD with the exponential learning-rate decay ``lr * exp(-k * step)``,
the gradient coming either from backprop or from a forward gradient ``g = (∇f·v) v`` (one
JVP with a random tangent ``v``, no backward pass), on JAX or PyTorch.

Data: ``--dataset mnist`` reads the four standard IDX files (raw or .gz) from ``--data-dir``
(default ``$DUOGARD_DATA_DIR``, else ``./data``). The default ``--dataset auto`` uses MNIST
when those files are there and otherwise falls back to scikit-learn's built-in ``digits``
(8x8 images, 1797 of them: a 64-10 model), so the script runs offline. The defaults finish
in a few seconds on 2 CPU cores.

    python examples/logreg.py                                     # jax, backprop, digits
    python examples/logreg.py --backend torch --grad forward
    python examples/logreg.py --grad forward-exact                # the exact gradient, forward mode only
    python examples/logreg.py --dataset mnist --data-dir ~/data/mnist
"""

from __future__ import annotations

import argparse
import os
import sys

import duogard as dg
from duogard import optim
from duogard.train import build_model
from duogard.train import parse_method

#: SGD learning rates per gradient method when --lr and the method's own lr= are not given
#: (forward gradients are noisier and need smaller steps; tuned on digits, seed 0)
LEARNING_RATES = {"backprop": 0.5, "forward-exact": 0.5, "forward": 0.03, "forward-activity": 0.4}


def load_data(args):
    """``--dataset auto``: MNIST when its IDX files are in --data-dir, else digits (offline)."""
    if args.dataset != "auto":
        return dg.data.load(args.dataset, seed=args.seed, data_dir=args.data_dir)
    try:
        return dg.data.load("mnist", seed=args.seed, data_dir=args.data_dir)
    except FileNotFoundError:
        where = args.data_dir or os.environ.get("DUOGARD_DATA_DIR", "./data")
        print(f"(no MNIST IDX files in {where}: using the built-in digits dataset; "
              f"pass --dataset mnist --data-dir DIR for MNIST)")
        return dg.data.load("digits", seed=args.seed)


def main(argv=None) -> int:
    """Parse the command line, train, print the results; return the exit code."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default=None, choices=("jax", "torch"),
                   help="default: $DUOGARD_BACKEND, else jax")
    p.add_argument("--grad", default="backprop",
                   help="backprop, forward, forward-exact or forward-activity, with options as "
                        "name:key=value,... (e.g. forward:num_tangents=4,lr=0.02)")
    p.add_argument("--dataset", default="auto", choices=("auto", "digits", "mnist", "fashion-mnist"),
                   help="auto (default): mnist if its IDX files are in --data-dir, else digits")
    p.add_argument("--data-dir", default=None, help="directory with the MNIST IDX files")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help="initial learning rate (default: per method)")
    p.add_argument("--decay", type=float, default=1e-4, help="k in lr * exp(-k * step) (paper: 1e-4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        method = parse_method(args.grad)
    except (ValueError, TypeError) as exc:
        p.error(str(exc))
    for flag in ("steps", "batch_size", "lr"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            p.error(f"--{flag.replace('_', '-')} must be > 0, got {value}")
    if args.decay < 0:
        p.error(f"--decay must be >= 0, got {args.decay}")

    try:
        data = load_data(args)
    except FileNotFoundError as exc:
        sys.exit(f"logreg.py: {exc}")
    model = build_model("logreg", data.num_classes)
    params = model.init(args.seed, data.example_input)  # NumPy: the same weights on both backends
    lr = args.lr if args.lr is not None else method.learning_rate(LEARNING_RATES.get(method.name))
    print(f"logistic regression {data.x_train[0].size}-{data.num_classes} "
          f"({dg.tree.tree_size(params):,} parameters) on {data.name}: "
          f"{data.num_train} train / {data.num_test} test, {method.label}, SGD lr {lr:g} "
          f"decay {args.decay:g}, {args.steps} steps of {args.batch_size}")

    try:
        result = dg.fit(model, params, data, estimator=method.build(),
                        optimizer=optim.sgd(optim.exponential_decay(lr, rate=args.decay)),
                        backend=args.backend, steps=args.steps, batch_size=args.batch_size,
                        seed=args.seed, progress=False if args.quiet else None)
    except dg.train.NonFiniteError as exc:
        sys.exit(f"logreg.py: {exc}")
    for ev in result.evals:
        print(f"  step {ev['step']:>6}  test loss {ev['test_loss']:.4f}  "
              f"test accuracy {ev['test_accuracy']:.4f}  {ev['time']:6.1f} s")
    s = result.summary()
    print(f"{s['backend']} {method.label}: final loss {s['final_loss']:.4f}, "
          f"test accuracy {s['test_accuracy']:.4f}, {1e3 * s['time_per_step']:.2f} ms/step "
          f"(first step {s['first_step_seconds']:.2f} s), total {s['total_seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
