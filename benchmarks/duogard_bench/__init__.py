"""The benchmark suite behind ``duogard bench``: duogard beside hand-written JAX and torch steps.

Sections: 1. step time (``step_time``, with rank-1 tangents beside dense ones and backprop), 2.
tangent cost and ways of drawing tangents (``draws``: duogard's portable generator against each
framework's own), 3. memory
against depth (``memory``, one subprocess per configuration), 4. DLPack conversion
(``conversion``), 5. compile / first-step time, 6. data-parallel runs under ``torchrun``
(``distributed``: numbers per step and step time with 1, 2 and 4 processes); then the targets
(``report``). :func:`main` runs
them; the hand-written baselines are in ``hand_jax`` and ``hand_torch``. Importing this package
imports neither JAX nor PyTorch (each section imports them inside its functions).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import time
from typing import Any

import numpy as np

from ._common import (
    BAYDIN_RATIO,
    FORWARD_METHODS,
    LR,
    METHODS,
    RANK1_METHODS,
    TARGETS,
    Sizes,
    block_until_ready,
    machine_info,
    sizes_for,
)
from .conversion import conversion_section
from .distributed import distributed_section, print_distributed
from .draws import draw_options, generator_costs
from .hand_jax import jax_apply, jax_draw_rank1, jax_hand, jax_per_example, jax_rank1_jvp
from .hand_torch import manual_jvp, torch_apply, torch_draw_rank1, torch_hand, torch_leaves
from .memory import memory_section
from .report import compile_records, json_default, print_rank1_table, print_rest, print_step_tables
from .step_time import check_losses, step_configs, step_records, time_step_configs, warm
from .targets import evaluate_targets
from .workloads import Workload, data_for, duogard_model, duogard_step, workload

__all__ = [
    "BAYDIN_RATIO",
    "FORWARD_METHODS",
    "LR",
    "METHODS",
    "RANK1_METHODS",
    "SECTIONS",
    "TARGETS",
    "Sizes",
    "Workload",
    "block_until_ready",
    "data_for",
    "duogard_step",
    "jax_apply",
    "jax_draw_rank1",
    "jax_hand",
    "jax_per_example",
    "jax_rank1_jvp",
    "main",
    "manual_jvp",
    "sizes_for",
    "torch_apply",
    "torch_draw_rank1",
    "torch_hand",
    "torch_leaves",
    "workload",
]

SECTIONS = ("step", "draw", "memory", "conversion", "distributed")


def main(
    *,
    quick: bool = False,
    json_path: str | None = None,
    tiny: bool = False,
    sections=SECTIONS,
    rank1: bool = False,
    backends=None,
) -> int:
    """Run the benchmarks, print the tables and the targets, write ``json_path`` if given.

    Args:
        quick: one configuration per row family, at small sizes (about a minute and a half
            cold on 2 cores).
        json_path: where to write every figure as JSON (nothing written if None).
        tiny: tiny sizes for the smoke test (with one torch thread while it runs).
        sections: which parts to run: ``step`` (with tangent cost and compile time), ``draw``
            (ways of drawing tangents), ``memory``, ``conversion``, ``distributed`` (torchrun
            launches: 1, 2 and 4 processes; 2 with ``quick`` and ``tiny``, torch
            only), or ``compile`` alone (first steps).
        rank1: the rank-1 run's methods (:func:`sizes_for`), at the full run's sizes.
        backends: the backends to time (default: JAX and torch, those installed).

    Returns:
        The exit code (0; 1 if a section failed outright).
    """
    if not tiny:
        return _main(
            quick=quick, json_path=json_path, tiny=tiny, sections=sections, rank1=rank1, backends=backends
        )
    # the smoke test's sizes: one torch thread, so a loaded machine does not stall its OpenMP barriers
    try:
        import torch
    except ImportError:
        return _main(
            quick=quick, json_path=json_path, tiny=tiny, sections=sections, rank1=rank1, backends=backends
        )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _main(
            quick=quick, json_path=json_path, tiny=tiny, sections=sections, rank1=rank1, backends=backends
        )
    finally:
        torch.set_num_threads(threads)


def _main(*, quick, json_path, tiny, sections, rank1=False, backends=None) -> int:
    sz = sizes_for(quick=quick, tiny=tiny, rank1=rank1)
    if "compile" in sections and "step" not in sections:  # first steps only
        sz = dataclasses.replace(sz, rounds=1, round_seconds=0.0, max_reps=1)
        sections = tuple(sections) + ("step",)

    def log(s=""):
        print(s, flush=True)

    t_start = time.perf_counter()
    import duogard as dg

    backends = [
        i.name
        for i in dg.available_backends()
        if i.available and i.name in ("jax", "torch") and (backends is None or i.name in backends)
    ]
    machine = machine_info(
        "duogard bench"
        + (" --quick" if quick else "")
        + (" --tiny" if tiny else "")
        + (" (benchmarks/rank1.py: the rank-1 run)" if sz.mode == "rank1" else "")
        + (f" --json {json_path}" if json_path else "")
    )
    log(f"duogard bench ({sz.mode}) {machine['date']}")
    log(
        f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GB, "
        f"load {machine['load_average']}" + (f", git {machine['git']}" if machine.get("git") else "")
    )
    log(
        f"versions: python {machine['python']}, duogard {machine['duogard']}, jax {machine.get('jax')}, "
        f"torch {machine.get('torch')} ({machine.get('torch_threads')} threads), numpy {machine['numpy']}"
    )
    load = (machine.get("load_average") or [0.0])[0]
    if load > 0.5 * (machine["cores"] or 1):
        log(
            f"WARNING: the machine is busy (load {load:.1f} on {machine['cores']} cores): other processes "
            "share the cores, so timings are inflated and noisy; memory and conversion figures are "
            "unaffected."
        )
    result: dict[str, Any] = {
        "machine": machine,
        "mode": sz.mode,
        "sizes": {
            "batch": sz.batch,
            "image": sz.image,
            "mlp_hidden": sz.mlp_hidden,
            "cnn_channels": sz.cnn_channels,
            "cnn_hidden": sz.cnn_hidden,
            "rounds": sz.rounds,
            "depths": sz.depths,
            "mem_width": sz.mem_width,
            "mem_batch": sz.mem_batch,
            "conversion_sizes": sz.conv_sizes,
        },
    }
    step, draw_opts, draw_gens, memory, conv, compile_recs = [], [], [], [], [], []
    if "step" in sections:
        configs = step_configs(sz, backends)
        log(f"\nstep time: {len(configs)} configurations, {sz.rounds} rounds; warming up (first steps) ...")
        t0 = time.perf_counter()
        for b in backends:
            dg.backend(b)  # the frameworks, imported before the freeze below
        # what exists now (the frameworks' own objects) stays out of the collections that warm()
        # runs before each configuration: each of them then takes milliseconds, not 0.3 s
        gc.collect()
        gc.freeze()
        try:
            for cfg in configs:
                warm(cfg, sz.round_seconds, sz.max_reps, draw_impls=sz.draw_impls)
        finally:
            gc.unfreeze()
        log(f"  first steps: {time.perf_counter() - t0:.1f} s")
        draws = time_step_configs(configs, sz, log)
        step = step_records(configs, draws)
        compile_recs = compile_records(step)
        check_losses(step, log)
        print_step_tables(step, sz.batch, log)
        print_rank1_table(step, log)
    if "draw" in sections and set(backends) >= {"jax", "torch"}:
        params_np = duogard_model("mlp", sz).init(0, data_for(sz)[0])
        n = sum(int(np.prod(a.shape)) for layer in params_np.values() for a in layer.values())
        t0 = time.perf_counter()
        draw_opts = draw_options(
            n,
            rounds={"tiny": 1, "quick": 2}.get(sz.mode, sz.rounds),
            reps={"tiny": 1, "quick": 2}.get(sz.mode, 3),
        )
        draw_gens = generator_costs(draw_opts)
        log(f"\ntangent drawing options: {time.perf_counter() - t0:.1f} s")
    if "memory" in sections:
        log("\nmemory: one subprocess per configuration ...")
        t0 = time.perf_counter()
        memory = memory_section(sz, log)
        log(f"  {time.perf_counter() - t0:.1f} s")
    if "conversion" in sections and set(backends) >= {"jax", "torch"}:
        t0 = time.perf_counter()
        conv = conversion_section(sz, rounds=max(sz.rounds, 2))
        log(f"\nconversion: {time.perf_counter() - t0:.1f} s")
    dist: list = []
    if "distributed" in sections:
        procs = {"tiny": (2,), "quick": (2,)}.get(sz.mode, (1, 2, 4))
        # tiny and quick: one launch, torch (a JAX launch compiles every fit in every rank)
        dist_backends = [b for b in backends if b == "torch"] if sz.mode in ("tiny", "quick") else backends
        k = 4 if sz.mode == "tiny" else 16
        log(f"\ndata-parallel: torchrun with {', '.join(map(str, procs))} processes ...")
        t0 = time.perf_counter()
        dist = distributed_section(
            procs=procs,
            backends=dist_backends,
            steps={"tiny": 3, "quick": 10}.get(sz.mode, 30),
            k=k,
            batch=sz.batch if sz.batch % 4 == 0 else 64,
            small=sz.mode != "full",
            log=log,
        )
        log(f"  {time.perf_counter() - t0:.1f} s")
    targets = evaluate_targets(step, memory, conv, draw_opts)
    print_rest(draw_opts, memory, conv, compile_recs, targets, log, draw_gens=draw_gens)
    if dist:
        print_distributed(dist, log, k=k)
    machine["load_average_end"] = (
        [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    )
    machine["seconds"] = round(time.perf_counter() - t_start, 1)
    log(f"\n{machine['seconds']} s; load average at the end {machine['load_average_end']}")
    result.update(
        step_time=step,
        draw_options=draw_opts,
        draw_generators=draw_gens,
        memory=memory,
        conversion=conv,
        compile=compile_recs,
        targets=targets,
        distributed=dist,
    )
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1, default=json_default)
        log(f"wrote {json_path}")
    return 0
