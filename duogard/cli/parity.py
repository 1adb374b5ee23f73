"""``duogard parity``: two backends in lockstep (same weights, batches and tangents), and where they
diverge.
"""

from __future__ import annotations

import argparse

from duogard.cli._errors import UsageError
from duogard.cli._options import (
    add_data_options,
    build_model_from_args,
    build_optimizer,
    check_common,
    check_every,
    load_data,
    parse_backends,
    resolve_backend,
)
from duogard.methods import parse_method

__all__ = ["add_parser", "run"]

HELP = "run two backends in lockstep and report divergence"


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``parity`` command to the subparsers ``sub``."""
    p = sub.add_parser(
        "parity", help=HELP, description="Run the same model, weights, batches and tangents on two backends."
    )
    add_data_options(p, many_backends=True)
    p.add_argument("--grad", default="forward")
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
    p.add_argument("--lr", type=float, default=None)
    p.add_argument(
        "--decay",
        type=float,
        default=0.0,
        help="exponential learning-rate decay k: lr0*exp(-k*step) (default 0: constant)",
    )
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--tol", type=float, default=None, help="relative divergence tolerance")
    p.add_argument("--every", type=int, default=10, help="print every N steps")
    return p


def run(args) -> int:
    """Print the lockstep table; exit 1 when the backends diverge."""
    from duogard.backend import DEFAULT_PAIR
    from duogard.parity import compare_backends

    check_common(args)
    backends = tuple(parse_backends(args.backends) or DEFAULT_PAIR)
    if len(backends) != 2:
        raise UsageError(f"--backends must name two backends, got {args.backends!r}")
    check_every("--every", args.every)
    if args.tol is not None and not args.tol > 0:
        raise UsageError(f"--tol must be a positive number, got {args.tol}")
    bes = [resolve_backend(name, "--backends") for name in backends]
    if args.dtype == "float64":
        for be in bes:
            be.enable_float64()
    spec = parse_method(args.grad)
    data = load_data(args)
    model, title = build_model_from_args(args, data)
    opt, lr = build_optimizer(args, spec)
    print(
        f"duogard parity: {title} on {data.name}, {spec.label}, {args.optimizer}(lr={lr}), "
        f"{args.steps} steps, {args.dtype}, {backends[0]} vs {backends[1]} (shared tangents)"
    )
    report = compare_backends(
        model,
        "cross_entropy",
        opt,
        spec.estimator,
        data,
        steps=args.steps,
        backends=backends,
        seed=args.seed,
        batch_size=args.batch_size,
        dtype=args.dtype,
        tol=args.tol,
    )
    print(report.table(every=args.every))
    return 0 if report.first_divergence is None else 1
