"""K tangents on the MNIST MLP: one stacked product against vmap of the framework's jvp.

Times, in one process and interleaved round by round (so a busy machine moves every row
alike), ``Trainer.step`` for backprop and for forward gradients with K tangents: dense
Rademacher and normal tangents through duogard's rules (``jvp="rules"``: a layer's K tangents
in one product), the same through ``vmap`` of the framework's jvp (``jvp="framework"``), and
rank-1 tangents. Prints median ms per step and the ratio to backprop, with the issue's limits
(K=16: dense Rademacher <= 13x backprop, rank-1 <= 5x).

    python benchmarks/k_tangents.py [--backends jax,torch] [--k 16] [--rounds 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import duogard as dg
from duogard import nn, optim

LIMITS = {"rademacher rules": 13.0, "rank1 rules": 5.0}


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(1024), nn.relu, nn.Linear(1024), nn.relu, nn.Linear(10))


def _methods(k: int) -> dict:
    fwd = lambda **o: dg.estimator("forward", num_tangents=k, **o)  # noqa: E731
    return {
        "backprop": "backprop",
        "rademacher rules": fwd(distribution="rademacher", jvp="rules"),
        "rademacher framework": fwd(distribution="rademacher", jvp="framework"),
        "normal rules": fwd(distribution="normal", jvp="rules"),
        "normal framework": fwd(distribution="normal", jvp="framework"),
        "rank1 rules": fwd(distribution="rademacher", tangents="rank1"),
    }


def run(backends, k: int, rounds: int) -> list[dict]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    model = _mlp()
    p0 = model.init(0, x)
    rows = []
    for name in backends:
        be = dg.backend(name)
        xb, yb = be.asarray(x), be.asarray(y)
        steps = {}
        for label, est in _methods(k).items():
            tr = dg.Trainer(model, estimator=est, optimizer=optim.sgd(1e-3), backend=be, grad_norm=False)
            params, state = tr.init_state(p0)
            params, state, loss, _ = tr.step(params, state, xb, yb, be.key(0))  # compile
            float(loss)
            steps[label] = [tr, params, state, []]
        for r in range(rounds):
            for entry in steps.values():
                tr, params, state, times = entry
                t0 = time.perf_counter()
                params, state, loss, _ = tr.step(params, state, xb, yb, be.key(r + 1))
                float(loss)
                times.append(time.perf_counter() - t0)
                entry[1], entry[2] = params, state
        bp = statistics.median(steps["backprop"][3])
        for label, (_, _, _, times) in steps.items():
            ms = statistics.median(times) * 1e3
            ratio = statistics.median(times) / bp
            limit = LIMITS.get(label)
            verdict = "" if limit is None else ("PASS" if ratio <= limit else "MISS")
            rows.append(
                dict(backend=name, k=k, method=label, ms=ms, ratio=ratio, limit=limit, verdict=verdict)
            )
            print(
                f"{name:6s} K={k:<3d} {label:22s} {ms:9.2f} ms  {ratio:6.2f}x backprop  {verdict}", flush=True
            )
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="jax,torch")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = run(args.backends.split(","), args.k, args.rounds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
