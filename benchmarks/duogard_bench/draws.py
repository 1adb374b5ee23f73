"""Section 2: the ways of drawing tangents, and what duogard's portable generator (Philox-4x32-10,
the default of every backend) costs per number against each framework's own (``generator="native"``).

On its own: ``python -m duogard_bench.draws [--n 1863690] [--rounds 5] [--reps 3] [--torch-threads T]``
prints every way, the portable / native table and the generator's targets (:func:`generator_targets`).
"""

from __future__ import annotations

import argparse
import sys
import time

from ._common import block_until_ready, fmt, format_table, median, ratio_of

__all__ = ["draw_options", "generator_costs", "generator_targets", "SMALL_SIZES"]

#: the small draws timed per call by default (one factor of a rank-1 tangent, a bias): what a call
#: costs beyond its numbers (the command line adds 4,096)
SMALL_SIZES = (1024,)


def draw_options(n: int, rounds: int, reps: int, small_sizes=SMALL_SIZES) -> list[dict]:
    """What drawing ``n`` tangent numbers costs, done in different ways (backs the proposals).

    Args:
        n: how many numbers to draw.
        rounds: rounds over every way.
        reps: draws per way per round.
        small_sizes: the sizes of the small draws timed per call.

    Returns:
        The ``draw_options`` records: median seconds and nanoseconds per number of each way.
    """
    import jax
    import jax.numpy as jnp
    import torch

    import duogard as dg

    bt, bj = dg.backend("torch"), dg.backend("jax")
    kt, kj = bt.key(0), bj.key(0)
    gen = torch.Generator().manual_seed(0)
    shifts = torch.arange(8, dtype=torch.uint8)

    def t_bits_int64():
        words = torch.randint(-(2**63), 2**63 - 1, ((n + 63) // 64,), generator=gen, dtype=torch.int64)
        bits = words[:, None].bitwise_right_shift(torch.arange(64)).bitwise_and_(1)
        return bits.reshape(-1)[:n].to(torch.float32).mul_(2).sub_(1)

    def t_bits_uint8_gen():
        packed = torch.randint(0, 256, ((n + 7) // 8, 1), generator=gen, dtype=torch.uint8)
        bits = packed.bitwise_right_shift(shifts).bitwise_and_(1)
        return bits.reshape(-1)[:n].to(torch.float32).mul_(2).sub_(1)

    table = torch.tensor([[1.0 if (b >> i) & 1 else -1.0 for i in range(8)] for b in range(256)])

    def t_bytes_table():
        words = torch.randint(-(2**63), 2**63 - 1, ((n + 63) // 64,), generator=gen, dtype=torch.int64)
        return table[words.view(torch.uint8).long()].reshape(-1)[:n]

    def t_bytes_table_index_select():
        words = torch.randint(-(2**63), 2**63 - 1, ((n + 63) // 64,), generator=gen, dtype=torch.int64)
        return table.index_select(0, words.view(torch.uint8).int()).reshape(-1)[:n]

    def jax_bits(key):
        words = jax.random.bits(key, ((n + 31) // 32,), dtype=jnp.uint32)
        bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
        return bits.reshape(-1)[:n].astype(jnp.float32) * 2 - 1

    rbg = jax.random.key(0, impl="rbg")
    urbg = jax.random.key(0, impl="unsafe_rbg")
    f_norm = jax.jit(lambda k: jax.random.normal(k, (n,), jnp.float32))
    f_rad = jax.jit(lambda k: jax.random.rademacher(k, (n,), jnp.float32))
    f_bits = jax.jit(jax_bits)
    f_unif = jax.jit(lambda k: jax.random.uniform(k, (n,), jnp.float32))
    f_be = {
        (kind, g): jax.jit(
            lambda k, kind=kind, g=g: getattr(bj, kind)(k, (n,), dtype=jnp.float32, generator=g)
        )
        for kind in ("normal", "rademacher")
        for g in ("portable", "native")
    }
    ways = [
        ("torch", "duogard be.normal, portable (Philox)", lambda: bt.normal(kt, (n,), generator="portable")),
        (
            "torch",
            "duogard be.normal, native (torch.Generator)",
            lambda: bt.normal(kt, (n,), generator="native"),
        ),
        ("torch", "torch.randn (global generator)", lambda: torch.randn(n)),
        ("torch", "torch.randn (reused Generator)", lambda: torch.randn(n, generator=gen)),
        (
            "torch",
            "duogard be.rademacher, portable (Philox)",
            lambda: bt.rademacher(kt, (n,), generator="portable"),
        ),
        (
            "torch",
            "duogard be.rademacher, native (torch.Generator)",
            lambda: bt.rademacher(kt, (n,), generator="native"),
        ),
        ("torch", "uint8 bytes, reused Generator", t_bits_uint8_gen),
        ("torch", "int64 words, 64 signs each", t_bits_int64),
        ("torch", "int64 words as bytes, 256x8 sign table (indexing)", t_bytes_table),
        ("torch", "int64 words as bytes, 256x8 sign table (index_select)", t_bytes_table_index_select),
        ("torch", "torch.rand(n).sub_(0.5).sign_()", lambda: torch.rand(n, generator=gen).sub_(0.5).sign_()),
        ("torch", "torch.randn(n).sign_()", lambda: torch.randn(n, generator=gen).sign_()),
        ("torch", "bernoulli_(0.5)*2-1", lambda: torch.empty(n).bernoulli_(0.5).mul_(2).sub_(1)),
        ("torch", "randint(0,2)*2-1", lambda: torch.randint(0, 2, (n,), dtype=torch.float32).mul_(2).sub_(1)),
        ("torch", "torch.rand (uniform)", lambda: torch.rand(n)),
        ("jax", "duogard be.normal, portable (Philox, jit)", lambda: f_be["normal", "portable"](kj)),
        ("jax", "duogard be.normal, native (jax.random, jit)", lambda: f_be["normal", "native"](kj)),
        ("jax", "duogard be.rademacher, portable (Philox, jit)", lambda: f_be["rademacher", "portable"](kj)),
        ("jax", "duogard be.rademacher, native (jax.random, jit)", lambda: f_be["rademacher", "native"](kj)),
        ("jax", "jax.random.normal, threefry", lambda: f_norm(kj)),
        ("jax", "jax.random.rademacher, threefry", lambda: f_rad(kj)),
        ("jax", "jax.random.uniform, threefry", lambda: f_unif(kj)),
        ("jax", "jax.random.bits, 32 signs per word, threefry", lambda: f_bits(kj)),
        ("jax", "jax.random.normal, rbg key", lambda: f_norm(rbg)),
        ("jax", "jax.random.rademacher, rbg key", lambda: f_rad(rbg)),
        ("jax", "jax.random.normal, unsafe_rbg key", lambda: f_norm(urbg)),
        ("jax", "jax.random.rademacher, unsafe_rbg key", lambda: f_rad(urbg)),
        ("jax", "jax.random.bits, 32 signs per word, unsafe_rbg", lambda: f_bits(urbg)),
    ]
    # one factor of a rank-1 tangent (a 1024-wide layer's u or w): what a call costs beyond its numbers
    f_small = {
        (kind, g, m): jax.jit(
            lambda k, kind=kind, g=g, m=m: getattr(bj, kind)(k, (m,), dtype=jnp.float32, generator=g)
        )
        for kind in ("normal", "rademacher")
        for g in ("portable", "native")
        for m in small_sizes
    }
    names = {"portable": ("Philox", "Philox, jit"), "native": ("torch.Generator", "jax.random, jit")}
    small_label = {}
    for m in small_sizes:
        for kind in ("normal", "rademacher"):
            for g in ("portable", "native"):
                for b, name in (("torch", names[g][0]), ("jax", names[g][1])):
                    label = f"duogard be.{kind}, {g} ({name}), {m:,} numbers"
                    small_label[label] = m
                    if b == "torch":
                        f = lambda kind=kind, g=g, m=m: getattr(bt, kind)(kt, (m,), generator=g)  # noqa: E731
                    else:
                        f = lambda kind=kind, g=g, m=m: f_small[kind, g, m](kj)  # noqa: E731
                    ways.append((b, label, f))
    sizes = {label: small_label.get(label, n) for _, label, _ in ways}
    times = {w[1]: [] for w in ways}
    for _, _, f in ways:
        block_until_ready(f())
    for _ in range(rounds):
        for _, label, f in ways:
            for _ in range(reps):
                t0 = time.perf_counter()
                block_until_ready(f())
                times[label].append(time.perf_counter() - t0)
    recs = []
    for b, label, _ in ways:
        rec = {
            "section": "draw_options",
            "backend": b,
            "way": label,
            "elements": sizes[label],
            "median_s": median(times[label]),
            "ns_per_element": 1e9 * median(times[label]) / sizes[label],
        }
        if label.startswith("duogard be."):  # "duogard be.normal, portable (...)"
            rec["distribution"] = label.split(",")[0].removeprefix("duogard be.")
            rec["generator"] = label.split(", ")[1].split(" ")[0]
        recs.append(rec)
    return recs


def generator_costs(draw_opts) -> list[dict]:
    """duogard's portable generator against the framework's own, per backend, distribution and size.

    Args:
        draw_opts: the records of :func:`draw_options`.

    Returns:
        One record per backend x distribution x size: ns per number and µs per call of each
        generator, and the ratio portable / native.
    """
    out = []
    tagged = [d for d in draw_opts if "generator" in d]
    for n in sorted({d["elements"] for d in tagged}, reverse=True):
        for b in sorted({d["backend"] for d in tagged}):
            for dist in ("normal", "rademacher"):
                rows = {
                    d["generator"]: d
                    for d in tagged
                    if (d["backend"], d["distribution"], d["elements"]) == (b, dist, n)
                }
                if {"portable", "native"} <= set(rows):
                    p, q = rows["portable"], rows["native"]
                    out.append(
                        {
                            "section": "draw_generators",
                            "backend": b,
                            "distribution": dist,
                            "elements": n,
                            "portable_ns": p["ns_per_element"],
                            "native_ns": q["ns_per_element"],
                            "portable_us_per_call": 1e6 * p["median_s"],
                            "native_us_per_call": 1e6 * q["median_s"],
                            "portable_over_native": ratio_of(p["ns_per_element"], q["ns_per_element"]),
                        }
                    )
    return out


# the torch ways that draw signs (duogard's native one among them): the fastest is the target's yardstick
_TORCH_SIGN_WAYS = (
    "duogard be.rademacher, native (torch.Generator)",
    "uint8 bytes, reused Generator",
    "int64 words, 64 signs each",
    "int64 words as bytes, 256x8 sign table (indexing)",
    "int64 words as bytes, 256x8 sign table (index_select)",
    "torch.rand(n).sub_(0.5).sign_()",
    "torch.randn(n).sign_()",
    "bernoulli_(0.5)*2-1",
    "randint(0,2)*2-1",
)
_RANDN_WAYS = ("torch.randn (global generator)", "torch.randn (reused Generator)")


def generator_targets(draw_opts) -> list[dict]:
    """The portable generator's cost targets on torch, and the same ratios on JAX (issue 29).

    Large draws: portable normals within 1.5x of ``torch.randn`` per number (the faster of the
    global and a reused generator), portable signs within 1.5x of the fastest native way of
    drawing signs; small draws (every size below the large one): a portable call within 2x of the native
    call. JAX rows compare portable with native (no target: they show it does not regress).

    Args:
        draw_opts: the records of :func:`draw_options`.

    Returns:
        One record per comparison: ``what``, ``backend``, ``portable`` and ``against`` (ns per
        number, or µs per call for small draws), their ``ratio``, the ``target`` (None for
        JAX) and ``met``.
    """
    by = {(d["backend"], d["way"]): d for d in draw_opts}
    large = max(d["elements"] for d in draw_opts)
    out = []

    def add(what, backend, portable, against, against_way, target, per_call=False):
        if portable is None or against is None:
            return
        unit = "us_per_call" if per_call else "ns_per_number"
        p = 1e6 * portable["median_s"] if per_call else portable["ns_per_element"]
        a = 1e6 * against["median_s"] if per_call else against["ns_per_element"]
        r = ratio_of(p, a)
        out.append(
            {
                "section": "draw_targets",
                "what": what,
                "backend": backend,
                "unit": unit,
                "portable": p,
                "against": a,
                "against_way": against_way,
                "ratio": r,
                "target": target,
                "met": None if target is None else bool(r <= target),
            }
        )

    def fastest(labels):
        rows = [by[("torch", w)] for w in labels if ("torch", w) in by]
        return min(rows, key=lambda d: d["ns_per_element"]) if rows else None

    randn = fastest(_RANDN_WAYS)
    signs = fastest(_TORCH_SIGN_WAYS)
    add(
        f"normal, {large:,} numbers",
        "torch",
        by.get(("torch", "duogard be.normal, portable (Philox)")),
        randn,
        randn and randn["way"],
        1.5,
    )
    add(
        f"signs, {large:,} numbers",
        "torch",
        by.get(("torch", "duogard be.rademacher, portable (Philox)")),
        signs,
        signs and signs["way"],
        1.5,
    )
    for kind in ("normal", "rademacher"):
        add(
            f"{kind}, {large:,} numbers",
            "jax",
            by.get(("jax", f"duogard be.{kind}, portable (Philox, jit)")),
            by.get(("jax", f"duogard be.{kind}, native (jax.random, jit)")),
            "native",
            None,
        )
    names = {"torch": ("Philox", "torch.Generator", 2.0), "jax": ("Philox, jit", "jax.random, jit", None)}
    for m in sorted({d["elements"] for d in draw_opts} - {large}):
        for b, (pn, nn, target) in names.items():
            for kind in ("normal", "rademacher"):
                add(
                    f"{kind}, {m:,} numbers (per call)",
                    b,
                    by.get((b, f"duogard be.{kind}, portable ({pn}), {m:,} numbers")),
                    by.get((b, f"duogard be.{kind}, native ({nn}), {m:,} numbers")),
                    "native",
                    target,
                    per_call=True,
                )
    return out


def print_generator_targets(targets, log=print) -> None:
    """Print :func:`generator_targets`' records as a table."""
    rows = [
        [
            t["backend"],
            t["what"],
            fmt(t["portable"]),
            f"{fmt(t['against'])} ({t['against_way']})",
            fmt(t["ratio"]),
            "-" if t["target"] is None else f"{t['target']:g}x {'met' if t['met'] else 'MISSED'}",
        ]
        for t in targets
    ]
    log("\n   the portable generator's targets: ns per number (large draws), µs per call (small draws)")
    log(format_table(["backend", "draw", "portable", "against", "ratio", "target"], rows))


def main(argv=None) -> int:
    """``python -m duogard_bench.draws``: this section alone (both backends needed)."""
    p = argparse.ArgumentParser(description="duogard's portable generator against each framework's own")
    p.add_argument("--n", type=int, default=1_863_690, help="numbers of a large draw (default: the MLP's)")
    p.add_argument("--rounds", type=int, default=5, help="rounds over every way (interleaved)")
    p.add_argument("--reps", type=int, default=3, help="draws per way per round")
    p.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads first")
    a = p.parse_args(argv)
    if a.torch_threads:
        import torch

        torch.set_num_threads(a.torch_threads)
    recs = draw_options(a.n, a.rounds, a.reps, small_sizes=(1024, 4096))
    print(
        format_table(
            ["backend", "way", "numbers", "ms", "ns/number"],
            [
                [
                    d["backend"],
                    d["way"],
                    f"{d['elements']:,}",
                    fmt(1e3 * d["median_s"], ".3f"),
                    fmt(d["ns_per_element"]),
                ]
                for d in recs
            ],
        )
    )
    print_generator_targets(generator_targets(recs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
