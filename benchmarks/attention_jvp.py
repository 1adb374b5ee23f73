"""The blockwise attention's JVP (``be.attention``) against the math form: step memory and time.

For each backend and sequence length (queries = keys = L; batch 1, 4 heads of 64, float32,
blocks of 512 keys (``--block``), no mask unless ``--causal``):

- memory: the step memory of one JVP along tangents of q, k and v (``be.step_memory``: XLA's
  temp and output bytes of the compiled JVP on JAX, the storages the call allocates on torch),
  for the blockwise op and for the math form (``softmax(q kᵀ / sqrt(D)) v`` written out,
  differentiated by the framework's own jvp);
- time: the blockwise forward, its JVP (value and tangent), the math form's forward and JVP,
  and the framework's own fused forward (``jax.nn.dot_product_attention``,
  ``F.scaled_dot_product_attention``: neither has a JVP that duogard can use, torch's none at
  all), interleaved round-robin; medians of wall time and of this process's CPU time (the
  second is steadier where other processes share the cores).

The targets (issue 28): the JVP's memory linear in L, the JVP within 3x the forward. torch runs
one intra-op thread (``--threads``), JAX its own pool.

    python benchmarks/attention_jvp.py                   # L = 1024, 2048, 4096
    python benchmarks/attention_jvp.py --quick           # L = 256, 512, 1024, fewer rounds
    python benchmarks/attention_jvp.py --tiny            # a smoke test: L = 64, 128, blocks of 16
    python benchmarks/attention_jvp.py --json FILE       # also write every figure
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

import duogard as dg
from duogard_bench._common import format_table, machine_info, median


def _math(be, q, k, v, causal):
    xp = be.xp
    s = xp.matmul(q, xp.matrix_transpose(k)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        keep = be.asarray(np.tril(np.ones((q.shape[-2], k.shape[-2]), dtype=bool)))
        s = xp.where(keep, s, xp.full_like(s, -math.inf))
    return xp.matmul(be.softmax(s, axis=-1), v)


def _native(be, causal):
    """The framework's own attention forward, on (batch, heads, L, D) arrays."""
    if be.name == "jax":
        import jax

        # its layout is (batch, L, heads, D): the transposes are part of what it costs here
        def fused(q, k, v):
            t = (0, 2, 1, 3)
            q, k, v = q.transpose(t), k.transpose(t), v.transpose(t)
            return jax.nn.dot_product_attention(q, k, v, is_causal=causal).transpose(t)

        return be.jit(fused)
    import torch.nn.functional as F

    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _programs(be, causal, block):
    """``{name: (function, number of array arguments)}`` for one backend."""

    def blockwise(q, k, v):
        return be.attention(q, k, v, causal=causal, block=block)

    def plain(q, k, v):
        return _math(be, q, k, v, causal)

    def jvp_of(f):
        return lambda q, k, v, dq, dk, dv: be.jvp(f, (q, k, v), (dq, dk, dv))

    return {
        "fwd": (be.jit(blockwise), 3),
        "jvp": (be.jit(jvp_of(blockwise)), 6),
        "math-fwd": (be.jit(plain), 3),
        "math-jvp": (be.jit(jvp_of(plain)), 6),
        "native-fwd": (_native(be, causal), 3),
    }


def measure(be, length, *, heads, dim, rounds, causal, block=512):
    """One row: memory and median times of the programs at ``length``."""
    rng = np.random.default_rng(length)
    arrays = [be.asarray(rng.standard_normal((1, heads, length, dim)), dtype="float32") for _ in range(6)]
    programs = _programs(be, causal, block)
    row = {"backend": be.name, "length": length}
    for fn, n in programs.values():  # compiled (JAX) and warm before anything is measured
        be.synchronize(fn(*arrays[:n]))
    for name in ("jvp", "math-jvp"):
        fn, n = programs[name]
        row[f"{name}-bytes"] = be.step_memory(fn, *arrays[:n])
    wall = {name: [] for name in programs}
    cpu = {name: [] for name in programs}
    for _ in range(rounds):
        for name, (fn, n) in programs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            be.synchronize(fn(*arrays[:n]))
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    for name in programs:
        row[f"{name}-ms"] = 1e3 * median(wall[name])
        row[f"{name}-cpu-ms"] = 1e3 * median(cpu[name])
    for clock in ("", "-cpu"):
        row[f"jvp/fwd{clock}"] = row[f"jvp{clock}-ms"] / row[f"fwd{clock}-ms"]
        row[f"jvp/native-fwd{clock}"] = row[f"jvp{clock}-ms"] / row[f"native-fwd{clock}-ms"]
    return row


def _table(rows) -> str:
    out = []
    for r in rows:
        prev = [q for q in rows if q["backend"] == r["backend"] and 2 * q["length"] == r["length"]]
        growth = f"{r['jvp-bytes'] / prev[0]['jvp-bytes']:.2f}" if prev else "-"
        out.append(
            [
                r["backend"],
                r["length"],
                f"{r['jvp-bytes'] / 2**20:.1f}",
                growth,
                f"{r['math-jvp-bytes'] / 2**20:.1f}",
                f"{r['fwd-ms']:.1f}",
                f"{r['jvp-ms']:.1f}",
                f"{r['jvp/fwd']:.2f}",
                f"{r['jvp/fwd-cpu']:.2f}",
                f"{r['native-fwd-ms']:.1f}",
                f"{r['jvp/native-fwd-cpu']:.2f}",
                f"{r['math-fwd-ms']:.1f}",
                f"{r['math-jvp-ms']:.1f}",
            ]
        )
    headers = [
        "backend",
        "L",
        "JVP MiB",
        "x per 2L",
        "math JVP MiB",
        "fwd ms",
        "JVP ms",
        "JVP/fwd",
        "(CPU)",
        "fused fwd ms",
        "JVP/fused (CPU)",
        "math fwd ms",
        "math JVP ms",
    ]
    return format_table(headers, out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="L = 256, 512, 1024, 3 rounds")
    p.add_argument("--tiny", action="store_true", help="a smoke test: L = 64, 128, 1 head of 8, blocks of 16")
    p.add_argument("--lengths", default=None, help="comma-separated sequence lengths")
    found = ",".join(b.name for b in dg.available_backends() if b.available)
    p.add_argument("--backends", default=found, help="comma-separated (default: every one installed)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7; --quick 3)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--causal", action="store_true", help="a causal mask")
    p.add_argument("--block", type=int, default=512, help="keys per block")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--json", default=None, help="write every figure here")
    a = p.parse_args(argv)
    if a.tiny:
        a.heads, a.dim, a.block = 1, 8, 16
    default = "64,128" if a.tiny else "256,512,1024" if a.quick else "1024,2048,4096"
    lengths = [int(n) for n in (a.lengths or default).split(",")]
    rounds = a.rounds or (1 if a.tiny else 3 if a.quick else 7)
    if "torch" in a.backends:
        import torch

        torch.set_num_threads(a.threads)
    info = machine_info(" ".join(sys.argv))  # after the threads are set: it records them
    print(f"# {info['cpu']}, {info['cores']} cores, load {info['load_average']}; torch threads {a.threads}")
    print(f"# batch 1, {a.heads} heads of {a.dim}, float32, blocks of {a.block} keys, causal={a.causal}")
    rows = []
    for name in a.backends.split(","):
        be = dg.backend(name)
        for length in lengths:
            r = measure(be, length, heads=a.heads, dim=a.dim, rounds=rounds, causal=a.causal, block=a.block)
            rows.append(r)
            print(
                f"{name} L={length}: JVP memory {r['jvp-bytes'] / 2**20:.1f} MiB (math "
                f"{r['math-jvp-bytes'] / 2**20:.1f}), JVP/forward {r['jvp/fwd']:.2f} "
                f"(CPU time {r['jvp/fwd-cpu']:.2f})",
                flush=True,
            )
    print()
    print(_table(rows))
    info["load_average_end"] = machine_info("")["load_average"]
    print(f"# load at the end {info['load_average_end']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": info, "block": a.block, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
