"""``duogard compare``, the main job: every backend x gradient method with the same data, initial
weights, steps and batches; a table, a plot of loss against steps and wall-clock, the Pareto view
(accuracy against step memory and training time) and a JSON file. ``--sweep depth=2,4,8`` (or
``batch=64,256``) reruns it per value and plots step memory against the swept value.

This module is the command's front (its flags, the output checks, Ctrl-C); the job itself is the
library's :func:`duogard.comparison.compare_methods`. ``compare``, ``write_outputs``,
``format_table`` and ``plot_runs`` here are the old names of :mod:`duogard.comparison`'s
(deprecated: they warn and go in the next release).
"""

from __future__ import annotations

import argparse
import copy
import os

from duogard import comparison
from duogard._deprecated import moved
from duogard.cli._errors import RunInterruptedError, UsageError
from duogard.cli._options import (
    add_data_options,
    add_distributed_options,
    build_model_from_args,
    check_common,
    check_every,
    data_parallel,
    load_data,
    model_sizes,
    parse_backends,
    parse_hidden,
    resolve_backend,
    run_in_group,
)
from duogard.cli._outputs import check_output_dir, output_error
from duogard.methods import DEFAULT_METHODS, parse_methods

__all__ = ["add_parser", "run"]

HELP = "THE MAIN JOB: every backend x gradient method, a table and a plot"


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``compare`` command to the subparsers ``sub``."""
    c = sub.add_parser(
        "compare",
        help=HELP,
        description="Run every backend x gradient method with the same data, weights, steps and "
        "batches; print a table and write a PNG plot and a JSON result.",
    )
    add_data_options(c, many_backends=True)
    c.add_argument(
        "--methods",
        default=None,
        help="semicolon-separated methods, name[:key=value,...] (lr=... sets the method's learning "
        "rate); default: " + "; ".join(DEFAULT_METHODS),
    )
    c.add_argument("--steps", type=int, default=2500)
    c.add_argument("--lr", type=float, default=None, help="one learning rate for all (default: per method)")
    c.add_argument(
        "--decay",
        type=float,
        default=0.0,
        help="exponential learning-rate decay k: lr0*exp(-k*step) (default 0: constant)",
    )
    c.add_argument("--diagnostics-every", type=int, default=25)
    c.add_argument(
        "--target-accuracy",
        default="0.9",
        help="report each run's steps and training seconds until its test accuracy first reaches "
        "this (default 0.9; none: no target)",
    )
    c.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="steps between test evaluations, the resolution of the time to target "
        "(default: a hundredth of --steps)",
    )
    c.add_argument(
        "--sweep",
        default=None,
        metavar="depth=2,4,8|batch=64,256",
        help="rerun the comparison for each depth (hidden layers of --hidden's width; mlp, "
        "local-mlp) or batch size, and plot step memory against it (compare-sweep.json, .png)",
    )
    c.add_argument(
        "--out",
        default="duogard-out",
        help="output directory (compare.json, compare.png, compare-pareto.png; with --sweep "
        "compare-sweep.json, compare-sweep.png)",
    )
    c.add_argument("--quiet", action="store_true")
    add_distributed_options(c)
    return c


def run(args) -> int:
    """Run the comparison ``args`` describe and print its table.

    Ctrl-C ends the current run after its step and skips the rest: the table and files then
    hold the runs so far (the last one cut short), and the exit code is 130.
    """
    return run_in_group(_run, args)


def _run(args) -> int:
    from duogard.cli._interrupt import InterruptGuard

    check_common(args)
    specs = parse_methods(args.methods)
    backends = parse_backends(args.backends)
    for name in backends or ():
        resolve_backend(name, "--backends")
    check_every("--diagnostics-every", args.diagnostics_every, zero=True)
    check_every("--eval-every", args.eval_every)
    target = _parse_target(args.target_accuracy)
    sweep = _parse_sweep(args.sweep)
    if sweep is not None and sweep[0] == "depth":
        _check_depth_flags(args)
    dist = data_parallel(args)
    # under torchrun every rank runs every fit; rank 0 alone prints and writes
    rank0 = dist is None or os.environ.get("RANK", "0") == "0"
    say = print if rank0 else (lambda *a, **k: None)
    if args.out and rank0:
        check_output_dir(args.out, "--out")
    say(
        f"duogard compare: {args.model} on {args.dataset}, {args.steps} steps, batch {args.batch_size}, "
        f"seed {args.seed}" + (f", data-parallel over {os.environ.get('WORLD_SIZE')} ranks" if dist else "")
    )
    data = load_data(args, say=say)
    model, title = build_model_from_args(args, data)
    common = dict(
        backends=backends,
        methods=specs,
        steps=args.steps,
        learning_rate=args.lr,
        decay=args.decay,
        seed=args.seed,
        model_name=args.model,
        diagnostics_every=args.diagnostics_every,
        target_accuracy=target,
        eval_every=args.eval_every,
        progress=False if args.quiet or not rank0 else None,
        log=say,
        distributed=dist,
    )
    if sweep is not None:
        return _run_sweep(args, data, sweep, common, rank0)
    with InterruptGuard() as guard:
        result = comparison.compare_methods(
            model, data, batch_size=args.batch_size, out_dir=None, title=title, interrupt=guard, **common
        )
    if not rank0:
        return 0
    print()
    print(comparison.format_table(result["runs"]), flush=True)
    if args.out:
        _write(comparison.write_outputs, result, args.out, title)
    if guard.requested:
        runs = result["runs"]
        last = f" ({runs[-1]['backend']} {runs[-1]['method']} at step {runs[-1]['steps']})" if runs else ""
        raise RunInterruptedError(
            f"{guard.what} after {len(runs)} of {len(result['config']['backends']) * len(specs)} runs{last}",
            exit_code=guard.exit_code,
        )
    return 0


def _parse_target(text: str) -> float | None:
    """``--target-accuracy``: an accuracy in (0, 1], or none (no target)."""
    if text.strip().lower() in ("none", "never", "off"):
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise UsageError(f"--target-accuracy must be an accuracy in (0, 1] or none, got {text!r}")
    return value


_SWEEP_NAMES = {
    "depth": "depth",
    "batch": "batch_size",
    "batch-size": "batch_size",
    "batch_size": "batch_size",
}


def _parse_sweep(text: str | None) -> tuple[str, list[int]] | None:
    """``--sweep depth=2,4,8`` or ``batch=64,256`` -> ``("depth", [2, 4, 8])`` (None: no sweep)."""
    if text is None:
        return None
    name, eq, rest = text.partition("=")
    parameter = _SWEEP_NAMES.get(name.strip().lower())
    try:
        values = [int(v) for v in rest.split(",") if v.strip()]
    except ValueError:
        values = []
    if not eq or parameter is None or not values or min(values) < 1 or len(set(values)) != len(values):
        raise UsageError(
            f"--sweep must be depth=N,N,... or batch=N,N,... (distinct positive ints), got {text!r}"
        )
    return parameter, values


def _check_depth_flags(args) -> None:
    """``--sweep depth`` needs an MLP and one hidden width (checked before any work)."""
    if args.model not in ("mlp", "local-mlp"):
        raise UsageError(
            f"--sweep depth needs --model mlp or local-mlp (its hidden layers), got {args.model}"
        )
    if args.hidden is not None and len(set(parse_hidden(args.hidden, "digits"))) != 1:
        raise UsageError(
            f"--sweep depth repeats one hidden width: give --hidden W, got --hidden {args.hidden}"
        )


def _depth_models(args, data, depths):
    """``depth -> model``: ``depth`` hidden layers of ``--hidden``'s one width (mlp, local-mlp;
    each default is one width too).
    """
    width = model_sizes(args, data)["hidden"][0]

    def build(depth):
        a = copy.copy(args)
        a.hidden = ",".join([str(width)] * depth)
        return build_model_from_args(a, data)

    for d in depths:  # a bad --groups fails now, before any run
        build(d)
    return (lambda depth: build(depth)[0]), f"{args.model} of width {width}"


def _run_sweep(args, data, sweep, common, rank0) -> int:
    """``--sweep``: the comparison per value, each one's table, then step memory against the value."""
    from duogard.cli._interrupt import InterruptGuard

    parameter, values = sweep
    if parameter == "depth":
        model, title = _depth_models(args, data, values)
        common["batch_size"] = args.batch_size
    else:
        model, title = build_model_from_args(args, data)
        big = [v for v in values if v > data.num_train]
        if big:
            raise UsageError(
                f"--sweep batch={big[0]} is larger than the training set of {data.name} ({data.num_train})"
            )
    with InterruptGuard() as guard:
        result = comparison.compare_sweep(
            model,
            data,
            parameter=parameter,
            values=values,
            out_dir=None,
            title=title,
            interrupt=guard,
            **common,
        )
    if not rank0:
        return 0
    for point in result["points"]:
        print(f"\n{parameter} = {point['value']}")
        print(comparison.format_table(point["runs"]))
    print()
    print(comparison.format_sweep_table(result), flush=True)
    if args.out:
        _write(comparison.write_sweep_outputs, result, args.out, title)
    if guard.requested:
        raise RunInterruptedError(
            f"{guard.what} after {len(result['points'])} of {len(values)} values of {parameter}",
            exit_code=guard.exit_code,
        )
    return 0


# old name -> its name in duogard.comparison; the old names go in the next release
_DEPRECATED = {
    "compare": "compare_methods",
    "write_outputs": "write_outputs",
    "format_table": "format_table",
    "plot_runs": "plot_runs",
}


def __getattr__(name: str):
    if name in _DEPRECATED:
        new = _DEPRECATED[name]
        note = "the library's; duogard.parity.compare_backends is the cross-backend parity run"
        return moved(
            f"duogard.cli.compare.{name}", f"duogard.comparison.{new}", getattr(comparison, new), note
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _write(write, result, out, title: str) -> None:
    """Write ``result``'s files into ``out`` with ``write`` and name each; a failure is an
    output error naming ``--out``.
    """
    try:
        files = write(result, out, title=title)
    except OSError as exc:
        raise output_error(exc, "--out", out) from exc
    for f in files:
        print(f"wrote {f}")
