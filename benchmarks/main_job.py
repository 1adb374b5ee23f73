"""The main job's steps beside hand-written ones (issue 29): ``duogard compare``'s default methods
on its model (digits MLP 64-128-10, batch 64), duogard's step and a hand-written step of each
framework, timed round-robin in one process with one torch thread.

It answers two questions a reader of compare's table asks: how much of each per-step time is
duogard's own work (duogard / hand-written, limit 1.15), and whether compare's torch/JAX ratio
is the frameworks' (duogard's torch/JAX ratio over the hand-written steps' torch/JAX ratio,
limit: within 20%). ``duogard`` is the Trainer's step without the gradient norm (what the
hand-written steps compute); ``duogard-fit`` adds the norm, as ``fit`` and compare run it.

``python benchmarks/main_job.py [--rounds 7] [--json FILE]``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import numpy as np

# compare's default methods -> the bench's method names with a hand-written step (the
# hand-written forward-activity step perturbs all layers jointly, so its row is the joint one)
MAIN_JOB_METHODS = {
    "backprop": "backprop",
    "forward": "fwd-K1-normal",
    "forward:tangents=rank1,distribution=rademacher": "fwd-K1-rademacher-rank1",
    "forward:num_tangents=16,distribution=rademacher": "fwd-K16-rademacher",
    "forward-activity": "forward-activity",
}
OVER_HAND = 1.15
RATIO_AGREEMENT = 0.20


def _steps(backends):
    import duogard as dg
    from duogard_bench._common import sizes_for
    from duogard_bench.hand_jax import jax_hand
    from duogard_bench.hand_torch import torch_hand
    from duogard_bench.workloads import duogard_model, duogard_step, layers_of, ops_for

    sz = dataclasses.replace(sizes_for(quick=True), image=(64,), mlp_hidden=(128,), batch=64)
    data = dg.data.load("digits", seed=0)
    x, y = (np.asarray(a) for a in data.batch_at(0, 64, seed=0))
    x = x.reshape(64, -1).astype(np.float32)
    model = duogard_model("mlp", sz)
    params = model.init(0, x)
    ops, layers = ops_for("mlp", sz), layers_of(params)
    runs = {}
    for method in MAIN_JOB_METHODS.values():
        for b in backends:
            runs[(b, method, "duogard")] = duogard_step(b, model, params, x, y, method)[0]
            runs[(b, method, "duogard-fit")] = duogard_step(b, model, params, x, y, method, grad_norm=True)[0]
            if b == "jax":
                runs[(b, method, "hand")] = jax_hand(ops, layers, x, y, method)[0]
            else:
                runs[(b, method, "hand")] = torch_hand(ops, layers, x, y, method, "hand")[0]
    return runs


def measure(backends=("jax", "torch"), rounds: int = 7, reps: int = 100) -> dict:
    """Time every step ``rounds`` times round-robin (``reps`` steps a turn); the medians.

    Returns:
        ``{(backend, method, impl): seconds per step}``.
    """
    runs = _steps(backends)
    for run in runs.values():  # compile and warm up
        for _ in range(20):
            run()
    times: dict = {k: [] for k in runs}
    keys = list(runs)
    for r in range(rounds):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            t0 = time.perf_counter()
            for _ in range(reps):
                runs[k]()
            times[k].append((time.perf_counter() - t0) / reps)
    return {k: float(np.median(v)) for k, v in times.items()}


def rows(t: dict, backends=("jax", "torch")) -> list[dict]:
    """The table's rows: per method and backend, duogard/hand; per method, the torch/JAX ratios."""
    out = []
    for spec, method in MAIN_JOB_METHODS.items():
        rec = {"method": spec, "bench_method": method}
        for b in backends:
            for impl in ("duogard", "duogard-fit", "hand"):
                rec[f"{b}_{impl}_ms"] = 1e3 * t[(b, method, impl)]
            rec[f"{b}_over_hand"] = t[(b, method, "duogard")] / t[(b, method, "hand")]
            rec[f"{b}_fit_over_hand"] = t[(b, method, "duogard-fit")] / t[(b, method, "hand")]
        if set(backends) == {"jax", "torch"}:
            ours = t[("torch", method, "duogard")] / t[("jax", method, "duogard")]
            hand = t[("torch", method, "hand")] / t[("jax", method, "hand")]
            rec.update(torch_over_jax=ours, torch_over_jax_hand=hand, ratio_of_ratios=ours / hand)
        out.append(rec)
    return out


def report(recs: list[dict], backends=("jax", "torch")) -> str:
    """The table and the target rows, as text."""
    lines = ["duogard compare's default methods, digits MLP 64-128-10, batch 64 (ms per step; medians)"]
    impls = ("duogard", "fit", "hand")
    head = f"{'method':48s}" + "".join(f" {b + ' ' + i:>18s}" for b in backends for i in impls)
    lines += [head, "-" * len(head)]
    for r in recs:
        cells = "".join(
            f" {r[f'{b}_{i}_ms']:18.3f}" for b in backends for i in ("duogard", "duogard-fit", "hand")
        )
        lines.append(f"{r['method']:48s}" + cells)
    lines += ["", "targets"]
    for r in recs:
        for b in backends:
            v = r[f"{b}_over_hand"]
            verdict = "PASS" if v <= OVER_HAND else "MISS"
            lines.append(
                f"  {verdict}  {b:5s} {r['method']:48s} duogard/hand {v:5.2f} (limit {OVER_HAND}); "
                f"with the norm (fit) {r[f'{b}_fit_over_hand']:.2f}"
            )
    for r in recs:
        if "ratio_of_ratios" in r:
            q = r["ratio_of_ratios"]
            verdict = "PASS" if abs(q - 1) <= RATIO_AGREEMENT else "MISS"
            lines.append(
                f"  {verdict}  torch/JAX {r['method']:44s} duogard {r['torch_over_jax']:5.2f}, hand-written "
                f"{r['torch_over_jax_hand']:5.2f}: {q:.2f} of it (limit within {RATIO_AGREEMENT:.0%})"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7, help="round-robin rounds (default 7)")
    p.add_argument("--reps", type=int, default=100, help="steps per turn (default 100)")
    p.add_argument("--backends", default="jax,torch", help="comma-separated (default both)")
    p.add_argument("--json", default=None, help="write the rows here")
    a = p.parse_args(argv)
    backends = tuple(a.backends.split(","))
    if "torch" in backends:
        import torch

        torch.set_num_threads(1)
    recs = rows(measure(backends, a.rounds, a.reps), backends)
    print(report(recs, backends))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(recs, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
