"""``duogard compare``, the main job: every backend x gradient method with the same data, initial
weights, steps and batches; a table, a plot of loss against steps and wall-clock, and a JSON file.

This module is the command's front (its flags, the output checks, Ctrl-C); the job itself is the
library's :func:`duogard.comparison.compare_methods`. ``compare``, ``write_outputs``,
``format_table`` and ``plot_runs`` here are the old names of :mod:`duogard.comparison`'s
(deprecated: they warn and go in the next release).
"""

from __future__ import annotations

import argparse
import os
import warnings

from duogard import comparison
from duogard.cli._errors import RunInterruptedError
from duogard.cli._options import (
    add_data_options,
    add_distributed_options,
    build_model_from_args,
    check_common,
    check_every,
    data_parallel,
    load_data,
    parse_backends,
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
    c.add_argument("--out", default="duogard-out", help="output directory (compare.json, compare.png)")
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
    with InterruptGuard() as guard:
        result = comparison.compare_methods(
            model,
            data,
            backends=backends,
            methods=specs,
            steps=args.steps,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            decay=args.decay,
            seed=args.seed,
            model_name=args.model,
            diagnostics_every=args.diagnostics_every,
            out_dir=None,
            title=title,
            progress=False if args.quiet or not rank0 else None,
            log=say,
            interrupt=guard,
            distributed=dist,
        )
    if not rank0:
        return 0
    print()
    print(comparison.format_table(result["runs"]), flush=True)
    if args.out:
        try:
            files = comparison.write_outputs(result, args.out, title=title)
        except OSError as exc:
            raise output_error(exc, "--out", args.out) from exc
        for f in files:
            print(f"wrote {f}")
    if guard.requested:
        runs = result["runs"]
        last = f" ({runs[-1]['backend']} {runs[-1]['method']} at step {runs[-1]['steps']})" if runs else ""
        raise RunInterruptedError(
            f"{guard.what} after {len(runs)} of {len(result['config']['backends']) * len(specs)} runs{last}",
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
        warnings.warn(
            f"duogard.cli.compare.{name} is deprecated and goes in the next release: use "
            f"duogard.comparison.{new} (the library's; duogard.parity.compare_backends is the "
            "cross-backend parity run)",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(comparison, new)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
