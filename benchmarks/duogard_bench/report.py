"""What a run reports: the compile records, the printed tables and the JSON encoding (the targets
are in :mod:`.targets`)."""

from __future__ import annotations

import math

import numpy as np

from ._common import BAYDIN_RATIO, METHODS, RANK1_METHODS, dense_twin, fmt, format_table, median, ratio_of

__all__ = ["compile_records", "json_default", "print_rank1_table", "print_rest", "print_step_tables"]


# ============================================================================ 5: compile


def compile_records(step_recs) -> list[dict]:
    """Section 5 from the step records: each implementation's first step (compilation included).

    Args:
        step_recs: the step records.

    Returns:
        One ``compile`` record per backend x model x implementation.
    """
    recs = []
    keys = sorted({(r["backend"], r["model"], r["impl"]) for r in step_recs})
    for b, m, im in keys:
        firsts = {
            r["method"]: r["first_step_s"]
            for r in step_recs
            if (r["backend"], r["model"], r["impl"]) == (b, m, im) and math.isfinite(r["first_step_s"])
        }
        if not firsts:
            continue
        steady = {
            r["method"]: r["median_s"]
            for r in step_recs
            if (r["backend"], r["model"], r["impl"]) == (b, m, im)
        }
        recs.append(
            {
                "section": "compile",
                "backend": b,
                "model": m,
                "impl": im,
                "first_step_s": firsts,
                "median_first_step_s": median(list(firsts.values())),
                "max_first_step_s": max(firsts.values()),
                "compile_overhead_s": {k: v - steady.get(k, 0.0) for k, v in firsts.items()},
            }
        )
    return recs


# ============================================================================ printing


def print_step_tables(step, batch, log) -> None:
    """Print section 1: step times, then the ratios.

    Args:
        step: the step records.
        batch: the batch size (for the title).
        log: prints a line.
    """
    idx = {(r["backend"], r["model"], r["method"], r["impl"]): r for r in step}

    def ms(*k):
        return fmt(1e3 * idx[k]["median_s"]) if k in idx else "-"

    def rat(name, *k):
        return fmt(idx[k]["ratios"].get(name)) if k in idx else "-"

    def pct(*k):
        return fmt(100 * idx[k]["ratios"].get("tangent_share", float("nan")), ".0f") if k in idx else "-"

    models = [m for m in ("mlp", "cnn") if any(r["model"] == m for r in step)]
    pairs = [(m, me) for m in models for me in METHODS if any(k[1:3] == (m, me) for k in idx)]
    extra = sorted({(k[0], k[3]) for k in idx if k[3] not in ("duogard", "hand")})
    log(f"\n1. Step time, median ms per step (batch {batch}; d/h = duogard / hand-written)")
    log(
        format_table(
            [
                "model  method",
                "jax duogard",
                "jax hand",
                "d/h",
                "torch duogard",
                "torch hand",
                "d/h",
                *[f"{b} {im}" for b, im in extra],
            ],
            [
                [
                    f"{m}  {me}",
                    ms("jax", m, me, "duogard"),
                    ms("jax", m, me, "hand"),
                    rat("duogard_over_hand", "jax", m, me, "duogard"),
                    ms("torch", m, me, "duogard"),
                    ms("torch", m, me, "hand"),
                    rat("duogard_over_hand", "torch", m, me, "duogard"),
                    *[ms(b, m, me, im) for b, im in extra],
                ]
                for m, me in pairs
            ],
        )
    )
    log(
        f"\n   Ratios: forward/backprop (Baydin et al.: {BAYDIN_RATIO}); JAX/torch; "
        "tangent drawing as % of the step"
    )
    log(
        format_table(
            [
                "model  method",
                "f/b jax",
                "f/b jax hand",
                "f/b torch",
                "f/b torch hand",
                "f/b torch hand-jvp",
                "jax/torch",
                "jax/torch hand",
                "draw% jax",
                "draw% torch",
            ],
            [
                [
                    f"{m}  {me}",
                    rat("forward_over_backprop", "jax", m, me, "duogard"),
                    rat("forward_over_backprop", "jax", m, me, "hand"),
                    rat("forward_over_backprop", "torch", m, me, "duogard"),
                    rat("forward_over_backprop", "torch", m, me, "hand"),
                    rat("forward_over_backprop", "torch", m, me, "hand-jvp"),
                    rat("jax_over_torch", "jax", m, me, "duogard"),
                    rat("jax_over_torch", "jax", m, me, "hand"),
                    pct("jax", m, me, "duogard"),
                    pct("torch", m, me, "duogard"),
                ]
                for m, me in pairs
            ],
        )
    )
    for r in step:
        if "error" in r:
            log(f"   ! {r['backend']} {r['model']} {r['method']} {r['impl']}: {r['error']}")


def print_rank1_table(step, log) -> None:
    """Print the rank-1 rows of section 1 beside backprop and the dense-tangent step of the same K.

    Args:
        step: the step records.
        log: prints a line.
    """
    idx = {(r["backend"], r["model"], r["method"], r["impl"]): r for r in step}
    rows = []
    for m in ("mlp", "cnn"):
        for me in RANK1_METHODS:
            for im in ("duogard", "duogard-lean", "duogard-native", "hand"):
                if not any(k[1:] == (m, me, im) for k in idx):
                    continue
                cells = [f"{m}  {me}", im]
                for b in ("jax", "torch"):
                    r = idx.get((b, m, me, im))
                    twin = idx.get((b, m, dense_twin(me), im)) if dense_twin(me) else None
                    bp = idx.get((b, m, "backprop", "hand" if im == "hand" else "duogard"))
                    cells += [
                        fmt(1e3 * r["median_s"]) if r else "-",
                        fmt(1e3 * twin["median_s"]) if twin else "-",
                        fmt(1e3 * bp["median_s"]) if bp else "-",
                        fmt(r["ratios"].get("forward_over_backprop")) if r else "-",
                        fmt(r["ratios"].get("rank1_over_dense")) if r else "-",
                    ]
                rows.append(cells)
    if not rows:
        return
    log(
        "\n   Rank-1 tangents (u wᵀ per weight), median ms: the rank-1 step, the dense-tangent step of "
        "the same K and distribution, backprop; r1/bp and r1/dense their ratios (hand: hand-written "
        "rank-1 step against hand-written steps; lean, native: against duogard's backprop and the dense "
        "step of the same variant; native: generator='native', the framework's own generator)"
    )
    heads = []
    for b in ("jax", "torch"):
        heads += [f"{b} rank-1", f"{b} dense", f"{b} backprop", f"{b} r1/bp", f"{b} r1/dense"]
    log(format_table(["model  method", "impl", *heads], rows))


def print_rest(draw_opts, memory, conv, compile_recs, targets, log, draw_gens=()) -> None:
    """Print sections 2 to 5 (those that ran), then the targets and why each miss misses.

    Args:
        draw_opts: the ``draw_options`` records.
        memory: the ``memory`` records.
        conv: the ``conversion`` records.
        compile_recs: the ``compile`` records.
        targets: the targets (:func:`evaluate_targets`).
        log: prints a line.
        draw_gens: the portable / native generator records (:func:`.draws.generator_costs`).
    """
    if draw_opts:
        log(
            f"\n2. Tangent drawing, {draw_opts[0]['elements']:,} numbers (the MLP's parameter count; "
            "the rows that say so: 1,024)"
        )
        log(
            format_table(
                ["backend", "way", "ms", "ns/number"],
                [
                    [d["backend"], d["way"], fmt(1e3 * d["median_s"]), fmt(d["ns_per_element"])]
                    for d in draw_opts
                ],
            )
        )
    if draw_gens:
        log(
            "\n   duogard's portable generator (Philox-4x32-10, the default) against the framework's "
            "own (generator='native'): ns per number (µs per call)"
        )
        log(
            format_table(
                ["backend", "distribution", "numbers", "portable", "native", "portable/native"],
                [
                    [
                        g["backend"],
                        g["distribution"],
                        f"{g['elements']:,}",
                        f"{fmt(g['portable_ns'])} ({fmt(g['portable_us_per_call'], '.0f')} µs)",
                        f"{fmt(g['native_ns'])} ({fmt(g['native_us_per_call'], '.0f')} µs)",
                        fmt(g["portable_over_native"]),
                    ]
                    for g in draw_gens
                ],
            )
        )
    if memory:
        log(
            "\n3. Step memory (arrays alive within a step beyond params, optimizer state and "
            "batch: fit's step_memory_bytes), then the process's peak RSS beyond imports and "
            f"parameters (MB), MLP width {memory[0]['width']}, batch {memory[0]['batch']}"
        )
        rows = []
        for r in memory:
            rows.append(
                [
                    r["backend"],
                    r["method"],
                    r["impl"],
                    r["depth"],
                    fmt(r.get("params_mb"), ".0f"),
                    fmt(r.get("step_memory_mb"), ".1f"),
                    fmt(ratio_of(r.get("step_memory_mb"), r.get("params_mb")), ".2f"),
                    fmt(r.get("peak_beyond_params_mb"), ".0f"),
                    fmt(r.get("peak_beyond_first_step_mb"), ".0f"),
                    fmt(ratio_of(r.get("peak_beyond_params_mb"), r.get("params_mb")), ".1f"),
                    fmt(next(iter(r.get("ratios", {}).values()), None)),
                    r.get("error", ""),
                ]
            )
        ref = next((k for r in memory for k in r.get("ratios", {})), "to_depth_4")
        ref = ref.replace("to_", "vs ").replace("_", " ")
        log(
            format_table(
                [
                    "backend",
                    "method",
                    "impl",
                    "depth",
                    "params",
                    "step",
                    "step/params",
                    "rss peak-base",
                    "rss peak-after-1st",
                    "rss/params",
                    f"step {ref}",
                    "",
                ],
                rows,
            )
        )
    if conv:
        _print_conversion(conv, log)
    if compile_recs:
        _print_compile(compile_recs, log)
    if targets:
        log("\nTargets")
        log(
            format_table(
                ["target", "backend", "model", "method", "measured", "limit", ""],
                [
                    [
                        t["target"],
                        t["backend"],
                        t["model"],
                        t["method"],
                        fmt(t["measured"]),
                        fmt(t["limit"]),
                        t["status"],
                    ]
                    for t in targets
                ],
            )
        )
        for t in targets:
            if t["status"] == "MISS" and t.get("why"):
                log(f"  MISS {t['target']} ({t['backend']} {t['model']} {t['method']}): {t['why']}")


def _print_compile(compile_recs, log) -> None:
    """Print section 5: each configuration's first step (compilation included), then the median and
    max over methods; kept apart from the step times, which never include it."""
    rows = [
        [
            r["backend"],
            r["model"],
            method,
            r["impl"],
            fmt(first),
            fmt(r["compile_overhead_s"].get(method)),
        ]
        for r in compile_recs
        for method, first in r["first_step_s"].items()
    ]
    total = sum(first for r in compile_recs for first in r["first_step_s"].values())
    log(
        f"\n5. First step (compilation included), seconds: {len(rows)} configurations, {total:.1f} s "
        "in all; compile = first step - median step"
    )
    log(format_table(["backend", "model", "method", "impl", "first step", "compile"], rows))
    log("\n   Median and max over methods")
    log(
        format_table(
            ["backend", "model", "impl", "median", "max"],
            [
                [
                    r["backend"],
                    r["model"],
                    r["impl"],
                    fmt(r["median_first_step_s"]),
                    fmt(r["max_first_step_s"]),
                ]
                for r in compile_recs
            ],
        )
    )


def _print_conversion(conv, log) -> None:
    """Print section 4: µs per call by size, convert / bare by size, and the tree of small leaves."""
    single = [r for r in conv if r.get("leaves", 1) == 1]
    trees = [r for r in conv if r.get("leaves", 1) > 1]
    log("\n4. DLPack conversion, median µs per call (zero-copy?); d/b = duogard.convert / bare from_dlpack")
    sizes = sorted({r["elements"] for r in single if "elements" in r})
    rows = []
    for direction in ("torch->jax", "jax->torch"):
        rs = {(r["impl"], r["elements"]): r for r in single if r.get("direction") == direction}
        for impl in ("duogard", "bare"):
            if any(k[0] == impl for k in rs):
                rows.append(
                    [f"{direction} {impl}"]
                    + [
                        (
                            fmt(1e6 * rs[impl, n]["median_s"], ".1f")
                            + ("" if rs[impl, n].get("zero_copy") else "*")
                        )
                        if (impl, n) in rs and "error" not in rs[impl, n]
                        else "err"
                        for n in sizes
                    ]
                )
        if any(k[0] == "duogard" for k in rs):
            rows.append(
                [f"{direction} d/b"]
                + [
                    fmt(rs[("duogard", n)].get("ratios", {}).get("duogard_over_bare"))
                    if ("duogard", n) in rs
                    else "-"
                    for n in sizes
                ]
            )
    log(format_table(["direction"] + [f"{n:.0e}" for n in sizes], rows))
    if trees:
        k, e = trees[0]["leaves"], trees[0]["elements"]
        log(f"\n   A tree of {k} leaves of {e} elements: convert(tree) against {k} bare from_dlpack calls")
        rows = []
        for direction in ("torch->jax", "jax->torch"):
            rs = {r["impl"]: r for r in trees if r.get("direction") == direction and "error" not in r}
            if not rs:
                continue
            rows.append(
                [
                    direction,
                    *[
                        fmt(1e6 * rs[im]["median_s"], ".0f") + ("" if rs[im].get("zero_copy") else "*")
                        if im in rs
                        else "err"
                        for im in ("duogard", "bare")
                    ],
                    *[
                        fmt(1e6 * rs[im]["median_s"] / k, ".1f") if im in rs else "-"
                        for im in ("duogard", "bare")
                    ],
                    fmt(rs.get("duogard", {}).get("ratios", {}).get("duogard_over_bare")),
                ]
            )
        log(format_table(["direction", "duogard µs", "bare µs", "µs/leaf", "bare µs/leaf", "d/b"], rows))
    for r in conv:
        if "error" in r:
            log(f"   ! {r.get('direction', '')} {r['impl']} {r.get('elements', '')}: {r['error']}")
    log("   (* = the result does not share memory with the input)")


def json_default(o):
    """``json.dump``'s ``default``: NumPy scalars as numbers, tuples as lists, anything else as text."""
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    return str(o)
