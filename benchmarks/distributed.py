"""Data-parallel forward gradients against backprop: what goes on the wire, and the step time.

For each backend and each process count (``--procs 1,2,4``) the script launches
``torchrun --nproc-per-node N`` on loopback; every rank runs ``fit(..., distributed=True)`` for
the MLP and the CNN with backprop and forward gradients (K = ``--k``) and rank 0 reports the
numbers each rank sends per step (K + 1 against P + 1) and the median step time. Each launch
also times the backend's all-reduce (``be.all_reduce_sum`` in ``be.dist_step``) for messages of
1 to 10^6 numbers, and fits ``t(n) = a + b n`` (per-message latency a, time per number b), the
inputs of the paper calculation in ``benchmarks/RESULTS-distributed.md``.

``python benchmarks/distributed.py [--procs 1,2] [--backends torch,jax] [--steps 30] [--small]
[--json FILE]``  (``--small``: narrow models, for a shared machine)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = (1, 17, 1_000, 100_000, 1_000_000)


def _worker(a) -> None:
    """One rank: the fits and the all-reduce timings; rank 0 writes them to ``a.out``."""
    import numpy as np

    import duogard as dg

    be = dg.backend(a.backend)
    if a.backend == "torch":
        import torch

        torch.set_num_threads(1)
    data = dg.data.load("digits")
    hidden, channels = ((64,), 8) if a.small else ((256, 256), 16)
    rows = []
    for model_name in ("mlp", "cnn"):
        model = dg.train.build_model(model_name, 10, hidden=hidden, channels=channels, cnn_hidden=64)
        params = model.init(0, data.example_input)
        for method in ("backprop", "forward"):
            est = dg.estimator("forward", num_tangents=a.k) if method == "forward" else "backprop"
            dp = dg.train.DataParallel(timeout=120)
            r = dg.fit(model, params, data, estimator=est, backend=a.backend, steps=a.steps,
                       batch_size=a.batch, callbacks=[], distributed=dp)  # fmt: skip
            rows.append({"model": model_name, "method": method, "params": dg.tree.tree_size(params),
                         "numbers_per_step": dp.numbers_per_step, "step_ms": 1e3 * r.time_per_step,
                         "first_step_s": r.first_step_seconds})  # fmt: skip
    reduce = be.dist_step(lambda x: be.all_reduce_sum(x), sharded=(False,))
    timings = []
    for n in SIZES:
        x = be.asarray(np.ones(n, np.float32))
        be.to_numpy(reduce(x))  # compile / warm up
        reps = 20 if n < 100_000 else 5
        t0 = time.perf_counter()
        for _ in range(reps):
            be.to_numpy(reduce(x))
        timings.append({"numbers": n, "seconds": (time.perf_counter() - t0) / reps})
    if int(os.environ["RANK"]) == 0:
        Path(a.out).write_text(json.dumps({"rows": rows, "allreduce": timings}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(backend: str, procs: int, a) -> dict:
    out = Path(tempfile.mkdtemp()) / "out.json"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc-per-node", str(procs), "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), __file__, "--worker", "--backend", backend,
           "--out", str(out), "--steps", str(a.steps), "--k", str(a.k), "--batch", str(a.batch)]  # fmt: skip
    if a.small:
        cmd.append("--small")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode or not out.exists():
        raise SystemExit(f"{backend} x{procs} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(out.read_text())


def _fit_line(timings: list[dict]) -> tuple[float, float]:
    """Least squares ``t = a + b n``: (latency a in s, seconds per number b)."""
    import numpy as np

    n = np.array([t["numbers"] for t in timings], float)
    t = np.array([t["seconds"] for t in timings], float)
    b, a = np.polyfit(n, t, 1)
    return float(max(a, 0.0)), float(max(b, 0.0))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", default="1,2,4")
    p.add_argument("--backends", default="torch,jax")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--k", type=int, default=16, help="forward gradients' tangents per step")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--small", action="store_true", help="narrow models (a shared machine)")
    p.add_argument("--json", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        _worker(a)
        return 0
    results = []
    print(f"{'backend':8} {'procs':>5} {'model':5} {'method':9} {'params':>9} {'sent/step':>10} "
          f"{'step ms':>8}")  # fmt: skip
    for backend in a.backends.split(","):
        for procs in (int(x) for x in a.procs.split(",")):
            got = _launch(backend, procs, a)
            lat, per = _fit_line(got["allreduce"])
            for row in got["rows"]:
                print(f"{backend:8} {procs:>5} {row['model']:5} {row['method']:9} {row['params']:>9,} "
                      f"{row['numbers_per_step']:>10,} {row['step_ms']:>8.2f}", flush=True)  # fmt: skip
            print(
                f"{backend:8} {procs:>5} all-reduce: latency {1e6 * lat:.0f} us, "
                f"{1e9 * per:.2f} ns/number ({4 / max(per, 1e-15) / 1e9:.2f} GB/s of float32)",
                flush=True,
            )
            results.append({"backend": backend, "procs": procs, **got, "latency_s": lat, "s_per_number": per})
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
