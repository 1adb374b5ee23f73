"""Options that several commands share: data and model flags, optimizer flags, backends."""

from __future__ import annotations

import argparse
import os

from duogard.cli._errors import UsageError

__all__ = [
    "UsageError",
    "check_common",
    "check_every",
    "resolve_backend",
    "add_data_options",
    "add_optimizer_options",
    "build_optimizer",
    "parse_hidden",
    "load_data",
    "build_model_from_args",
    "with_lora",
    "model_sizes",
    "parse_backends",
    "OPTIMIZERS",
]

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
#: The longest ``--dist-timeout``: a week (inf, or a number past what a timedelta holds, overflowed)
MAX_DIST_TIMEOUT = 7 * 86400.0
DATASETS_HELP = (
    "digits (built in), auto (mnist if its IDX files are in --data-dir, else digits), "
    "mnist, fashion-mnist, synthetic"
)


def add_data_options(p: argparse.ArgumentParser, *, many_backends: bool = False) -> None:
    """``--backend(s)``, data, model and the common training flags."""
    if many_backends:
        p.add_argument(
            "--backends", default=None, help="comma-separated backends (default: every installed one)"
        )
    else:
        p.add_argument(
            "--backend", default=None, help="jax or torch (default: $DUOGARD_BACKEND, else jax if installed)"
        )
    p.add_argument("--dataset", default="digits", help=DATASETS_HELP)
    p.add_argument("--data-dir", default=None, help="directory with the MNIST/Fashion-MNIST IDX files")
    p.add_argument("--model", default="mlp", choices=("logreg", "mlp", "cnn", "local-mlp", "local-mixer"))
    p.add_argument(
        "--hidden",
        default=None,
        help="MLP hidden sizes, comma-separated (default: 128 on digits, 1024,1024 otherwise); "
        "local-mlp: 256,256,256 on digits; local-mixer: the channels of each block (default 64,64,64)",
    )
    p.add_argument(
        "--channels",
        type=int,
        default=None,
        help="CNN: channels of each convolution (default: 16 on digits, 64 otherwise)",
    )
    p.add_argument(
        "--cnn-hidden",
        type=int,
        default=None,
        help="CNN: units of the hidden linear layer (default: 128 on digits, 1024 otherwise)",
    )
    p.add_argument(
        "--groups",
        type=int,
        default=None,
        help="local-mlp, local-mixer: groups (local heads) per hidden layer or block (default: 8)",
    )
    p.add_argument(
        "--patch",
        type=int,
        default=None,
        help="local-mixer: side of the square patches (tokens) the images are cut into "
        "(default: 4, 2 on the 8x8 digits)",
    )
    p.add_argument(
        "--lora",
        type=int,
        default=None,
        metavar="RANK",
        help="train LoRA adapters of this rank on the model's Linear layers, every base weight frozen "
        "(the base: the model's init from --seed, or --lora-base)",
    )
    p.add_argument(
        "--lora-alpha",
        type=float,
        default=None,
        help="with --lora: the update is (alpha / rank) B A (default: rank)",
    )
    p.add_argument(
        "--lora-targets",
        default="*",
        metavar="PATTERNS",
        help="with --lora: the Linear layers to adapt, fnmatch patterns of their names in the params "
        "('1', '3'; '|' between patterns; default '*': all)",
    )
    p.add_argument(
        "--lora-base",
        default=None,
        metavar="DIR",
        help="with --lora: the base weights, from a checkpoint of the same model "
        "(duogard train --checkpoint DIR)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)


def add_optimizer_options(p: argparse.ArgumentParser, *, choices=OPTIMIZERS) -> None:
    """``--optimizer``, ``--lr``, ``--decay``."""
    p.add_argument("--optimizer", default="sgd", choices=choices)
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate (default: the method's lr=, else the table's rate for the model and "
        "method; a tenth of it for Adam)",
    )
    p.add_argument(
        "--decay",
        type=float,
        default=0.0,
        help="exponential learning-rate decay k: lr0*exp(-k*step) (default 0: constant)",
    )


def add_distributed_options(p: argparse.ArgumentParser) -> None:
    """``--distributed``, ``--dist-tangents`` and ``--dist-timeout`` (train and compare)."""
    p.add_argument(
        "--distributed",
        default="auto",
        choices=("auto", "on", "off"),
        help="data-parallel across the ranks of a torchrun launch (auto: when $WORLD_SIZE is set)",
    )
    p.add_argument(
        "--dist-tangents",
        default="shared",
        choices=("shared", "per_rank"),
        help="data-parallel forward gradients: one tangent key for all ranks, or one per rank",
    )
    p.add_argument("--dist-timeout", type=float, default=300.0, help="seconds a collective may wait")


def data_parallel(args):
    """The run's :class:`~duogard.train.DataParallel`, or None for a single-process run."""
    if args.distributed == "off" or (args.distributed == "auto" and not os.environ.get("WORLD_SIZE")):
        return None
    from duogard.train import DataParallel

    return DataParallel(tangents=args.dist_tangents, timeout=args.dist_timeout)


def run_in_group(run, args) -> int:
    """``run(args)``, then, for a command under torchrun, leave the process groups it joined."""
    try:
        return run(args)
    finally:
        if os.environ.get("WORLD_SIZE") and args.distributed != "off":
            leave_process_groups()


def leave_process_groups() -> None:
    """Leave every loaded backend's process group (the end of a command under torchrun): a gloo
    group torn down at interpreter exit can abort the process after its work is done.
    """
    from duogard.backend import loaded_backends

    for be in loaded_backends():
        try:
            be.dist_shutdown()
        except Exception:  # noqa: BLE001 - leaving is best effort; the work is done
            pass


def parse_hidden(text: str | None, dataset_name: str) -> tuple[int, ...]:
    """``--hidden``: comma-separated positive ints; None gives the default for the data."""
    if text is None:
        return (128,) if dataset_name == "digits" else (1024, 1024)
    try:
        sizes = tuple(int(h) for h in text.split(",") if h.strip())
    except ValueError:
        raise UsageError(f"--hidden must be comma-separated ints, got {text!r}") from None
    if not sizes or min(sizes) <= 0:
        raise UsageError(f"--hidden must be positive ints, got {text!r}")
    return sizes


def _positive(flag: str, value):
    if value is not None and not value > 0:
        raise UsageError(f"{flag} must be > 0, got {value}")
    return value


def check_common(args) -> None:
    """The checks argparse's types do not make (before any data is loaded)."""
    for flag in ("batch_size", "channels", "cnn_hidden", "groups", "patch", "lr"):
        if hasattr(args, flag):
            _positive("--" + flag.replace("_", "-"), getattr(args, flag))
    if getattr(args, "steps", 1) < 1:  # 0 steps would print nan for every figure
        raise UsageError(f"--steps must be a positive int, got {args.steps}")
    if getattr(args, "decay", 0.0) < 0:
        raise UsageError(f"--decay must be >= 0, got {args.decay}")
    if getattr(args, "hidden", None) is not None:
        parse_hidden(args.hidden, "digits")
    # a backend's thread override is $DUOGARD_<NAME>_THREADS (its threads_for reads it at the first
    # step; torch's is the one there is): a bad value is refused before any work
    from duogard.backend import registered_backends
    from duogard.backend.authoring import threads_from_env

    for name in registered_backends():
        try:
            threads_from_env(f"DUOGARD_{name.upper()}_THREADS")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    lora = getattr(args, "lora", None)
    if lora is not None and lora < 1:
        raise UsageError(f"--lora must be a positive int (the adapters' rank), got {lora}")
    if lora is None:
        given = [f for f in ("lora_alpha", "lora_base") if getattr(args, f, None) is not None]
        given += ["lora_targets"] if getattr(args, "lora_targets", "*") != "*" else []
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} only applies with --lora RANK")
    _positive("--lora-alpha", getattr(args, "lora_alpha", None))
    timeout = getattr(args, "dist_timeout", None)
    if timeout is not None and not 0 < timeout <= MAX_DIST_TIMEOUT:
        raise UsageError(
            f"--dist-timeout must be finite positive seconds, at most {MAX_DIST_TIMEOUT:g} (a week), "
            f"got {timeout}"
        )


def check_every(flag: str, value, *, zero: bool = False) -> None:
    """``--X-every``: a positive int (``zero``: or 0, meaning never), or None (the default)."""
    if value is not None and value < (0 if zero else 1):
        raise UsageError(f"{flag} must be {'>= 0' if zero else 'a positive int'}, got {value}")


def resolve_backend(name: str | None, flag: str = "--backend"):
    """The backend module ``name`` (None: the default); an unknown or missing one is a usage error.

    A backend whose framework is not installed is the user's environment, not a bug: the
    error says how to install it.
    """
    import duogard as dg

    try:
        return dg.backend(name)
    except (ValueError, ImportError) as exc:
        raise UsageError(f"{flag} {name}: {exc}" if name else str(exc)) from None


def load_data(args, *, say=print):
    """The dataset of ``--dataset`` (``auto``: MNIST when its IDX files are in --data-dir, else digits).

    Unknown names, missing or malformed files are usage errors (their messages say what to fix);
    the batch size must fit the training split.
    """
    try:
        data = _load_data(args, say)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from None
    batch = getattr(args, "batch_size", None)
    if batch is not None and batch > data.num_train:
        raise UsageError(
            f"--batch-size {batch} is larger than the training set of {data.name} ({data.num_train})"
        )
    return data


def _load_data(args, say):
    import duogard as dg

    if args.dataset != "auto":
        return dg.data.load(args.dataset, seed=args.seed, data_dir=args.data_dir)
    try:
        return dg.data.load("mnist", seed=args.seed, data_dir=args.data_dir)
    except FileNotFoundError:
        where = args.data_dir or os.environ.get("DUOGARD_DATA_DIR", "./data")
        say(
            f"(no MNIST IDX files in {where}: using the built-in digits dataset; "
            f"pass --dataset mnist --data-dir DIR for MNIST)"
        )
        return dg.data.load("digits", seed=args.seed)


def model_sizes(args, data) -> dict:
    """The size flags of ``--model`` with their defaults filled in for ``data`` (what a run records)."""
    small = data.name == "digits"
    if args.model == "cnn":
        return {
            "channels": args.channels or (16 if small else 64),
            "cnn_hidden": args.cnn_hidden or (128 if small else 1024),
        }
    if args.model == "mlp":
        return {"hidden": parse_hidden(args.hidden, data.name)}
    if args.model == "local-mlp":
        hidden = parse_hidden(args.hidden or ("256,256,256" if small else None), data.name)
        return {"hidden": hidden, "groups": getattr(args, "groups", None) or 8}
    if args.model == "local-mixer":
        return {
            "hidden": parse_hidden(args.hidden or "64,64,64", data.name),
            "groups": getattr(args, "groups", None) or 8,
            "patch": getattr(args, "patch", None) or (2 if small else 4),
        }
    return {}


def build_model_from_args(args, data):
    """``(model, title)`` for ``--model`` and its size flags (the paper's sizes beyond digits),
    with LoRA adapters on its Linear layers under ``--lora`` (:func:`with_lora`).
    """
    model, title = _build_model(args, data)
    if getattr(args, "lora", None) is None:
        return model, title
    return with_lora(args, data, model, title)


def with_lora(args, data, model, title):
    """``--lora RANK``: ``(the adapted model, its title)``. The base weights are the model's init
    from ``--seed`` (its adapters' own draws differ), or ``--lora-base DIR``'s params.
    """
    import duogard as dg

    base = model.init(args.seed, data.example_input)
    if args.lora_base is not None:
        from duogard.train.checkpoint import CheckpointError, load_checkpoint

        try:
            base = load_checkpoint(args.lora_base, like_params=base).params
        except (OSError, CheckpointError) as exc:
            raise UsageError(f"--lora-base {args.lora_base}: {exc}") from None
    try:
        model = dg.lora(model, base, rank=args.lora, alpha=args.lora_alpha, targets=args.lora_targets)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--lora {args.lora}: {exc}") from None
    lora = model.lora
    where = f"from {args.lora_base}" if args.lora_base else f"frozen, seed {args.seed}"
    return model, (
        f"{title}, LoRA rank {lora.rank} alpha {lora.alpha:g} on {len(lora.targets)} Linear layers "
        f"({', '.join(lora.targets)}; base {where})"
    )


def _build_model(args, data):
    from duogard.train import build_model

    sizes = model_sizes(args, data)
    if args.model == "logreg":
        return build_model(
            "logreg", data.num_classes
        ), f"logistic regression {data.x_train[0].size}-{data.num_classes}"
    if args.model == "cnn":
        channels, cnn_hidden = sizes["channels"], sizes["cnn_hidden"]
        model = build_model("cnn", data.num_classes, channels=channels, cnn_hidden=cnn_hidden)
        return model, f"CNN 4 x conv3x3({channels}), linear {cnn_hidden}, {data.num_classes} classes"
    if args.model == "local-mlp":
        hidden, groups = sizes["hidden"], sizes["groups"]
        bad = [h for h in hidden if h % groups]
        if bad:
            raise UsageError(
                f"--groups {groups} must divide every hidden size, got --hidden {args.hidden or hidden}"
            )
        sizes = "-".join(map(str, (data.x_train[0].size, *hidden, data.num_classes)))
        model = build_model("local-mlp", data.num_classes, hidden=hidden, groups=groups)
        return model, f"local MLP {sizes} (LayerNorm, {groups} local heads a layer)"
    if args.model == "local-mixer":
        return _local_mixer(args, data, **sizes)
    hidden = sizes["hidden"]
    sizes = "-".join(map(str, (data.x_train[0].size, *hidden, data.num_classes)))
    return build_model("mlp", data.num_classes, hidden=hidden), f"MLP {sizes}"


def _local_mixer(args, data, *, hidden, groups, patch):
    from duogard.train import build_model

    shape = tuple(data.x_train.shape[1:])
    if len(shape) != 3 or shape[1] % patch or shape[2] % patch:
        raise UsageError(
            f"--model local-mixer needs images (C, H, W) with sides divisible by --patch {patch}, "
            f"got {data.name} examples of shape {shape}"
        )
    if any(h % groups for h in hidden):
        raise UsageError(
            f"--groups {groups} must divide every block's channels, got --hidden "
            + (args.hidden or ",".join(map(str, hidden)))
        )
    tokens = (shape[1] // patch) * (shape[2] // patch)
    model = build_model("local-mixer", data.num_classes, hidden=hidden, groups=groups, patch=patch)
    channels = "-".join(map(str, hidden))
    return model, (
        f"LocalMixer {tokens} patches of {patch}x{patch}, blocks of {channels} channels, "
        f"{groups} local heads a block"
    )


def build_optimizer(args, spec, *, model: str | None = None):
    """The optimizer a command asked for, and its initial learning rate.

    ``--lr``, else the method's own ``lr=``, else the table's rate for the model and method
    (a tenth of it for Adam); ``--decay`` makes it ``lr * exp(-decay * step)``.
    """
    from duogard import optim

    name = args.optimizer
    lr = (
        args.lr
        if args.lr is not None
        else spec.learning_rate(model or args.model) * (0.1 if name.startswith("adam") else 1)
    )
    schedule = optim.exponential_decay(lr, rate=args.decay) if args.decay else lr
    if name == "sgd":
        return optim.sgd(schedule), lr
    if name == "momentum":
        return optim.sgd(schedule, momentum=0.9), lr
    if name == "adam":
        return optim.adam(schedule), lr
    return optim.adamw(schedule), lr


def parse_backends(text: str | None, *, flag: str = "--backends") -> list[str] | None:
    """Comma-separated backend names (None: every installed one)."""
    if text is None:
        return None
    names = [b.strip() for b in text.split(",") if b.strip()]
    if not names:
        raise UsageError(f"{flag}: expected comma-separated backend names, got {text!r}")
    return names
