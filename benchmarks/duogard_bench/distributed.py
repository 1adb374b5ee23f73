"""Section 6 of ``duogard bench``: data-parallel forward gradients against backprop.

For each backend and each process count the section launches ``torchrun --nproc-per-node N -m
duogard_bench.distributed --worker ...`` on loopback; every rank runs ``fit(...,
distributed=DataParallel())`` for the MLP and the CNN with backprop and forward gradients (K
tangents), and rank 0 reports the numbers each rank sends per step (K + 1 against P + 1) and the
median step time. Each launch also times the backend's all-reduce (``be.all_reduce_sum`` inside
``be.dist_step``) for messages of 1 to 10^6 numbers and fits ``t(n) = a + b n``: the per-message
latency ``a`` and the time per number ``b``, the inputs of the paper calculation in
``benchmarks/RESULTS-distributed.md``. ``benchmarks/distributed.py`` runs this section alone.
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

__all__ = ["ALLREDUCE_SIZES", "distributed_section", "fit_line", "print_distributed", "main"]

#: message sizes (numbers) of the all-reduce timing
ALLREDUCE_SIZES = (1, 17, 1_000, 100_000, 1_000_000)


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
    for n in ALLREDUCE_SIZES if not a.small else ALLREDUCE_SIZES[:4]:
        x = be.asarray(np.ones(n, np.float32))
        be.to_numpy(reduce(x))  # compile / warm up
        reps = 20 if n < 100_000 else 5
        t0 = time.perf_counter()
        for _ in range(reps):
            be.to_numpy(reduce(x))
        timings.append({"numbers": n, "seconds": (time.perf_counter() - t0) / reps})
    if int(os.environ["RANK"]) == 0:
        Path(a.out).write_text(json.dumps({"rows": rows, "allreduce": timings}))
    # leave the group before the interpreter exits: a gloo group torn down at exit can abort
    # ("terminate called without an active exception") after the figures are written
    be.dist_shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(backend: str, procs: int, *, steps: int, k: int, batch: int, small: bool) -> dict:
    out = Path(tempfile.mkdtemp()) / "out.json"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc-per-node", str(procs), "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "duogard_bench.distributed", "--worker",
           "--backend", backend, "--out", str(out), "--steps", str(steps), "--k", str(k),
           "--batch", str(batch)]  # fmt: skip
    if small:
        cmd.append("--small")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if not out.exists():
        raise RuntimeError(f"{backend} x{procs} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    got = json.loads(out.read_text())
    if proc.returncode:  # the figures were written; a rank failed after (kept, and said)
        got["exit_warning"] = f"exit code {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}"
    return got


def fit_line(timings: list[dict]) -> tuple[float, float]:
    """Least squares ``t = a + b n`` over the all-reduce timings: (latency a in s, seconds per
    number b), each at least 0.
    """
    import numpy as np

    n = np.array([t["numbers"] for t in timings], float)
    t = np.array([t["seconds"] for t in timings], float)
    b, a = np.polyfit(n, t, 1)
    return float(max(a, 0.0)), float(max(b, 0.0))


def distributed_section(
    *, procs=(1, 2, 4), backends=("torch", "jax"), steps: int = 30, k: int = 16, batch: int = 64,
    small: bool = False, log=print,
) -> list[dict]:  # fmt: skip
    """Launch every (backend, process count) and collect its records.

    Returns:
        One record per launch: ``backend``, ``procs``, ``rows`` (model, method, params,
        numbers_per_step, step_ms, first_step_s), ``allreduce`` (numbers, seconds),
        ``latency_s`` and ``s_per_number`` (the fitted line), or ``error`` when it failed.
    """
    records = []
    for backend in backends:
        for n in procs:
            t0 = time.perf_counter()
            try:
                got = _launch(backend, n, steps=steps, k=k, batch=batch, small=small)
            except RuntimeError as exc:
                log(f"  {backend} x{n}: FAILED ({str(exc).splitlines()[0]})")
                records.append({"backend": backend, "procs": n, "error": str(exc)[-2000:]})
                continue
            lat, per = fit_line(got["allreduce"])
            records.append({"backend": backend, "procs": n, **got, "latency_s": lat, "s_per_number": per,
                            "launch_s": round(time.perf_counter() - t0, 1)})  # fmt: skip
    return records


def print_distributed(records: list[dict], log=print, *, k: int = 16) -> None:
    """The section's table: per launch and row the numbers sent per step and the step time, the
    forward/backprop ratio, and the all-reduce's fitted latency and bandwidth.
    """
    log(f"\ndata-parallel (torchrun on loopback; forward K = {k}): numbers each rank sends per step")
    log(f"{'backend':8} {'procs':>5} {'model':5} {'method':9} {'params':>9} {'sent/step':>10} "
        f"{'step ms':>8} {'fwd/bp':>7}")  # fmt: skip
    for rec in records:
        if "error" in rec:
            log(f"{rec['backend']:8} {rec['procs']:>5} FAILED")
            continue
        bp = {r["model"]: r["step_ms"] for r in rec["rows"] if r["method"] == "backprop"}
        for r in rec["rows"]:
            base = bp.get(r["model"]) if r["method"] != "backprop" else None
            ratio = r["step_ms"] / base if base else None
            log(f"{rec['backend']:8} {rec['procs']:>5} {r['model']:5} {r['method']:9} {r['params']:>9,} "
                f"{r['numbers_per_step']:>10,} {r['step_ms']:>8.2f} "
                + (f"{ratio:>6.2f}x" if ratio else f"{'':>7}"))  # fmt: skip
        per = rec["s_per_number"]
        log(
            f"{rec['backend']:8} {rec['procs']:>5} all-reduce: latency {1e6 * rec['latency_s']:.0f} us, "
            f"{1e9 * per:.2f} ns/number ({4 / max(per, 1e-15) / 1e9:.2f} GB/s of float32)"
        )


def main(argv=None) -> int:
    """``python -m duogard_bench.distributed`` (and ``benchmarks/distributed.py``): this section alone."""
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
    a = p.parse_args(argv)
    if a.worker:
        _worker(a)
        return 0
    records = distributed_section(
        procs=tuple(int(x) for x in a.procs.split(",")),
        backends=tuple(a.backends.split(",")),
        steps=a.steps,
        k=a.k,
        batch=a.batch,
        small=a.small,
    )
    print_distributed(records, k=a.k)
    if a.json:
        Path(a.json).write_text(json.dumps(records, indent=1))
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
