"""What logreg.py, mnist_mlp.py and mnist_cnn.py share (not an example itself).

Each of those scripts names its model, its defaults and its docstring, and hands the rest to
:func:`run`: the command line (``--backend``, ``--grad``, ``--dataset``, ``--steps``, ``--lr``,
...), the dataset (``--dataset auto``: MNIST when its IDX files are there, else the built-in
``digits``), training with SGD and the paper's exponential learning-rate decay, and the printed
results.
"""

from __future__ import annotations

import argparse
import os
import sys

import duogard as dg
from duogard import optim
from duogard.train import parse_method


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


def parse_args(argv, *, doc, steps, add_arguments=None):
    """The command line: ``(args, method)``; usage errors exit with code 2.

    ``doc`` is the script's docstring (its first line describes it), ``steps`` the default of
    ``--steps``, ``add_arguments(parser)`` adds the script's own options (after ``--data-dir``).
    """
    p = argparse.ArgumentParser(description=doc.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default=None, choices=("jax", "torch"),
                   help="default: $DUOGARD_BACKEND, else jax")
    p.add_argument("--grad", default="backprop",
                   help="backprop, forward, forward-exact or forward-activity, with options as "
                        "name:key=value,... (e.g. forward:num_tangents=4,lr=0.02)")
    p.add_argument("--dataset", default="auto", choices=("auto", "digits", "mnist", "fashion-mnist"),
                   help="auto (default): mnist if its IDX files are in --data-dir, else digits")
    p.add_argument("--data-dir", default=None, help="directory with the MNIST IDX files")
    if add_arguments is not None:
        add_arguments(p)
    p.add_argument("--steps", type=int, default=steps)
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
    return args, method


def run(argv, *, doc, script, steps, learning_rates, make_model, add_arguments=None) -> int:
    """Parse the command line, train, print the results; return the exit code.

    ``make_model(args, data)`` returns ``(model, title)``, the title heading the printed setup
    (e.g. ``"MLP 64-128-10"``); ``learning_rates`` maps a gradient method's name to its SGD
    learning rate when neither ``--lr`` nor the method's own ``lr=`` is given; ``script`` (the
    file name) prefixes fatal errors. ``doc``, ``steps`` and ``add_arguments``: :func:`parse_args`.
    """
    args, method = parse_args(argv, doc=doc, steps=steps, add_arguments=add_arguments)
    try:
        data = load_data(args)
    except FileNotFoundError as exc:
        sys.exit(f"{script}: {exc}")
    model, title = make_model(args, data)
    params = model.init(args.seed, data.example_input)  # NumPy: the same weights on both backends
    lr = args.lr if args.lr is not None else method.learning_rate(learning_rates.get(method.name))
    print(f"{title} ({dg.tree.tree_size(params):,} parameters) on {data.name}: "
          f"{data.num_train} train / {data.num_test} test, {method.label}, SGD lr {lr:g} "
          f"decay {args.decay:g}, {args.steps} steps of {args.batch_size}")

    try:
        result = dg.fit(model, params, data, estimator=method.build(),
                        optimizer=optim.sgd(optim.exponential_decay(lr, rate=args.decay)),
                        backend=args.backend, steps=args.steps, batch_size=args.batch_size,
                        seed=args.seed, progress=False if args.quiet else None)
    except dg.train.NonFiniteError as exc:
        sys.exit(f"{script}: {exc}")
    for ev in result.evals:
        print(f"  step {ev['step']:>6}  test loss {ev['test_loss']:.4f}  "
              f"test accuracy {ev['test_accuracy']:.4f}  {ev['time']:6.1f} s")
    s = result.summary()
    print(f"{s['backend']} {method.label}: final loss {s['final_loss']:.4f}, "
          f"test accuracy {s['test_accuracy']:.4f}, {1e3 * s['time_per_step']:.2f} ms/step "
          f"(first step {s['first_step_seconds']:.2f} s), total {s['total_seconds']:.1f} s")
    return 0
