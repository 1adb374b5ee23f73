"""The ``duogard`` command: ``train``, ``compare``, ``bench``, ``parity``.

Exit codes: 0 success, 1 a run failed (e.g. non-finite loss), 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from duogard.train._compare import DEFAULT_METHODS

__all__ = ["main", "build_parser"]


def _add_common(p: argparse.ArgumentParser, *, many_backends: bool = False) -> None:
    if many_backends:
        p.add_argument("--backends", default=None,
                       help="comma-separated backends (default: every installed one)")
    else:
        p.add_argument("--backend", default=None, choices=None,
                       help="jax or torch (default: $DUOGARD_BACKEND, else jax if installed)")
    p.add_argument("--dataset", default="digits", help="digits (built in), mnist, fashion-mnist, synthetic")
    p.add_argument("--data-dir", default=None, help="directory with the MNIST/Fashion-MNIST IDX files")
    p.add_argument("--model", default="mlp", choices=("logreg", "mlp", "cnn"))
    p.add_argument("--hidden", default="128", help="MLP hidden sizes, comma-separated (default 128)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decay", type=float, default=0.0,
                   help="exponential learning-rate decay k: lr0*exp(-k*step) (default 0: constant)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duogard",
        description="Forward gradients vs backprop, on JAX and PyTorch at once.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train one model with one backend and gradient method",
                       description="Train one model with one backend and one gradient method.")
    _add_common(t)
    t.add_argument("--grad", default="backprop",
                   help="gradient method: backprop, forward, forward-exact, forward-activity; "
                        "options as name:key=value,... e.g. forward:num_tangents=4,distribution=rademacher")
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--lr", type=float, default=None, help="learning rate (default: per method)")
    t.add_argument("--optimizer", default="sgd", choices=("sgd", "momentum", "adam", "adamw"))
    t.add_argument("--eval-every", type=int, default=None)
    t.add_argument("--diagnostics-every", type=int, default=0,
                   help="every N steps, record the cosine of the estimate to the true gradient")
    t.add_argument("--log", default=None, help="per-step log, .csv or .jsonl")
    t.add_argument("--checkpoint", default=None, help="checkpoint directory (written at the end)")
    t.add_argument("--checkpoint-every", type=int, default=None)
    t.add_argument("--resume", default=None, help="checkpoint directory to resume from")
    t.add_argument("--on-nan", default="raise", choices=("raise", "skip"))
    t.add_argument("--compile", action="store_true", help="torch: use torch.compile (JAX always jits)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--json", default=None, help="write the run summary as JSON here")

    c = sub.add_parser("compare", help="THE MAIN JOB: every backend x gradient method, a table and a plot",
                       description="Run every backend x gradient method with the same data, weights, "
                                   "steps and batches; print a table and write a PNG plot and a JSON result.")
    _add_common(c, many_backends=True)
    c.add_argument("--methods", default=None,
                   help="semicolon-separated methods, name[:key=value,...] (lr=... sets the method's "
                        "learning rate); default: " + "; ".join(DEFAULT_METHODS))
    c.add_argument("--steps", type=int, default=2500)
    c.add_argument("--lr", type=float, default=None, help="one learning rate for all (default: per method)")
    c.add_argument("--diagnostics-every", type=int, default=25)
    c.add_argument("--out", default="duogard-out", help="output directory (compare.json, compare.png)")
    c.add_argument("--quiet", action="store_true")

    b = sub.add_parser("bench", help="step time, tangent cost, memory and conversion benchmarks",
                       description="Benchmarks, side by side in one process (see benchmarks/).")
    b.add_argument("--quick", action="store_true", help="a reduced set, under a minute")
    b.add_argument("--json", default=None, help="write every figure here")
    b.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)

    p = sub.add_parser("parity", help="run two backends in lockstep and report divergence",
                       description="Run the same model, weights, batches and tangents on both backends.")
    _add_common(p, many_backends=True)
    p.add_argument("--grad", default="forward")
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--tol", type=float, default=None, help="relative divergence tolerance")
    p.add_argument("--every", type=int, default=10, help="print every N steps")
    return parser


def _hidden(text: str) -> tuple[int, ...]:
    # ValueError: main() reports it as a usage error (exit 2)
    try:
        sizes = tuple(int(h) for h in text.split(",") if h.strip())
    except ValueError:
        raise ValueError(f"--hidden must be comma-separated ints, got {text!r}") from None
    if not sizes or min(sizes) <= 0:
        raise ValueError(f"--hidden must be positive ints, got {text!r}")
    return sizes


def _optimizer_from_args(args, spec):
    """The optimizer a command asked for: ``--optimizer``, ``--lr`` (default: the method's own
    SGD rate, a tenth of it for Adam), ``--decay``."""
    lr = args.lr if args.lr is not None else spec.learning_rate() * (0.1 if args.optimizer.startswith("adam") else 1)
    return _optimizer(args.optimizer, lr, getattr(args, "decay", 0.0)), lr


def _optimizer(name: str, lr, decay: float):
    from duogard import optim

    schedule = optim.exponential_decay(lr, rate=decay) if decay else lr
    if name == "sgd":
        return optim.sgd(schedule)
    if name == "momentum":
        return optim.sgd(schedule, momentum=0.9)
    if name == "adam":
        return optim.adam(schedule)
    return optim.adamw(schedule)


def _cmd_train(args) -> int:
    import duogard as dg
    from duogard.train import build_model, fit
    from duogard.train._compare import parse_method

    spec = parse_method(args.grad)
    ds = dg.data.load(args.dataset, seed=args.seed, data_dir=args.data_dir)
    model = build_model(args.model, ds.num_classes, hidden=_hidden(args.hidden))
    params = model.init(args.seed, ds.example_input)
    optimizer, _ = _optimizer_from_args(args, spec)
    res = fit(model, params, ds, estimator=spec.build(), optimizer=optimizer,
              backend=args.backend, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
              eval_every=args.eval_every, diagnostics_every=args.diagnostics_every, log=args.log,
              progress=False if args.quiet else None, compile=args.compile or None, on_nan=args.on_nan,
              checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every, resume=args.resume)
    s = res.summary()
    print(f"{s['backend']} {spec.label} {args.model} on {args.dataset}: {s['steps']} steps, "
          f"final loss {s['final_loss']:.4f}, test accuracy {s['test_accuracy']:.4f}, "
          f"{1e3 * s['time_per_step']:.2f} ms/step (first step {s['first_step_seconds']:.2f} s), "
          f"total {s['total_seconds']:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(s | {"method": spec.label}, f, indent=1)
    return 0


def _cmd_compare(args) -> int:
    from duogard.train._compare import DEFAULT_METHODS, compare, format_table

    methods = [m for m in args.methods.split(";") if m.strip()] if args.methods else list(DEFAULT_METHODS)
    backends = [b.strip() for b in args.backends.split(",")] if args.backends else None
    print(f"duogard compare: {args.model} on {args.dataset}, {args.steps} steps, batch {args.batch_size}, "
          f"seed {args.seed}")
    result = compare(dataset=args.dataset, model=args.model, backends=backends, methods=methods,
                     steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, decay=args.decay,
                     seed=args.seed, hidden=_hidden(args.hidden), data_dir=args.data_dir,
                     diagnostics_every=args.diagnostics_every, out_dir=args.out,
                     progress=False if args.quiet else None)
    print()
    print(format_table(result["runs"]))
    for f in result.get("files", []):
        print(f"wrote {f}")
    return 0


def _cmd_bench(args) -> int:
    from duogard import bench

    return bench.main(quick=args.quick, json_path=args.json, tiny=args.tiny)


def _cmd_parity(args) -> int:
    from duogard import parity

    return parity.cli(args)


_COMMANDS = {"train": _cmd_train, "compare": _cmd_compare, "bench": _cmd_bench, "parity": _cmd_parity}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _COMMANDS[args.command](args)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        # bad names, options, shapes or missing files: a usage error, said plainly
        print(f"duogard {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"duogard {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
