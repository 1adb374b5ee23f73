"""The main job (``duogard compare``): every backend x gradient method with the same data, initial
weights, steps and batches; a table, a plot of loss against steps and wall-clock, and a JSON file.

:func:`compare_methods` runs it and returns the runs; :func:`write_outputs` writes
``compare.json``, ``compare.png`` and ``compare-pareto.png``, :func:`format_table` the table the
command prints, :func:`plot_runs` the plot and :func:`plot_pareto` the Pareto view (test accuracy
against step memory and against training seconds). :func:`compare_sweep` reruns the comparison
for each depth or batch size (:func:`write_sweep_outputs`, :func:`format_sweep_table`,
:func:`plot_sweep`). Methods are :class:`~duogard.methods.MethodSpec` or their text
(:mod:`duogard.methods`). Not to be confused with :func:`duogard.parity.compare_backends`,
which runs two backends in lockstep on one method and reports where they diverge.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from duogard.comparison._views import (
    SWEEP_PARAMETERS,
    check_sweep,
    format_sweep_table,
    plot_pareto,
    plot_runs,
    plot_sweep,
)
from duogard.methods import DEFAULT_METHODS, MethodSpec, parse_method

__all__ = [
    "compare_methods",
    "write_outputs",
    "format_table",
    "plot_runs",
    "plot_pareto",
    "compare_sweep",
    "write_sweep_outputs",
    "format_sweep_table",
    "plot_sweep",
    "SWEEP_PARAMETERS",
]


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
    target_accuracy: float | None = 0.9,
    eval_every: int | None = None,
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
        target_accuracy: each run reports the steps and training seconds until its test
            accuracy first reaches this (:class:`~duogard.train.TimeToTarget`); None: no target.
        eval_every: steps between test evaluations (None: a hundredth of ``steps``, at least
            1), which is how finely the time to the target is known.
        out_dir: where ``compare.json``, ``compare.png`` and ``compare-pareto.png`` go (None:
            nowhere).
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
    Each run's ``train_seconds`` is the sum of its timed steps (the first step's compilation
    included; evaluations, diagnostics and callbacks not), the clock of ``seconds_to_target``,
    of each evaluation's ``train_seconds`` and of the Pareto view; ``total_seconds`` is the
    run's wall-clock with all of them.

    Returns:
        ``{"config": ..., "runs": [summary + evaluations + history per run], "files": [...]}``.
    """
    from duogard import optim
    from duogard.backend import available_backends, backend
    from duogard.train import DataParallel, Diagnostics, Evaluate, Progress, TimeToTarget, Trainer, fit
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
    if eval_every is None:
        eval_every = max(steps // 100, 1)
    target = TimeToTarget(target_accuracy) if target_accuracy is not None else None
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
        callbacks = [Evaluate(eval_every), Progress(progress), *([target] if target else [])]
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
        summary = res.summary() | {"method": spec.label, "learning_rate": lr} | _clocked(res)
        if target:
            summary |= target.summary()
        runs.append(
            summary
            | {"history": [{k: h[k] for k in ("step", "loss", "time") if k in h} for h in res.history]}
        )
        if log:
            log(
                f"  {be_name:>5} {spec.label:<45} loss {summary['final_loss']:.4f}  "
                f"test acc {summary['test_accuracy']:.3f}  {1e3 * summary['time_per_step']:.2f} ms/step"
                + (f"  to {target.target:g}: {_to_target(summary)}" if target else "")
            )
    result = {
        "config": {
            "dataset": data.name,
            "model": model_name,
            "steps": steps,
            "batch_size": batch_size,
            "seed": seed,
            "decay": decay,
            "target_accuracy": target_accuracy,
            "eval_every": eval_every,
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


def compare_sweep(
    model,
    data,
    *,
    parameter: str,
    values,
    out_dir="duogard-out",
    title: str = "",
    log=print,
    interrupt=None,
    **kwargs,
) -> dict:
    """Run :func:`compare_methods` once for each value of ``parameter``, so each method's step
    memory can be read against depth or batch size.

    Args:
        model: for ``"depth"``, a function ``depth -> model`` (the command's: that many hidden
            layers of ``--hidden``'s width); for ``"batch_size"``, a model or such a function.
        data: the dataset.
        parameter: ``"depth"`` or ``"batch_size"`` (:data:`SWEEP_PARAMETERS`).
        values: distinct positive ints, in the order to run them.
        out_dir: where ``compare-sweep.json`` and ``compare-sweep.png`` go (None: nowhere).
        title: the plot's title.
        log: prints a line per value and per finished run (None: silent).
        interrupt: as in :func:`compare_methods`; the sweep ends with the interrupted value.
        **kwargs: the other arguments of :func:`compare_methods` (every value gets the same;
            ``batch_size`` not when it is swept).

    Returns:
        ``{"config": {"parameter", "values", "interrupted"}, "points": [{"value", "config",
        "runs"}], "files": [...]}``: each point is a comparison's result, its runs without the
        per-step history (their evaluations stay).
    """
    parameter, values = check_sweep(parameter, values)
    is_model = hasattr(model, "init")
    if parameter == "depth" and is_model:
        raise TypeError("compare_sweep: a depth sweep needs model=a function depth -> model, got a model")
    if parameter == "batch_size" and "batch_size" in kwargs:
        raise TypeError("compare_sweep: batch_size is the swept parameter: give it in values only")
    points = []
    for value in values:
        if interrupt is not None and interrupt.requested:
            break
        if log:
            log(f"{parameter} = {value}")
        extra = {"batch_size": value} if parameter == "batch_size" else {}
        m = model if is_model else model(value)
        res = compare_methods(m, data, out_dir=None, log=log, interrupt=interrupt, **kwargs, **extra)
        runs = [{k: v for k, v in r.items() if k != "history"} for r in res["runs"]]
        points.append({"value": value, "config": res["config"], "runs": runs})
    interrupted = bool(interrupt is not None and interrupt.requested)
    result = {
        "config": {"parameter": parameter, "values": values, "interrupted": interrupted},
        "points": points,
    }
    if out_dir is not None:
        result["files"] = write_sweep_outputs(result, out_dir, title=title)
    return result


def write_sweep_outputs(result: dict, out_dir, *, title: str = "") -> list[str]:
    """Write ``compare-sweep.json`` and ``compare-sweep.png`` of :func:`compare_sweep`'s
    ``result`` in ``out_dir``; returns their paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare-sweep.json").write_text(json.dumps(result, indent=1, default=_json_default))
    c = result["points"][0]["config"] if result["points"] else {}
    on = f"{title or c.get('model', '')} on {c['dataset']}, {c['steps']} steps, " if c else title
    plot_sweep(result, out / "compare-sweep.png", title=f"{on}{result['config']['parameter']} swept")
    return [str(out / "compare-sweep.json"), str(out / "compare-sweep.png")]


def _clocked(res) -> dict:
    """The run's training seconds (its timed steps, summed) and its evaluations on that clock."""
    clock = np.cumsum([h.get("step_time", 0.0) for h in res.history])
    first = res.history[0]["step"] if res.history else 1
    evals = [
        {k: e[k] for k in ("step", "test_loss", "test_accuracy")}
        | {"train_seconds": float(clock[e["step"] - first]) if e["step"] >= first else 0.0}
        for e in res.evals
    ]
    return {"train_seconds": float(clock[-1]) if len(clock) else 0.0, "evals": evals}


def _to_target(run: dict) -> str:
    if run.get("steps_to_target") is None:
        return "never"
    return f"{run['steps_to_target']} steps, {run['seconds_to_target']:.2f} s"


def write_outputs(result: dict, out_dir, *, title: str = "") -> list[str]:
    """Write ``compare.json``, ``compare.png`` and ``compare-pareto.png`` of
    :func:`compare_methods`'s ``result`` in ``out_dir``; returns their paths.
    """
    c = result["config"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(result, indent=1, default=_json_default))
    title = f"{title or c['model']} on {c['dataset']}, {c['steps']} steps, batch {c['batch_size']}"
    plot_runs(result["runs"], out / "compare.png", title=title)
    plot_pareto(result["runs"], out / "compare-pareto.png", title=title)
    return [str(out / "compare.json"), str(out / "compare.png"), str(out / "compare-pareto.png")]


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o).__name__)


def format_table(runs: list[dict]) -> str:
    """The comparison table (one row per backend x method). ``step MB`` is the step's own memory
    (``step_memory_bytes``: arrays alive within one step beyond params, optimizer state and
    batch); the process's RSS growth stays in ``compare.json`` as ``process_rss_peak_bytes``.
    With a target accuracy, ``steps to T`` and ``s to T`` are the step of the first evaluation
    at or above it and the training seconds to it (``never``: not reached).
    """
    target = next((r["target_accuracy"] for r in runs if r.get("target_accuracy") is not None), None)
    head = ("backend", "method", "final loss", "test acc", "ms/step", "total s", "step MB", "cosine")
    if target is not None:
        head += (f"steps to {target:g}", f"s to {target:g}")
    rows = []
    for r in runs:
        cos = r.get("mean_cosine", float("nan"))
        mem = r.get("step_memory_bytes")
        row = (
            r["backend"],
            r["method"],
            f"{r['final_loss']:.4f}",
            f"{r['test_accuracy']:.3f}",
            f"{1e3 * r['time_per_step']:.2f}",
            f"{r['total_seconds']:.1f}",
            "-" if mem is None else f"{mem / 2**20:.2f}",
            "-" if math.isnan(cos) else f"{cos:.3f}",
        )
        if target is not None:
            reached = r.get("steps_to_target") is not None
            row += (
                str(r["steps_to_target"]) if reached else "never",
                f"{r['seconds_to_target']:.2f}" if reached else "-",
            )
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]

    def line(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)])
