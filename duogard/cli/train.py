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

from duogard.cli._errors import OutputError, RunFailedError, RunInterruptedError, UsageError
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
    model_sizes,
    resolve_backend,
    run_in_group,
)
from duogard.cli._outputs import check_output_dir, check_output_file, check_resume, write_text
from duogard.methods import parse_method

__all__ = [
    "add_parser",
    "add_arguments",
    "run",
    "main",
    "RESUME_FLAGS",
    "MAX_SKIPPED",
    "check_args",
    "allowed_changes",
    "run_flags",
    "resume_config",
]

HELP = "train one model with one backend and gradient method"

#: The flags a checkpoint records (their values as the run used them, defaults filled in) and a
#: ``--resume`` compares: a difference is refused unless ``--allow-change`` names the flag.
#: ``--steps`` is not among them (a resume may extend a run), nor are outputs and the backend
#: (a checkpoint loads into either).
RESUME_FLAGS = (
    "dataset",
    "model",
    "hidden",
    "channels",
    "cnn_hidden",
    "groups",
    "patch",
    "batch_size",
    "seed",
    "grad",
    "optimizer",
    "lr",
    "decay",
    "lora",
    "lora_alpha",
    "lora_targets",
    "lora_base",
)
#: ``--max-skipped``'s default: a run that skipped more than half its steps (``--on-nan skip``) fails.
MAX_SKIPPED = 0.5


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
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the checkpoint already in --checkpoint DIR (without it, a directory holding "
        "another run's checkpoint is refused; the one --resume continues is not another run's)",
    )
    p.add_argument("--resume", default=None, help="checkpoint directory to resume from")
    p.add_argument(
        "--allow-change",
        action="append",
        default=[],
        metavar="FLAG[,FLAG...]",
        help="with --resume: let these flags differ from the checkpoint's run (e.g. lr,decay); the "
        "change is recorded in the new checkpoint. Without it a resume refuses any difference in "
        + ", ".join("--" + f.replace("_", "-") for f in RESUME_FLAGS),
    )
    p.add_argument("--on-nan", default="raise", choices=("raise", "skip"))
    p.add_argument(
        "--max-skipped",
        type=float,
        default=MAX_SKIPPED,
        metavar="FRACTION",
        help="with --on-nan skip: the run fails (exit 1) when it skipped more than this fraction of "
        f"its steps (default {MAX_SKIPPED:g})",
    )
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
    if not 0 <= args.max_skipped <= 1:
        raise UsageError(f"--max-skipped must be a fraction in [0, 1], got {args.max_skipped}")
    allowed_changes(args)
    if args.resume:
        check_resume(args.resume)
    if args.checkpoint:
        check_output_dir(args.checkpoint, "--checkpoint")
        _check_not_another_run(args)
    for flag, path in (("--log", args.log), ("--json", args.json)):
        if path:
            check_output_file(path, flag)


def allowed_changes(args) -> set[str]:
    """The flags ``--allow-change`` names (as :data:`RESUME_FLAGS` spells them)."""
    names = {n.strip().lstrip("-").replace("-", "_") for item in args.allow_change for n in item.split(",")}
    names.discard("")
    if names and not args.resume:
        raise UsageError("--allow-change only applies with --resume DIR")
    unknown = sorted(names - set(RESUME_FLAGS))
    if unknown:
        valid = ", ".join(f.replace("_", "-") for f in RESUME_FLAGS)
        raise UsageError(f"--allow-change: unknown flag(s) {', '.join(unknown)}; a resume compares {valid}")
    return names


def _same_dir(a, b) -> bool:
    from duogard.train.checkpoint import MANIFEST

    a, b = Path(a), Path(b)
    a = a.parent if a.name == MANIFEST and a.is_file() else a
    return a.resolve() == b.resolve()


def _check_not_another_run(args) -> None:
    """``--checkpoint DIR`` holding a checkpoint is refused unless it is the one ``--resume``
    continues, or ``--overwrite`` says to replace it (one run must not silently replace another's),
    or the group was restarted by ``torchrun --max-restarts`` (it resumes from its own).
    """
    from duogard.train import is_checkpoint

    if args.overwrite or not is_checkpoint(args.checkpoint):
        return
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0").strip() not in ("", "0"):
        return  # a group that torchrun restarted: the checkpoint is its own, and it resumes from it
    if args.resume and _same_dir(args.resume, args.checkpoint):
        return
    raise UsageError(
        f"--checkpoint {args.checkpoint}: already holds a checkpoint{_step_of(args.checkpoint)}; pass "
        f"--resume {args.checkpoint} to continue that run, --overwrite to replace it, or another directory"
    )


def _step_of(path) -> str:
    from duogard.train.checkpoint import read_checkpoint_manifest

    try:
        return f" (step {read_checkpoint_manifest(path)['step']})"
    except (OSError, ValueError):
        return ""


def run_flags(args, spec, data, lr: float) -> dict:
    """The values of :data:`RESUME_FLAGS` this run uses (defaults filled in): what its
    checkpoints record and a resume compares.
    """
    flags = {
        "dataset": data.name,
        "model": args.model,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in model_sizes(args, data).items()},
        "batch_size": args.batch_size,
        "seed": args.seed,
        "grad": spec.label,
        "optimizer": args.optimizer,
        "lr": float(lr),
        "decay": float(args.decay),
    }
    if args.lora is not None:  # recorded only for a LoRA run: older checkpoints compare as they did
        flags |= {"lora": args.lora, "lora_alpha": args.lora_alpha, "lora_targets": args.lora_targets,
                  "lora_base": args.lora_base}  # fmt: skip
    return flags


def _shown(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "(not set)" if value is None else str(value)


def resume_config(args, flags: dict, say=print) -> tuple[int, list]:
    """Compare this run's ``flags`` with those the ``--resume`` checkpoint recorded.

    Returns:
        ``(the checkpoint's step, the changes so far)``: the checkpoint's list of deliberate
        changes, with this resume's (``--allow-change``) appended as ``{"step", "flag", "from", "to"}``.

    Raises:
        UsageError: a flag differs and ``--allow-change`` does not name it (every such flag is
            named, with the checkpoint's value and this run's); a damaged manifest.
    """
    from duogard.train.checkpoint import read_checkpoint_manifest

    try:
        manifest = read_checkpoint_manifest(args.resume)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--resume {args.resume}: {exc}") from None
    step = manifest["step"]
    config = manifest.get("config")
    recorded = config.get("run") if isinstance(config, dict) else None
    saved = recorded.get("flags") if isinstance(recorded, dict) else None
    if not isinstance(saved, dict):
        say(
            f"(--resume {args.resume}: the checkpoint records no run configuration, written by the "
            "library or an older duogard: its flags are not compared)"
        )
        return step, []
    changes = [c for c in recorded.get("changes") or [] if isinstance(c, dict)]
    allowed = allowed_changes(args)
    new, refused = [], []
    for name in RESUME_FLAGS:
        if name not in saved and name not in flags:
            continue
        before, now = saved.get(name), flags.get(name)
        if before == now:
            continue
        flag = "--" + name.replace("_", "-")
        if name in allowed:
            new.append({"step": step, "flag": flag, "from": before, "to": now})
        else:
            refused.append((name, flag, before, now))
    if refused:
        said = "; ".join(f"{f} {_shown(b)} in the checkpoint, {_shown(n)} now" for _, f, b, n in refused)
        names = ",".join(n.replace("_", "-") for n, *_ in refused)
        raise UsageError(
            f"--resume {args.resume}: this run's flags differ from the checkpoint's run: {said}. Give "
            f"the same flags to continue it, or --allow-change {names} to change them deliberately "
            "(recorded in the new checkpoint)"
        )
    for c in new:
        say(f"(--resume: {c['flag']} changed from {_shown(c['from'])} to {_shown(c['to'])} at step {step})")
    return step, changes + new


def _callbacks(args, config: dict) -> list:
    from duogard.train import Checkpointer, Diagnostics, Evaluate, LogFile, OnNonFinite, Progress

    cbs = [Evaluate(args.eval_every), OnNonFinite(args.on_nan), Progress(False if args.quiet else None)]
    if args.diagnostics_every:
        cbs.append(Diagnostics(args.diagnostics_every))
    if args.log:
        cbs.append(LogFile(args.log))
    if args.checkpoint or args.resume:
        cbs.append(
            Checkpointer(args.checkpoint, every=args.checkpoint_every, resume=args.resume, config=config)
        )
    return cbs


def run(args) -> int:
    """Train as ``args`` say; print the setup, the evaluations and the summary.

    Ctrl-C (SIGINT) or SIGTERM ends the run after the current step (a checkpoint is written
    with ``--checkpoint``) and exits 130 or 143; an output that cannot be written at the end
    exits 1 after the summary, and so does a run that skipped more than ``--max-skipped`` of
    its steps. A resume at or past ``--steps`` says so and exits 0 without training.
    """
    return run_in_group(_run, args)


def _run(args) -> int:
    import duogard as dg
    from duogard.cli._interrupt import InterruptGuard
    from duogard.train.checkpoint import CheckpointMismatchError, CheckpointWriteError
    from duogard.tree import tree_size

    check_args(args)
    dist = data_parallel(args)
    rank = int(os.environ.get("RANK", "0") or 0) if dist is not None else 0
    # a data-parallel run reports from rank 0 only
    say = print if rank == 0 else (lambda *a, **k: None)
    spec = parse_method(args.grad)
    be = resolve_backend(args.backend)
    data = load_data(args)
    model, title = build_model_from_args(args, data)
    params = model.init(args.seed, data.example_input)  # NumPy: the same weights on both backends
    optimizer, lr = build_optimizer(args, spec)
    flags = run_flags(args, spec, data, lr)
    changes: list = []
    if args.resume:
        at, changes = resume_config(args, flags, say)
        if at >= args.steps:
            say(f"--resume {args.resume}: already at step {at} of --steps {args.steps}, nothing to do")
            return 0
    if dist is not None:  # the ranks compare these before the first step, naming a flag that differs
        dist.config = {f"--{k.replace('_', '-')}": v for k, v in flags.items()}
    cbs = _callbacks(args, {"run": {"flags": flags, "changes": changes}})
    trainer = dg.train.Trainer(
        model, optimizer=optimizer, estimator=spec.estimator, backend=be, compile=args.compile or None
    )
    threads = trainer.be.threads_for(2.0 * args.batch_size * tree_size(params))  # torch: 1 for small steps
    say(
        f"{title} ({tree_size(params):,} parameters) on {data.name}: {data.num_train} train / "
        f"{data.num_test} test, {trainer.be.name} ({threads}), {spec.label}, {args.optimizer} lr {lr:g} "
        f"decay {args.decay:g} ({trainer.update_strategy} update), {args.steps} steps of {args.batch_size}"
    )
    about = {"method": spec.label, "model": args.model, "dataset": data.name}
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
        except Exception as exc:  # the run failed: --json says how, then the error is reported
            if args.json and rank == 0:
                _write_failure(args, about | {"backend": trainer.be.name}, exc)
            if isinstance(exc, CheckpointWriteError):  # a full disk: the message says all
                raise RunFailedError(str(exc)) from exc
            raise
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
    failed = _skipped(args, result, say)
    if dist is not None:
        say(
            f"data-parallel: {dist.world_size} ranks, {dist.numbers_per_step:,} numbers per rank per step "
            f"({dist.exchange}; tangents {dist.tangents})"
        )
    stopped = _interrupted_message(args, result.step, guard, rank) if guard.requested else None
    if args.json and say is print:
        summary = s | about | {"interrupted": guard.requested}
        if guard.requested:
            summary["signal"] = guard.signal_name
        if failed:
            summary["error"] = failed
        try:
            text = json.dumps(summary, indent=1)
            write_text(args.json, text, "--json", note="the run's summary is printed above")
        except OutputError as exc:
            if stopped is None and failed is None:
                raise
            if stopped is not None:
                stopped += f"; {exc}"
            else:
                failed += f"; {exc}"
    if stopped is not None:
        raise RunInterruptedError(stopped, exit_code=guard.exit_code)
    if failed is not None:
        raise RunFailedError(failed)
    return 0


def _skipped(args, result, say) -> str | None:
    """Say how many steps ``--on-nan skip`` skipped; the failure when more than ``--max-skipped``."""
    skipped, taken = result.skipped_steps, len(result.history)
    if not skipped:
        return None
    say(f"skipped {skipped} of {taken} steps: non-finite loss or gradient (--on-nan skip)")
    if skipped <= args.max_skipped * taken:
        return None
    return (
        f"the run skipped {skipped} of its {taken} steps ({skipped / taken:.0%}), more than --max-skipped "
        f"{args.max_skipped:g}: its loss or gradient was not finite; lower the learning rate"
    )


def _write_failure(args, about: dict, exc: Exception) -> None:
    """``--json`` for a run that stopped on an error: what ran, and the error (best effort: the
    error itself is what the command reports).
    """
    summary = about | {
        "completed": False,
        "error": f"{type(exc).__name__}: {str(exc).strip()}",
        "steps": getattr(exc, "step", None),
    }
    try:
        write_text(args.json, json.dumps(summary, indent=1), "--json")
    except OutputError:
        pass


def _interrupted_message(args, step: int, guard=None, rank: int = 0) -> str:
    """What an interrupted run says: where its checkpoint is (rank 0 writes checkpoints; another
    rank says so, and what rank 0 has written so far, rather than "no new checkpoint").
    """
    from duogard.train.checkpoint import MANIFEST

    what = guard.what if guard is not None else "interrupted"
    where = "no checkpoint (use --checkpoint DIR)"
    if args.checkpoint:
        try:
            saved = json.loads((Path(args.checkpoint) / MANIFEST).read_text())["step"]
        except (OSError, ValueError, KeyError, TypeError):
            saved = None
        if rank != 0:
            where = f"rank 0 writes the checkpoint to {args.checkpoint}" + (
                f" (it holds step {saved})" if saved is not None else ""
            )
        elif saved == step:
            where = f"checkpoint written to {args.checkpoint}"
        else:
            where = f"no new checkpoint in {args.checkpoint} (no step was taken)"
    prefix = f"rank {rank}: " if rank != 0 else ""
    return f"{prefix}{what} at step {step}; {where}"


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
