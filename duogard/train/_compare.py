"""``duogard compare``: every backend x gradient method, the same budget, one table and one plot."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MethodSpec", "parse_method", "DEFAULT_METHODS", "compare", "format_table", "plot_runs"]

#: the methods ``duogard compare`` runs by default, with SGD learning rates tuned for the
#: digits MLP (a sweep on seed 0; forward estimates are noisier and take smaller steps)
DEFAULT_METHODS = (
    "backprop:lr=0.2",
    "forward:lr=0.005",
    "forward:num_tangents=16,distribution=rademacher,lr=0.03",
    "forward-activity:layerwise=true,lr=0.05",
)

#: default SGD learning rates per estimator family, when a method names none
DEFAULT_LR = {"backprop": 0.1, "forward-exact": 0.1, "forward": 0.01, "forward-activity": 0.03}


@dataclass(frozen=True)
class MethodSpec:
    """A gradient method as written on the command line: ``name[:option=value,...]``.

    Options go to the estimator, except ``lr``: the method's own learning rate.
    """

    name: str
    options: tuple[tuple[str, Any], ...] = ()
    lr: float | None = None

    @property
    def label(self) -> str:
        if not self.options:
            return self.name
        return self.name + "(" + ",".join(f"{k}={v}" for k, v in self.options) + ")"

    def learning_rate(self, default: float | None = None) -> float:
        """This method's lr: its own ``lr=``, else ``default``, else the family default."""
        if self.lr is not None:
            return self.lr
        return default if default is not None else DEFAULT_LR.get(self.name, 0.01)

    def build(self):
        from duogard.grad import estimator

        return estimator(self.name, **dict(self.options))


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_method(spec: str) -> MethodSpec:
    """``"forward:num_tangents=4,distribution=rademacher"`` -> MethodSpec (validated by building it)."""
    name, _, rest = spec.strip().partition(":")
    opts, lr = [], None
    for item in filter(None, (p.strip() for p in rest.split(","))):
        k, eq, v = item.partition("=")
        if not eq:
            raise ValueError(f"--grad: expected option=value in {spec!r}, got {item!r}")
        k = k.strip().replace("-", "_")
        if k == "lr":
            lr = float(v)
            if not lr > 0:
                raise ValueError(f"--grad: lr must be > 0 in {spec!r}, got {v!r}")
        else:
            opts.append((k, _value(v.strip())))
    m = MethodSpec(name.strip(), tuple(opts), lr)
    m.build()  # unknown names or options fail here, with the list of valid ones
    return m


def compare(*, dataset: str = "digits", model: str = "mlp", backends=None, methods=DEFAULT_METHODS,
            steps: int = 2500, batch_size: int = 64, learning_rate: float | None = None,
            decay: float = 0.0, seed: int = 0, hidden=(128,), data_dir=None,
            diagnostics_every: int = 25, out_dir="duogard-out", progress=None, log=print) -> dict:
    """Run every ``backend x method`` with the same data, initial weights, steps and batches.

    Returns ``{"config": ..., "runs": [summary + history per run]}`` and writes
    ``compare.json`` and ``compare.png`` into ``out_dir``.
    """
    import duogard as dg
    from duogard import data as _data
    from duogard import optim
    from duogard.train import build_model, fit

    if backends is None:
        backends = [b.name for b in dg.available_backends() if b.available]
    specs = [m if isinstance(m, MethodSpec) else parse_method(m) for m in methods]
    ds = _data.load(dataset, seed=seed, data_dir=data_dir)
    net = build_model(model, ds.num_classes, hidden=tuple(hidden))
    params0 = net.init(seed, ds.example_input)
    runs = []
    for be_name in backends:
        for spec in specs:
            lr = learning_rate if learning_rate is not None else spec.learning_rate()
            schedule = optim.exponential_decay(lr, rate=decay) if decay else lr
            res = fit(net, params0, ds, estimator=spec.build(), optimizer=optim.sgd(schedule),
                      backend=be_name, steps=steps, batch_size=batch_size, seed=seed,
                      diagnostics_every=diagnostics_every if spec.name != "backprop" else 0,
                      progress=progress)
            summary = res.summary() | {"method": spec.label, "learning_rate": lr}
            runs.append(summary | {"history": [{k: h[k] for k in ("step", "loss", "time") if k in h}
                                               for h in res.history]})
            if log:
                log(f"  {be_name:>5} {spec.label:<45} loss {summary['final_loss']:.4f}  "
                    f"test acc {summary['test_accuracy']:.3f}  {1e3 * summary['time_per_step']:.2f} ms/step")
    result = {"config": {"dataset": dataset, "model": model, "hidden": list(hidden), "steps": steps,
                         "batch_size": batch_size, "seed": seed, "decay": decay,
                         "backends": list(backends), "methods": [s.label for s in specs],
                         "versions": {b.name: b.version for b in dg.available_backends() if b.available}},
              "runs": runs}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.json").write_text(json.dumps(result, indent=1, default=_json_default))
        plot_runs(runs, out / "compare.png", title=f"{model} on {dataset}, {steps} steps, batch {batch_size}")
        result["files"] = [str(out / "compare.json"), str(out / "compare.png")]
    return result


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o).__name__)


def format_table(runs: list[dict]) -> str:
    """The comparison table (one row per backend x method)."""
    head = ("backend", "method", "final loss", "test acc", "ms/step", "total s", "peak MB", "cosine")
    rows = []
    for r in runs:
        cos = r.get("mean_cosine", float("nan"))
        rows.append((
            r["backend"], r["method"], f"{r['final_loss']:.4f}", f"{r['test_accuracy']:.3f}",
            f"{1e3 * r['time_per_step']:.2f}", f"{r['total_seconds']:.1f}",
            f"{r['peak_memory_bytes'] / 2**20:.1f}", "-" if math.isnan(cos) else f"{cos:.3f}",
        ))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _smooth(y: np.ndarray, k: int) -> np.ndarray:
    if k <= 1 or len(y) < k:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    head = c[1:k] / np.arange(1, k)
    return np.concatenate([head, (c[k:] - c[:-k]) / k])


def plot_runs(runs: list[dict], path, *, title: str = "") -> None:
    """Loss against step and against wall-clock, one line per run (moving average of 25)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        h = r["history"]
        step = np.array([x["step"] for x in h])
        loss = _smooth(np.array([x["loss"] for x in h], dtype=float), 25)
        t = np.array([x["time"] for x in h])
        style = "-" if r["backend"] == "jax" else "--"
        label = f"{r['backend']} {r['method']}"
        ax1.plot(step, loss, style, label=label)
        ax2.plot(t, loss, style, label=label)
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
