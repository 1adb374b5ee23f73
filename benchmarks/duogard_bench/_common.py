"""What every section shares: the methods, the targets, the sizes of a run, timing and table helpers,
and the machine the run is on."""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BAYDIN_RATIO",
    "FORWARD_METHODS",
    "LR",
    "METHODS",
    "RANK1_METHODS",
    "TARGETS",
    "Sizes",
    "block_until_ready",
    "dense_twin",
    "fmt",
    "format_table",
    "machine_info",
    "median",
    "ratio_of",
    "sizes_for",
]

LR = 1e-4  # small enough that no configuration diverges during the timed steps
BAYDIN_RATIO = 0.59  # forward/backprop step time reported by Baydin et al. (2022)

# name -> (estimator name, options)
METHODS: dict[str, tuple[str, dict]] = {
    "backprop": ("backprop", {}),
    "fwd-K1-normal": ("forward", {"num_tangents": 1, "distribution": "normal"}),
    "fwd-K1-rademacher": ("forward", {"num_tangents": 1, "distribution": "rademacher"}),
    "fwd-K4-normal": ("forward", {"num_tangents": 4, "distribution": "normal"}),
    "fwd-K16-normal": ("forward", {"num_tangents": 16, "distribution": "normal"}),
    "fwd-K16-rademacher": ("forward", {"num_tangents": 16, "distribution": "rademacher"}),
    "forward-activity": ("forward-activity", {"distribution": "normal"}),
    # rank-1 tangents: u wᵀ per weight (u: out numbers, w: the rest), biases dense
    "fwd-K1-normal-rank1": ("forward", {"num_tangents": 1, "distribution": "normal", "tangents": "rank1"}),
    "fwd-K1-rademacher-rank1": (
        "forward",
        {"num_tangents": 1, "distribution": "rademacher", "tangents": "rank1"},
    ),
    "fwd-K16-normal-rank1": ("forward", {"num_tangents": 16, "distribution": "normal", "tangents": "rank1"}),
    "fwd-K16-rademacher-rank1": (
        "forward",
        {"num_tangents": 16, "distribution": "rademacher", "tangents": "rank1"},
    ),
}
FORWARD_METHODS = tuple(m for m in METHODS if m.startswith("fwd-"))
RANK1_METHODS = tuple(m for m in METHODS if METHODS[m][1].get("tangents") == "rank1")

TARGETS = {
    "forward_over_backprop": 1.0,
    # issue 29: duogard's fit step within 1.15x of a hand-written step of the same framework
    "duogard_over_hand": 1.15,
    "tangent_share": 0.25,
    "memory_depth_ratio": 1.2,
    "conversion_size_ratio": 2.0,
    # duogard.convert against the bare from_dlpack of the target framework (issue 29): one leaf
    # (the median over the sizes: every size is zero-copy, so each costs the same), and a tree of
    # 100 small leaves against 100 bare calls
    "conversion_over_bare": 1.3,
    "conversion_tree_over_bare": 1.5,
    # issue 29's limits for the rank-1 forward step against backprop (K = 1, normal): the MLP,
    # the CNN, and the lean step on the MLP
    "rank1_over_backprop": 0.7,
    "rank1_cnn_over_backprop": 0.8,
    "rank1_lean_over_backprop": 0.9,
    # issue 29: K = 16 dense Rademacher tangents against backprop (MLP)
    "k16_rademacher_over_backprop": 13.0,
    # K = 16, normal, MLP: the arithmetic, not a wish. The 16 tangents go through layers 2 and 3
    # as (16 B, in) by (in, out) products: with the primal that is 18.8 M multiply-adds per example
    # against backprop's 4.8 M (forward, weight and input gradients), 3.9x; the hand-written
    # rank-1 step measured 3.2-3.5x its backprop on both backends (2026-12-03)
    "rank1_k16_over_backprop": 4.0,
}


def dense_twin(method: str) -> str | None:
    """The dense-tangent method of a rank-1 one (``fwd-K1-normal-rank1`` -> ``fwd-K1-normal``), if any."""
    if method not in RANK1_METHODS:
        return None
    twin = method.removesuffix("-rank1")
    return twin if twin in METHODS else None


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the full run, ``--quick`` and ``--tiny``."""

    mode: str
    batch: int
    image: tuple  # (C, H, W)
    mlp_hidden: tuple
    cnn_channels: int
    cnn_hidden: int
    methods: dict  # model -> method names
    rounds: int
    round_seconds: float  # time per configuration per round (sets the repeats)
    max_reps: int
    depths: tuple
    mem_width: int
    mem_batch: int
    mem_backends: tuple
    mem_runs: tuple  # (method, impl) pairs
    mem_steps: int
    conv_sizes: tuple
    conv_reps: int
    parallel_subprocesses: int
    compile_methods: tuple = ()  # MLP methods also timed with torch.compile (Trainer(compile=True))
    extras: bool = True  # torch hand-autograd and hand-jvp steps
    framework_jvp_methods: tuple = ()  # torch: also timed with the estimator's jvp="framework"
    lean_methods: tuple = ()  # forward methods also timed with lean=True (both backends)
    gradnorm_methods: tuple = ()  # also timed with Trainer(grad_norm=True), fit's default
    native_methods: tuple = ()  # forward methods also timed with generator="native" (both backends)
    draw_impls: tuple = ("duogard", "hand")  # whose tangent drawing is timed alone (its own jit on JAX)


def sizes_for(*, quick: bool = False, tiny: bool = False, rank1: bool = False) -> Sizes:
    """The sizes of the full run, of ``--quick``, of ``--tiny`` or of the rank-1 run.

    Args:
        quick: the reduced set (under a minute).
        tiny: the smoke test's sizes (wins over ``quick``).
        rank1: the rank-1 rows beside backprop and the dense-tangent steps of the same K and
            distribution, at the full run's sizes and rounds (``benchmarks/rank1.py``; wins over
            ``quick``, not over ``tiny``).

    Returns:
        The :class:`Sizes` of that run.
    """
    all_methods = tuple(METHODS)
    if rank1 and not tiny:
        full = sizes_for()
        mlp = ("backprop", "fwd-K1-normal", "fwd-K1-rademacher", "fwd-K16-normal", *RANK1_METHODS)
        cnn = (
            "backprop",
            "fwd-K1-normal",
            "fwd-K1-rademacher",
            "fwd-K1-normal-rank1",
            "fwd-K1-rademacher-rank1",
        )
        return dataclasses.replace(
            full,
            mode="rank1",
            methods={"mlp": mlp, "cnn": cnn},
            extras=False,
            compile_methods=(),
            framework_jvp_methods=(),
            gradnorm_methods=(),
            lean_methods=("fwd-K1-normal-rank1",),
            native_methods=("fwd-K1-normal", "fwd-K1-normal-rank1"),
        )
    if tiny:
        return Sizes(
            "tiny",
            batch=8,
            image=(1, 8, 8),
            mlp_hidden=(32, 32),
            cnn_channels=4,
            cnn_hidden=16,
            methods={
                "mlp": (
                    "backprop",
                    "fwd-K4-normal",
                    "forward-activity",
                    "fwd-K1-normal-rank1",
                    "fwd-K16-rademacher-rank1",
                ),
                "cnn": ("backprop", "fwd-K1-normal", "fwd-K1-normal-rank1"),
            },
            rounds=2,
            round_seconds=0.0,
            max_reps=2,
            depths=(2, 4),
            mem_width=64,
            mem_batch=32,
            mem_backends=("torch",),
            mem_runs=(("forward", "duogard"),),
            mem_steps=2,
            conv_sizes=(1_000, 10_000),
            conv_reps=5,
            parallel_subprocesses=2,
            lean_methods=("fwd-K1-normal-rank1",),
        )
    if quick:
        # One configuration per row family the quick report needs (backprop, a dense forward step,
        # a rank-1 one; duogard beside the hand-written step), at small sizes: a cold run compiles
        # every first step, and 52 of them took over three minutes on 2 cores (the lean step alone
        # compiles for 5-13 s: it is in the full run and benchmarks/rank1.py). The full run keeps
        # every row.
        return Sizes(
            "quick",
            batch=64,
            image=(1, 16, 16),
            mlp_hidden=(256, 256),
            cnn_channels=8,
            cnn_hidden=64,
            methods={
                "mlp": ("backprop", "fwd-K1-rademacher", "fwd-K1-normal-rank1"),
                "cnn": ("backprop", "fwd-K1-rademacher"),
            },
            rounds=3,
            round_seconds=0.05,
            max_reps=10,
            depths=(4, 16),
            mem_width=256,
            mem_batch=64,
            mem_backends=("torch",),
            mem_runs=(("forward", "duogard"),),
            mem_steps=2,
            conv_sizes=(1_000, 10_000, 100_000, 1_000_000),
            conv_reps=20,
            parallel_subprocesses=2,
            extras=False,
            draw_impls=("duogard",),  # the tangent-share target's; the hand-written draws compile too
        )
    return Sizes(
        "full",
        batch=64,
        image=(1, 28, 28),
        mlp_hidden=(1024, 1024),
        cnn_channels=64,
        cnn_hidden=1024,
        # K = 16 dense Rademacher is a target row of the MLP only (issue 29)
        methods={"mlp": all_methods, "cnn": tuple(m for m in all_methods if m != "fwd-K16-rademacher")},
        rounds=5,
        round_seconds=0.3,
        max_reps=25,
        depths=(2, 4, 8, 16, 32),
        mem_width=1024,
        mem_batch=1024,
        mem_backends=("jax", "torch"),
        mem_runs=(
            ("backprop", "duogard"),
            ("backprop", "hand"),
            ("forward", "duogard"),
            ("forward", "hand"),
            ("forward", "duogard-lean"),
            ("forward", "hand-lean"),
        ),
        mem_steps=3,
        conv_sizes=tuple(10**e for e in range(3, 9)),
        conv_reps=30,
        parallel_subprocesses=2,
        compile_methods=("backprop", "fwd-K1-rademacher"),
        framework_jvp_methods=("fwd-K1-normal", "fwd-K1-rademacher", "fwd-K4-normal"),
        lean_methods=("fwd-K1-normal", "fwd-K1-rademacher", "fwd-K1-normal-rank1"),
        gradnorm_methods=("backprop", "fwd-K1-rademacher"),
        native_methods=("fwd-K1-normal", "fwd-K1-normal-rank1"),
    )


# ============================================================================ small helpers


def block_until_ready(tree) -> None:
    """Wait for every (JAX) array in ``tree``; torch on CPU is synchronous.

    Args:
        tree: any pytree of arrays (or a single array).
    """
    from duogard.tree import tree_leaves

    for leaf in tree_leaves(tree):
        ready = getattr(leaf, "block_until_ready", None)
        if ready is not None:
            ready()


def median(xs) -> float:
    """The median of ``xs`` as a float, NaN when empty."""
    return float(statistics.median(xs)) if xs else float("nan")


def ratio_of(a, b) -> float:
    """``a / b``, NaN when either is zero, missing or not finite."""
    return float(a) / float(b) if a and b and math.isfinite(a) and math.isfinite(b) else float("nan")


def fmt(x, spec=".2f", none="-") -> str:
    """``x`` formatted with ``spec``; ``none`` for None or a non-finite float."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return format(x, spec)


def format_table(headers, rows) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned, a rule under the header."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def machine_info(command: str) -> dict:
    """CPU model, cores, memory, load and versions.

    Args:
        command: the command line to record.

    Returns:
        The ``machine`` record of the JSON (with ``git``: the commit, and whether the library, the
        backends or this suite have uncommitted changes).
    """
    cpu = platform.processor() or "?"
    fields: dict = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
                if not line.strip():
                    break
        cpu = fields.get("model name", cpu)
        if "cpu family" in fields:
            cpu += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
        if "avx512f" in fields.get("flags", "").split():
            cpu += ", AVX-512"
    except OSError:
        pass
    mem_gb = float("nan")
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        pass
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_gb, 1),
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "command": command,
    }
    import duogard

    info["duogard"] = duogard.__version__
    repo = os.path.dirname(os.path.dirname(os.path.abspath(duogard.__file__)))
    try:
        head = subprocess.run(
            ["git", "-C", repo, "rev-parse", "--short", "HEAD"],
            check=False,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "-C",
                repo,
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                "duogard",
                "backends",
                "benchmarks/duogard_bench",
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        if head:
            info["git"] = head + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    for mod in ("jax", "jaxlib", "torch"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    for var in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "XLA_FLAGS", "MKL_NUM_THREADS"):
        if os.environ.get(var):
            info[var] = os.environ[var]
    return info
