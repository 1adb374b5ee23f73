"""``duogard train``: one model, one backend, one gradient method.

:func:`main` is also the training function of the example scripts (``examples/``): each one
calls it with its own defaults (model, steps, learning-rate decay, dataset ``auto``).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

from duogard.cli._errors import OutputError, RunInterruptedError, UsageError
from duogard.cli._methods import parse_method
from duogard.cli._options import (
    add_data_options,
    add_distributed_options,
    add_optimizer_options,
    build_model_from_args,
    build_optimizer,
    check_common,
    check_every,
    data_parallel,
    load_data,
    resolve_backend,
    run_in_group,
)
from duogard.cli._outputs import check_output_dir, check_output_file, check_resume, write_text

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
    add_distributed_options(p)


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``train`` command to the subparsers ``sub``."""
    p = sub.add_parser(
        "train", help=HELP, description="Train one model with one backend and one gradient method."
    )
    add_arguments(p)
    return p


def check_args(args) -> None:
    """Every check of ``duogard train``'s flags and output paths, before any data is loaded."""
    check_common(args)
    check_every("--eval-every", args.eval_every)
    check_every("--checkpoint-every", args.checkpoint_every)
    check_every("--diagnostics-every", args.diagnostics_every, zero=True)
    if args.checkpoint_every and args.checkpoint is None:
        raise UsageError("--checkpoint-every needs --checkpoint DIR")
    if args.log and Path(args.log).suffix not in (".csv", ".jsonl"):
        raise UsageError(f"--log {args.log}: the file must end in .csv or .jsonl")
    if args.resume:
        check_resume(args.resume)
    if args.checkpoint:
        check_output_dir(args.checkpoint, "--checkpoint")
    for flag, path in (("--log", args.log), ("--json", args.json)):
        if path:
            check_output_file(path, flag)


def _callbacks(args) -> list:
    from duogard.train import Checkpointer, Diagnostics, Evaluate, LogFile, OnNonFinite, Progress

    cbs = [Evaluate(args.eval_every), OnNonFinite(args.on_nan), Progress(False if args.quiet else None)]
    if args.diagnostics_every:
        cbs.append(Diagnostics(args.diagnostics_every))
    if args.log:
        cbs.append(LogFile(args.log))
    if args.checkpoint or args.resume:
        cbs.append(Checkpointer(args.checkpoint, every=args.checkpoint_every, resume=args.resume))
    return cbs


def run(args) -> int:
    """Train as ``args`` say; print the setup, the evaluations and the summary.

    Ctrl-C ends the run after the current step (a checkpoint is written with ``--checkpoint``)
    and exits 130; an output that cannot be written at the end exits 1 after the summary.
    """
    return run_in_group(_run, args)


def _run(args) -> int:
    import duogard as dg
    from duogard.cli._interrupt import InterruptGuard
    from duogard.train.checkpoint import CheckpointMismatchError
    from duogard.tree import tree_size

    check_args(args)
    dist = data_parallel(args)
    # a data-parallel run reports from rank 0 only
    say = print if dist is None or os.environ.get("RANK", "0") == "0" else (lambda *a, **k: None)
    spec = parse_method(args.grad)
    be = resolve_backend(args.backend)
    cbs = _callbacks(args)
    data = load_data(args)
    model, title = build_model_from_args(args, data)
    params = model.init(args.seed, data.example_input)  # NumPy: the same weights on both backends
    optimizer, lr = build_optimizer(args, spec)
    trainer = dg.train.Trainer(
        model, optimizer=optimizer, estimator=spec.estimator, backend=be, compile=args.compile or None
    )
    threads = trainer.be.threads_for(2.0 * args.batch_size * tree_size(params))  # torch: 1 for small steps
    say(
        f"{title} ({tree_size(params):,} parameters) on {data.name}: {data.num_train} train / "
        f"{data.num_test} test, {trainer.be.name} ({threads}), {spec.label}, {args.optimizer} lr {lr:g} "
        f"decay {args.decay:g} ({trainer.update_strategy} update), {args.steps} steps of {args.batch_size}"
    )
    with InterruptGuard() as guard:
        try:
            result = dg.fit(
                model,
                params,
                data,
                steps=args.steps,
                batch_size=args.batch_size,
                seed=args.seed,
                callbacks=[*cbs, guard.callback()],
                trainer=trainer,
                distributed=dist or False,
            )
        except CheckpointMismatchError as exc:  # --resume from another model or optimizer
            raise UsageError(f"--resume {args.resume}: {exc}") from None
    for ev in result.evals:
        say(
            f"  step {ev['step']:>6}  test loss {ev['test_loss']:.4f}  "
            f"test accuracy {ev['test_accuracy']:.4f}  {ev['time']:6.1f} s"
        )
    s = result.summary()
    say(
        f"{s['backend']} {spec.label}: final loss {s['final_loss']:.4f}, test accuracy "
        f"{s['test_accuracy']:.4f}, {1e3 * s['time_per_step']:.2f} ms/step (first step "
        f"{s['first_step_seconds']:.2f} s), total {s['total_seconds']:.1f} s",
        flush=True,
    )
    if dist is not None:
        say(
            f"data-parallel: {dist.world_size} ranks, {dist.numbers_per_step:,} numbers per rank per step "
            f"({dist.exchange}; tangents {dist.tangents})"
        )
    stopped = _interrupted_message(args, result.step) if guard.requested else None
    if args.json and say is print:
        summary = s | {"method": spec.label, "model": args.model, "dataset": data.name}
        try:
            text = json.dumps(summary | {"interrupted": guard.requested}, indent=1)
            write_text(args.json, text, "--json", note="the run's summary is printed above")
        except OutputError as exc:
            if stopped is None:
                raise
            stopped += f"; {exc}"
    if stopped is not None:
        raise RunInterruptedError(stopped)
    return 0


def _interrupted_message(args, step: int) -> str:
    from duogard.train.checkpoint import MANIFEST

    where = "no checkpoint (use --checkpoint DIR)"
    if args.checkpoint:
        try:
            saved = json.loads((Path(args.checkpoint) / MANIFEST).read_text())["step"]
        except (OSError, ValueError, KeyError):
            saved = None
        if saved == step:
            where = f"checkpoint written to {args.checkpoint}"
        else:
            where = f"no new checkpoint in {args.checkpoint} (no step was taken)"
    return f"interrupted at step {step}; {where}"


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
        The exit code: 0, 1 a failed run, 2 a usage error (through argparse, or returned), 130
        interrupted (see :mod:`duogard.cli._errors`).
    """
    from duogard.cli import add_debug_flag, report_errors

    p = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(p)
    add_debug_flag(p)
    if defaults:
        p.set_defaults(**defaults)
    args = p.parse_args(argv)
    return report_errors("train", run, args, prog=prog)
