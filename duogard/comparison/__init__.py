"""The main job (``duogard compare``): every backend x gradient method with the same data, initial
weights, steps and batches; a table, a plot of loss against steps and wall-clock, and a JSON file.

:func:`compare_methods` runs it and returns the runs; :func:`write_outputs` writes
``compare.json`` and ``compare.png``, :func:`format_table` the table the command prints,
:func:`plot_runs` the plot. Methods are :class:`~duogard.methods.MethodSpec` or their text
(:mod:`duogard.methods`). Not to be confused with :func:`duogard.parity.compare_backends`,
which runs two backends in lockstep on one method and reports where they diverge.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from duogard.methods import DEFAULT_METHODS, MethodSpec, parse_method

__all__ = ["compare_methods", "write_outputs", "format_table", "plot_runs"]


def compare_methods(
    model,
    data,
    *,
    backends=None,
    methods=DEFAULT_METHODS,
    steps: int = 2500,
    batch_size: int = 64,
    learning_rate: float | None = None,
    decay: float = 0.0,
    seed: int = 0,
    model_name: str = "mlp",
    diagnostics_every: int = 25,
    out_dir="duogard-out",
    title: str = "",
    progress=None,
    log=print,
    interrupt=None,
    distributed=None,
) -> dict:
    """Run every ``backend x method`` with the same data, initial weights, steps and batches.

    Args:
        model: the duogard model.
        data: the dataset.
        backends: backend names (None: every installed one).
        methods: :class:`~duogard.methods.MethodSpec` or strings ``name[:option=value,...]``
            (read by :func:`~duogard.methods.parse_method`; errors name ``--methods``).
        steps: steps per run.
        batch_size: examples per step.
        learning_rate: one SGD rate for every method (None: each method's own, or the table's).
        decay: exponential learning-rate decay.
        seed: weights, batches and tangents follow it.
        model_name: the model's name in the learning-rate table.
        diagnostics_every: steps between cosine diagnostics of the estimators (0: never).
        out_dir: where ``compare.json`` and ``compare.png`` go (None: nowhere).
        title: the plot's title.
        progress: progress bars (None: when stderr is a terminal).
        log: prints one line per finished run (None: silent).
        interrupt: an object whose ``requested`` ends the comparison after the current step
            (the CLI's Ctrl-C guard; its ``callback()`` is added to every run). The runs so
            far are returned, and ``config["interrupted"]`` says so.
        distributed: a :class:`~duogard.train.DataParallel` (or True): every run is
            data-parallel across the ranks of a ``torchrun`` launch, each with a fresh
            ``DataParallel`` of the same settings. Rank 0's summaries carry the test accuracy
            (evaluation runs on rank 0 only); ``config["world_size"]`` says how many ranks.

    Every run's step computes no gradient norm (the table does not show it), so its
    ``time_per_step`` is the method's and the framework's, as a hand-written step's would be.

    Returns:
        ``{"config": ..., "runs": [summary + history per run], "files": [...]}``.
    """
    from duogard import optim
    from duogard.backend import available_backends, backend
    from duogard.train import DataParallel, Diagnostics, Evaluate, Progress, Trainer, fit
    from duogard.tree import tree_size

    if distributed is True:
        distributed = DataParallel()
    if distributed not in (None, False) and not isinstance(distributed, DataParallel):
        raise TypeError(
            f"compare_methods: distributed must be None, True or a DataParallel, got {distributed!r:.80}"
        )
    world = 1

    if backends is None:
        backends = [b.name for b in available_backends() if b.available]
    specs = [m if isinstance(m, MethodSpec) else parse_method(m, flag="--methods") for m in methods]
    params0 = model.init(seed, data.example_input)
    # threading chosen for the work's size (torch: one thread for small steps), said once
    work = 2.0 * batch_size * tree_size(params0)
    threads = {b: backend(b).threads_for(work) for b in backends}
    if log:
        log("  threads: " + "; ".join(f"{b}: {t}" for b, t in threads.items()))
    runs = []
    for be_name, spec in [(b, m) for b in backends for m in specs]:
        if interrupt is not None and interrupt.requested:
            break
        lr = learning_rate if learning_rate is not None else spec.learning_rate(model_name)
        schedule = optim.exponential_decay(lr, rate=decay) if decay else lr
        callbacks = [Evaluate(), Progress(progress)]
        if diagnostics_every and spec.name != "backprop":
            callbacks.append(Diagnostics(diagnostics_every))
        if interrupt is not None:
            callbacks.append(interrupt.callback())
        dp = DataParallel(tangents=distributed.tangents, timeout=distributed.timeout) if distributed else None
        # no gradient norm: the table does not show it, and its pass over the gradient (a dense
        # one, for a factored estimate) is duogard's work, not the method's or the framework's
        trainer = Trainer(
            model, estimator=spec.estimator, optimizer=optim.sgd(schedule), backend=be_name, grad_norm=False
        )
        res = fit(
            model,
            params0,
            data,
            trainer=trainer,
            steps=steps,
            batch_size=batch_size,
            seed=seed,
            callbacks=callbacks,
            distributed=dp or False,
        )
        world = dp.world_size if dp else 1
        summary = res.summary() | {"method": spec.label, "learning_rate": lr}
        runs.append(
            summary
            | {"history": [{k: h[k] for k in ("step", "loss", "time") if k in h} for h in res.history]}
        )
        if log:
            log(
                f"  {be_name:>5} {spec.label:<45} loss {summary['final_loss']:.4f}  "
                f"test acc {summary['test_accuracy']:.3f}  {1e3 * summary['time_per_step']:.2f} ms/step"
            )
    result = {
        "config": {
            "dataset": data.name,
            "model": model_name,
            "steps": steps,
            "batch_size": batch_size,
            "seed": seed,
            "decay": decay,
            "backends": list(backends),
            "methods": [s.label for s in specs],
            "threads": threads,
            "world_size": world,
            "versions": {b.name: b.version for b in available_backends() if b.available},
            "interrupted": bool(interrupt is not None and interrupt.requested),
        },
        "runs": runs,
    }
    if out_dir is not None:
        result["files"] = write_outputs(result, out_dir, title=title)
    return result


def write_outputs(result: dict, out_dir, *, title: str = "") -> list[str]:
    """Write ``compare.json`` and ``compare.png`` of :func:`compare_methods`'s ``result`` in ``out_dir``."""
    c = result["config"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(result, indent=1, default=_json_default))
    plot_runs(
        result["runs"],
        out / "compare.png",
        title=f"{title or c['model']} on {c['dataset']}, {c['steps']} steps, batch {c['batch_size']}",
    )
    return [str(out / "compare.json"), str(out / "compare.png")]


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o).__name__)


def format_table(runs: list[dict]) -> str:
    """The comparison table (one row per backend x method). ``step MB`` is the step's own memory
    (``step_memory_bytes``: arrays alive within one step beyond params, optimizer state and
    batch); the process's RSS growth stays in ``compare.json`` as ``process_rss_peak_bytes``.
    """
    head = ("backend", "method", "final loss", "test acc", "ms/step", "total s", "step MB", "cosine")
    rows = []
    for r in runs:
        cos = r.get("mean_cosine", float("nan"))
        mem = r.get("step_memory_bytes")
        rows.append(
            (
                r["backend"],
                r["method"],
                f"{r['final_loss']:.4f}",
                f"{r['test_accuracy']:.3f}",
                f"{1e3 * r['time_per_step']:.2f}",
                f"{r['total_seconds']:.1f}",
                "-" if mem is None else f"{mem / 2**20:.2f}",
                "-" if math.isnan(cos) else f"{cos:.3f}",
            )
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]

    def line(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _smooth(y: np.ndarray, k: int) -> np.ndarray:
    if k <= 1 or len(y) < k:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    head = c[1:k] / np.arange(1, k)
    return np.concatenate([head, (c[k:] - c[:-k]) / k])


_STYLES = ("-", "--", ":", "-.")


def plot_runs(runs: list[dict], path, *, title: str = "") -> None:
    """Loss against step and against wall-clock, one line per run (moving average of 25), and
    each run's step memory (a bar per run).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(dict.fromkeys(r["backend"] for r in runs))  # a line style per backend
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 4.5))
    for i, r in enumerate(runs):
        h = r["history"]
        step = np.array([x["step"] for x in h])
        loss = _smooth(np.array([x["loss"] for x in h], dtype=float), 25)
        t = np.array([x["time"] for x in h])
        style = _STYLES[backends.index(r["backend"]) % len(_STYLES)]
        label = f"{r['backend']} {r['method']}"
        (line,) = ax1.plot(step, loss, style, label=label)
        ax2.plot(t, loss, style, label=label)
        mem = r.get("step_memory_bytes") or 0
        ax3.barh(i, mem / 2**20, color=line.get_color(), hatch=None if style == "-" else "//")
    _memory_panel(ax3, runs)
    for ax, xl in ((ax1, "step"), (ax2, "wall-clock seconds")):
        ax.set_xlabel(xl)
        ax.set_ylabel("training loss (moving average)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _memory_panel(ax, runs: list[dict]) -> None:
    """Label the step-memory bars: one per run, top to bottom in the table's order."""
    mbs = [(r.get("step_memory_bytes") or 0) / 2**20 for r in runs]
    for i, (r, mb) in enumerate(zip(runs, mbs)):
        size = "-" if r.get("step_memory_bytes") is None else f"{mb:.2f}"
        ax.annotate(f" {size}  {r['backend']} {r['method']}", (mb, i), va="center", fontsize=7)
    ax.set_xlim(0, 2.2 * max(mbs, default=0) or 1)
    ax.set_yticks([])
    ax.invert_yaxis()
    ax.set_xlabel("step memory, MiB")
    ax.set_title("arrays alive in a step beyond params, optimizer state, batch", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
