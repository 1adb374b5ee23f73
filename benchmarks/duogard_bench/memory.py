"""Section 3: step memory (and the process's peak RSS) against MLP depth, each configuration in a
fresh subprocess (``python -m duogard_bench --memory-worker SPEC``), and the lean forward steps
written in bare framework code (``hand-lean``).
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import json
import os
import subprocess
import sys

import numpy as np

from ._common import LR, Sizes, ratio_of
from .hand_jax import jax_hand
from .hand_torch import torch_hand
from .workloads import duogard_step, layers_of

__all__ = ["jax_lean", "memory_section", "memory_worker", "run_workers", "torch_lean", "worker_main"]

# run_workers starts each worker as ``python -m duogard_bench --memory-worker SPEC`` (see __main__.py)
WORKER_MODULE = "duogard_bench"


def _proc_kb(field_name: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_worker(spec: dict) -> dict:
    """Runs in a fresh subprocess: the step memory of one MLP configuration (the backend's
    ``step_memory``, as ``fit`` reports it: the arrays alive within a step beyond params,
    optimizer state and batch), and the process's peak RSS over a few steps.

    Args:
        spec: ``backend``, ``method`` (``"backprop"`` or ``"forward"``), ``impl`` (``"duogard"``,
            ``"duogard-lean"``, ``"hand"``, ``"hand-lean"``), ``depth``, ``width``, ``batch``,
            ``steps`` and ``torch_threads`` (None: torch's default).

    Returns:
        The parameters' bytes, the step memory, and the RSS before and after the first step
        and at its peak.
    """
    backend, method, impl = spec["backend"], spec["method"], spec["impl"]
    depth, width, batch, steps = spec["depth"], spec["width"], spec["batch"], spec["steps"]
    if backend == "jax":
        importlib.import_module("jax")
    else:
        import torch

        if spec.get("torch_threads"):
            torch.set_num_threads(spec["torch_threads"])
    import duogard as dg
    from duogard.train import build_model

    be = dg.backend(backend)

    rng = np.random.default_rng(0)

    def make(d, w, b):
        model = build_model("mlp", 10, hidden=(w,) * d)
        x_np = rng.standard_normal((b, 1, 28, 28)).astype(np.float32)
        y_np = rng.integers(0, 10, b).astype(np.int64)
        params_np = model.init(0, x_np)
        nbytes = sum(a.nbytes for layer in params_np.values() for a in layer.values())
        est = "backprop" if method == "backprop" else "fwd-K1-normal"
        if impl in ("duogard", "duogard-lean"):
            run = duogard_step(backend, model, params_np, x_np, y_np, est, lean=impl == "duogard-lean")[0]
            return run, nbytes
        # hand-written JAX steps compile with the backend's jit (jax.jit, observed), so that
        # step_memory sees their programs as it sees duogard's
        if impl == "hand":
            ops = ["flatten"] + ["linear", "relu"] * d + ["linear"]
            if backend == "torch":
                return torch_hand(ops, layers_of(params_np), x_np, y_np, est, "hand")[0], nbytes
            return jax_hand(ops, layers_of(params_np), x_np, y_np, est, jit=be.jit)[0], nbytes
        if backend == "torch":
            return torch_lean(params_np, x_np, y_np), nbytes
        return jax_lean(params_np, x_np, y_np, jit=be.jit), nbytes

    # load the libraries a step uses lazily (torch.func, XLA's compiler ...) with a small model,
    # so the baseline below holds them and the measured peak is the step's own
    small, _ = make(1, 8, 2)
    small()
    small()
    del small
    run, params_bytes = make(depth, width, batch)
    _trim()
    base = _proc_kb("VmRSS")
    run()  # compilation / first step, outside the measured peak
    _trim()
    warm = _proc_kb("VmRSS")
    exact = _reset_peak()
    for _ in range(steps):
        run()
    peak = _proc_kb("VmHWM")
    step_memory = be.step_memory(run)  # one more step, after the RSS peak is read
    return {
        "params_bytes": params_bytes,
        "step_memory_bytes": step_memory,
        "baseline_bytes": base,
        "after_first_step_bytes": warm,
        "peak_bytes": peak,
        "peak_reset": exact,
    }


def torch_lean(params_np, x_np, y_np):
    """Forward gradient that never holds a whole tangent: each layer's tangent is drawn from a
    per-layer seed when the JVP reaches it, then drawn again from the same seed for the update."""
    import torch
    import torch.nn.functional as F

    layers = [{k: torch.tensor(v) for k, v in layer.items()} for layer in layers_of(params_np)]
    x, y = torch.tensor(x_np).flatten(1), torch.tensor(y_np)
    gen = torch.Generator()
    state = {"i": 0}

    def tangent(step, i, shape):
        gen.manual_seed(step * 1_000_003 + i)
        return torch.randn(shape, generator=gen)

    @torch.no_grad()
    def run():
        s = state["i"]
        h, hd = x, None
        for i, layer in enumerate(layers):
            w, b = layer["weight"], layer["bias"]
            z = F.linear(h, w, b)
            zd = F.linear(h, tangent(s, 2 * i, w.shape), tangent(s, 2 * i + 1, b.shape))
            if hd is not None:
                zd.addmm_(hd, w.T)
            if i < len(layers) - 1:
                zd.mul_(z > 0)
                z.relu_()
            h, hd = z, zd
        logp = torch.log_softmax(h, -1)
        value = -logp.gather(1, y[:, None]).mean()
        d = float(((hd * logp.exp()).sum(-1) - hd.gather(1, y[:, None])[:, 0]).mean())
        for i, layer in enumerate(layers):
            layer["weight"].add_(tangent(s, 2 * i, layer["weight"].shape), alpha=-LR * d)
            layer["bias"].add_(tangent(s, 2 * i + 1, layer["bias"].shape), alpha=-LR * d)
        state["i"] = s + 1
        return value

    return run


def jax_lean(params_np, x_np, y_np, *, jit=None):
    """The same on JAX, one jitted program per layer (XLA keeps every tangent of a whole-model
    program alive at once: its temp buffer at depth 32 is 2.5x the parameters): the layer's
    JVP draws its tangent from the layer's key; the update (donated, in place) draws it again.
    ``jit`` compiles each program (None: ``jax.jit``)."""
    import jax
    import jax.numpy as jnp

    jit = jax.jit if jit is None else jit

    layers = [jax.tree.map(jnp.asarray, layer) for layer in layers_of(params_np)]
    x, y = jnp.asarray(x_np).reshape(x_np.shape[0], -1), jnp.asarray(y_np, dtype=jnp.int32)
    n = len(layers)

    def tangents(key, layer):
        kw, kb = jax.random.split(key)
        return (
            jax.random.normal(kw, layer["weight"].shape, layer["weight"].dtype),
            jax.random.normal(kb, layer["bias"].shape, layer["bias"].dtype),
        )

    @jit
    def first(layer, h, key):
        vw, vb = tangents(key, layer)
        return h @ layer["weight"].T + layer["bias"], h @ vw.T + vb

    @jit
    def middle(layer, h, hd, key):
        vw, vb = tangents(key, layer)
        return h @ layer["weight"].T + layer["bias"], h @ vw.T + vb + hd @ layer["weight"].T

    @jit
    def relu(z, zd):
        return jnp.maximum(z, 0), jnp.where(z > 0, zd, 0)

    @jit
    def head(z, zd):
        logp = jax.nn.log_softmax(z)
        value = -jnp.take_along_axis(logp, y[:, None], 1).mean()
        d = ((zd * jnp.exp(logp)).sum(-1) - jnp.take_along_axis(zd, y[:, None], 1)[:, 0]).mean()
        return value, d

    def update_one(layer, key, d):
        vw, vb = tangents(key, layer)
        return {"weight": layer["weight"] - (LR * d) * vw, "bias": layer["bias"] - (LR * d) * vb}

    update_one = jit(update_one, donate_argnums=0)
    state = {"p": layers, "i": 0}

    def run():
        key = jax.random.fold_in(jax.random.key(0), state["i"])
        p = state["p"]
        h, hd = first(p[0], x, jax.random.fold_in(key, 0))
        for i in range(1, n):
            h, hd = relu(h, hd)
            h, hd = middle(p[i], h, hd, jax.random.fold_in(key, i))
        value, d = head(h, hd)
        state["p"] = [update_one(layer, jax.random.fold_in(key, i), d) for i, layer in enumerate(p)]
        del p
        jax.block_until_ready(state["p"])
        state["i"] += 1
        return value

    return run


def memory_section(sz: Sizes, log) -> list[dict]:
    """Every memory configuration of the run, each in its own subprocess.

    Args:
        sz: the run's sizes.
        log: prints a line.

    Returns:
        The ``memory`` records, with each configuration's ratio to the reference depth.
    """
    specs = []
    for backend in sz.mem_backends:
        for method, impl in sz.mem_runs:
            for depth in sz.depths:
                specs.append(
                    {
                        "backend": backend,
                        "method": method,
                        "impl": impl,
                        "depth": depth,
                        "width": sz.mem_width,
                        "batch": sz.mem_batch,
                        "steps": sz.mem_steps,
                        "torch_threads": 1 if sz.mode == "tiny" else None,
                    }
                )
    results = run_workers(specs, sz.parallel_subprocesses)
    recs = []
    for spec, res in zip(specs, results):
        rec = {
            "section": "memory",
            **{k: spec[k] for k in ("backend", "method", "impl", "depth", "width", "batch")},
        }
        if "error" in res:
            rec["error"] = res["error"]
        else:
            mb = 2**20
            rec.update(
                params_mb=res["params_bytes"] / mb,
                step_memory_mb=res["step_memory_bytes"] / mb,
                baseline_mb=res["baseline_bytes"] / mb,
                peak_beyond_params_mb=(res["peak_bytes"] - res["baseline_bytes"]) / mb,
                peak_beyond_first_step_mb=(res["peak_bytes"] - res["after_first_step_bytes"]) / mb,
                peak_reset=res["peak_reset"],
            )
        recs.append(rec)
    for rec in recs:
        ref_depth = 4 if 4 in sz.depths and 4 < max(sz.depths) else min(sz.depths)
        same = ("backend", "method", "impl")
        ref = [r for r in recs if r["depth"] == ref_depth and all(r[k] == rec[k] for k in same)]
        if ref and "step_memory_mb" in rec and "step_memory_mb" in ref[0]:
            rec["ratios"] = {
                f"to_depth_{ref_depth}": ratio_of(rec["step_memory_mb"], ref[0]["step_memory_mb"]),
                f"rss_to_depth_{ref_depth}": ratio_of(
                    rec["peak_beyond_params_mb"], ref[0]["peak_beyond_params_mb"]
                ),
            }
    log(f"  {len(specs)} subprocesses")
    return recs


def run_workers(specs, parallel: int) -> list[dict]:
    """Each spec in a fresh ``python -m duogard_bench --memory-worker`` process, ``parallel`` at a time.

    Args:
        specs: the worker specs (see :func:`memory_worker`).
        parallel: how many workers run at once.

    Returns:
        Each worker's result, in the order of ``specs``; ``{"error": ...}`` for a worker that failed.
    """
    results: list[dict | None] = [None] * len(specs)
    pending = list(enumerate(specs))
    running: list = []
    env = dict(os.environ)
    while pending or running:
        while pending and len(running) < max(parallel, 1):
            i, spec = pending.pop(0)
            # large blocks always come from (and go back to) mmap, so RSS follows live memory
            env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
            cmd = [sys.executable, "-m", WORKER_MODULE, "--memory-worker", json.dumps(spec)]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            running.append((i, proc))
        i, proc = running.pop(0)
        out, err = proc.communicate(timeout=600)
        try:
            results[i] = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            tail = (err or out or "").strip().splitlines()
            last = tail[-1][:200] if tail else "?"
            results[i] = {"error": f"worker failed (exit {proc.returncode}): {last}"}
    return results


def worker_main(spec_json: str) -> int:
    """Run :func:`memory_worker` and print its result as one line of JSON (an error is reported there).

    Args:
        spec_json: the spec, as JSON.

    Returns:
        0.
    """
    try:
        res = memory_worker(json.loads(spec_json))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, never hidden
        res = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    print(json.dumps(res))
    return 0
