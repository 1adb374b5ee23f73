"""The main job's figures and the sweep's table: loss curves with step memory (``compare.png``),
the Pareto view (``compare-pareto.png``) and step memory against a swept depth or batch size
(``compare-sweep.png``).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["plot_runs", "plot_pareto", "plot_sweep", "format_sweep_table", "check_sweep", "SWEEP_PARAMETERS"]

#: What :func:`~duogard.comparison.compare_sweep` sweeps: the model's number of hidden layers,
#: or the examples per step.
SWEEP_PARAMETERS = ("depth", "batch_size")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    plt = _pyplot()
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


def _mib(run: dict) -> float:
    return (run.get("step_memory_bytes") or 0) / 2**20


def _seconds(run: dict) -> float:
    """The run's training seconds (older results: its wall-clock)."""
    return run.get("train_seconds", run.get("total_seconds", float("nan")))


def _frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other beats on both axes (less x, more accuracy), by increasing x."""
    out: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not out or y > out[-1][1]:
            out.append((x, y))
    return out


def _label_groups(points, labels, near: float = 0.03):
    """One label per group of points that would print over each other (within ``near`` of the
    axes' spans of each other): the group's labels joined by commas, at its first point.
    """
    if not points:
        return []
    xs, ys = zip(*points)
    sx, sy = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    groups: list[tuple[tuple[float, float], list[str]]] = []
    for (x, y), text in zip(points, labels):
        for (gx, gy), texts in groups:
            if abs(x - gx) / sx < near and abs(y - gy) / sy < near:
                texts.append(text)
                break
        else:
            groups.append(((x, y), [text]))
    return [(xy, ",".join(texts)) for xy, texts in groups]


def plot_pareto(runs: list[dict], path, *, title: str = "") -> None:
    """The Pareto view: final test accuracy against step memory and against training seconds,
    one point per run (a colour per method, a marker per backend) numbered as in the table and
    labelled by backend and method in the legend; the dashed line joins the runs that no other
    beats on both axes.
    """
    plt = _pyplot()
    backends = list(dict.fromkeys(r["backend"] for r in runs))
    methods = list(dict.fromkeys(r["method"] for r in runs))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5 + 0.16 * len(runs)))
    panels = ((axes[0], _mib, "step memory, MiB"),
              (axes[1], _seconds, "training seconds (timed steps; evaluations excluded)"))  # fmt: skip
    for ax, x_of, xlabel in panels:
        points, labels = [], []
        for i, r in enumerate(runs, 1):
            x, y = x_of(r), r.get("test_accuracy", float("nan"))
            if math.isnan(y) or math.isnan(x):
                continue
            points.append((x, y))
            labels.append(str(i))
            color = colors[methods.index(r["method"]) % len(colors)]
            marker = "os^D"[backends.index(r["backend"]) % 4]
            label = f"{i}  {r['backend']} {r['method']}" if ax is axes[0] else None
            ax.scatter([x], [y], color=color, marker=marker, zorder=3, label=label)
        for (x, y), text in _label_groups(points, labels):
            ax.annotate(text, (x, y), xytext=(5, 3), textcoords="offset points", fontsize=7)
        front = _frontier(points)
        if len(front) > 1:
            ax.plot(*zip(*front), "--", color="0.5", lw=1, zorder=2, drawstyle="steps-post")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("final test accuracy")
        ax.grid(alpha=0.3)
    axes[0].set_title("accuracy against step memory (up and left is better)", fontsize=9)
    axes[1].set_title("accuracy against training time", fontsize=9)
    fig.suptitle(title)
    fig.legend(loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.03 + 0.08 * math.ceil(len(runs) / 2) / 3, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_sweep(parameter: str, values) -> tuple[str, list[int]]:
    """``(parameter, values)`` of a sweep, checked: a name of :data:`SWEEP_PARAMETERS` and
    distinct positive ints (ValueError naming what is wrong).
    """
    if parameter not in SWEEP_PARAMETERS:
        raise ValueError(f"compare_sweep: parameter must be one of {SWEEP_PARAMETERS}, got {parameter!r}")
    values = list(values)
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1]
    if not values or bad or len(set(values)) != len(values):
        raise ValueError(
            f"compare_sweep: the values of {parameter} must be distinct positive ints, got {values}"
        )
    return parameter, [int(v) for v in values]


def _series(result: dict) -> dict[tuple[str, str], list[tuple[int, dict]]]:
    """``(backend, method) -> [(value, run), ...]`` over the sweep's points."""
    out: dict = {}
    for point in result["points"]:
        for r in point["runs"]:
            out.setdefault((r["backend"], r["method"]), []).append((point["value"], r))
    return out


def format_sweep_table(result: dict) -> str:
    """Step memory (MiB) per backend x method at each swept value, and the last value's over the first's."""
    c = result["config"]
    values = [p["value"] for p in result["points"]]
    head = ("backend", "method", *(f"{c['parameter']}={v}" for v in values), "last/first")
    rows = []
    for (be, method), series in _series(result).items():
        mem = dict((v, r.get("step_memory_bytes")) for v, r in series)
        cells = ["-" if mem.get(v) is None else f"{mem[v] / 2**20:.3f}" for v in values]
        first, last = mem.get(values[0]), mem.get(values[-1])
        ratio = f"{last / first:.2f}x" if first and last and len(values) > 1 else "-"
        rows.append((be, method, *cells, ratio))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]

    def line(cells):
        return "  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(cells, widths)))

    title = f"step memory, MiB, against {c['parameter']}"
    return "\n".join([title, line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def plot_sweep(result: dict, path, *, title: str = "") -> None:
    """Step memory and final test accuracy against the swept value, a line per backend x method
    (a colour per method, a line style per backend), so the memory lines show their slopes.
    """
    plt = _pyplot()
    parameter = result["config"]["parameter"]
    series = _series(result)
    backends = list(dict.fromkeys(be for be, _ in series))
    methods = list(dict.fromkeys(m for _, m in series))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    for (be, method), pts in series.items():
        style = dict(color=colors[methods.index(method) % len(colors)],
                     linestyle=_STYLES[backends.index(be) % len(_STYLES)], marker="o")  # fmt: skip
        xs = [v for v, _ in pts]
        ax1.plot(xs, [_mib(r) for _, r in pts], label=f"{be} {method}", **style)
        ax2.plot(xs, [r.get("test_accuracy", float("nan")) for _, r in pts], **style)
    values = [p["value"] for p in result["points"]]
    for ax, ylabel in ((ax1, "step memory, MiB"), (ax2, "final test accuracy")):
        if parameter == "batch_size":
            ax.set_xscale("log", base=2)
        ax.set_xticks(values, [str(v) for v in values])
        ax.set_xlabel(parameter.replace("_", " ") + (" (hidden layers)" if parameter == "depth" else ""))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax1.set_ylim(bottom=0)
    ax1.set_title("arrays alive in a step beyond params, optimizer state, batch", fontsize=8)
    ax1.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
