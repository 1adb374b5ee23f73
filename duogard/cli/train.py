"""``duogard train``: one model, one backend, one gradient method.

:func:`main` is also the training function of the example scripts (``examples/``): each one
calls it with its own defaults (model, steps, learning-rate decay, dataset ``auto``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from duogard.cli._methods import parse_method
from duogard.cli._options import (
    add_data_options,
    add_optimizer_options,
    build_model_from_args,
    build_optimizer,
    check_common,
    load_data,
)

__all__ = ["add_parser", "add_arguments", "run", "main"]

HELP = "train one model with one backend and gradient method"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every flag of ``duogard train``."""
    add_data_options(p)
    p.add_argument(
        "--grad",
        default="backprop",
        help="gradient method: backprop, forward, forward-exact, forward-activity; options as "
        "name:key=value,... e.g. forward:num_tangents=4,distribution=rademacher (lr=... sets "
        "the method's learning rate)",
    )
    p.add_argument("--steps", type=int, default=1000)
    add_optimizer_options(p)
    p.add_argument(
        "--eval-every", type=int, default=None, help="evaluate every N steps (default: a tenth of the run)"
    )
    p.add_argument(
        "--diagnostics-every",
        type=int,
        default=0,
        help="every N steps, record the cosine of the estimate to the true gradient (0: never)",
    )
    p.add_argument("--log", default=None, help="per-step log, .csv or .jsonl")
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (written at the end)")
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--resume", default=None, help="checkpoint directory to resume from")
    p.add_argument("--on-nan", default="raise", choices=("raise", "skip"))
    p.add_argument("--compile", action="store_true", help="torch: use torch.compile (JAX always jits)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", default=None, help="write the run summary as JSON here")


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``train`` command to the subparsers ``sub``."""
    p = sub.add_parser(
        "train", help=HELP, description="Train one model with one backend and one gradient method."
    )
    add_arguments(p)
    return p


def _callbacks(args) -> list:
    from duogard.train import Checkpointer, Diagnostics, Evaluate, LogFile, OnNonFinite, Progress

    for flag in ("eval_every", "checkpoint_every"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive int, got {value}")
    if args.diagnostics_every < 0:
        raise ValueError(f"--diagnostics-every must be >= 0, got {args.diagnostics_every}")
    cbs = [Evaluate(args.eval_every), OnNonFinite(args.on_nan), Progress(False if args.quiet else None)]
    if args.diagnostics_every:
        cbs.append(Diagnostics(args.diagnostics_every))
    if args.log:
        cbs.append(LogFile(args.log))
    if args.checkpoint_every and args.checkpoint is None:
        raise ValueError("--checkpoint-every needs --checkpoint DIR")
    if args.checkpoint or args.resume:
        cbs.append(Checkpointer(args.checkpoint, every=args.checkpoint_every, resume=args.resume))
    return cbs


def run(args) -> int:
    """Train as ``args`` say; print the setup, the evaluations and the summary."""
    import duogard as dg
    from duogard.tree import tree_size

    check_common(args)
    spec = parse_method(args.grad)
    cbs = _callbacks(args)
    data = load_data(args)
    model, title = build_model_from_args(args, data)
    params = model.init(args.seed, data.example_input)  # NumPy: the same weights on both backends
    optimizer, lr = build_optimizer(args, spec)
    trainer = dg.train.Trainer(
        model,
        optimizer=optimizer,
        estimator=spec.estimator,
        backend=args.backend,
        compile=args.compile or None,
    )
    print(
        f"{title} ({tree_size(params):,} parameters) on {data.name}: {data.num_train} train / "
        f"{data.num_test} test, {trainer.be.name}, {spec.label}, {args.optimizer} lr {lr:g} "
        f"decay {args.decay:g} ({trainer.update_strategy} update), {args.steps} steps of {args.batch_size}"
    )
    result = dg.fit(
        model,
        params,
        data,
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        callbacks=cbs,
        trainer=trainer,
    )
    for ev in result.evals:
        print(
            f"  step {ev['step']:>6}  test loss {ev['test_loss']:.4f}  "
            f"test accuracy {ev['test_accuracy']:.4f}  {ev['time']:6.1f} s"
        )
    s = result.summary()
    print(
        f"{s['backend']} {spec.label}: final loss {s['final_loss']:.4f}, test accuracy "
        f"{s['test_accuracy']:.4f}, {1e3 * s['time_per_step']:.2f} ms/step (first step "
        f"{s['first_step_seconds']:.2f} s), total {s['total_seconds']:.1f} s"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(s | {"method": spec.label, "model": args.model, "dataset": data.name}, f, indent=1)
    return 0


def main(
    argv: Sequence[str] | None = None,
    *,
    prog: str | None = None,
    description: str | None = None,
    defaults: dict | None = None,
) -> int:
    """``duogard train`` as a script of its own (what the example scripts call).

    Args:
        argv: the command line (None: ``sys.argv[1:]``).
        prog: the program name in usage lines.
        description: the help text's description (an example's docstring).
        defaults: flag defaults to change, by destination name (``{"model": "cnn", "steps": 500}``).

    Returns:
        The exit code (usage errors exit 2 through argparse, or return 2).
    """
    from duogard.cli import report_errors

    p = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(p)
    if defaults:
        p.set_defaults(**defaults)
    args = p.parse_args(argv)
    return report_errors(prog or "train", run, args)
