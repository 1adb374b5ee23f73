"""Section 2: the ways of drawing tangents, and what duogard's portable generator (Philox-4x32-10,
the default of every backend) costs per number against each framework's own (``generator="native"``)."""

from __future__ import annotations

import time

from ._common import block_until_ready, median, ratio_of

__all__ = ["draw_options", "generator_costs"]


def draw_options(n: int, rounds: int, reps: int) -> list[dict]:
    """What drawing ``n`` tangent numbers costs, done in different ways (backs the proposals).

    Args:
        n: how many numbers to draw.
        rounds: rounds over every way.
        reps: draws per way per round.

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
    small = 1024
    f_small = {
        (kind, g): jax.jit(
            lambda k, kind=kind, g=g: getattr(bj, kind)(k, (small,), dtype=jnp.float32, generator=g)
        )
        for kind in ("normal", "rademacher")
        for g in ("portable", "native")
    }
    names = {"portable": ("Philox", "Philox, jit"), "native": ("torch.Generator", "jax.random, jit")}
    for kind in ("normal", "rademacher"):
        for g in ("portable", "native"):
            ways.append(
                (
                    "torch",
                    f"duogard be.{kind}, {g} ({names[g][0]}), {small:,} numbers",
                    lambda kind=kind, g=g: getattr(bt, kind)(kt, (small,), generator=g),
                )
            )
            ways.append(
                (
                    "jax",
                    f"duogard be.{kind}, {g} ({names[g][1]}), {small:,} numbers",
                    lambda kind=kind, g=g: f_small[kind, g](kj),
                )
            )
    sizes = {label: small if label.endswith(f", {small:,} numbers") else n for _, label, _ in ways}
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
