"""Section 4: DLPack conversion time against array size, both directions, ``duogard.convert`` and bare
calls."""

from __future__ import annotations

import time

from ._common import Sizes, median, ratio_of

__all__ = ["conversion_section"]


def conversion_section(sz: Sizes, rounds: int) -> list[dict]:
    """Time every conversion, size by size, and check each one shares memory with its input.

    Args:
        sz: the run's sizes (``conv_sizes``, ``conv_reps``).
        rounds: rounds over every size and direction.

    Returns:
        The ``conversion`` records, each with its ratio to the smallest size.
    """
    import jax
    import jax.numpy as jnp
    import torch

    from duogard.interop import convert

    arrays = {n: (torch.ones(n), jnp.ones(n, jnp.float32).block_until_ready()) for n in sz.conv_sizes}

    def ptr(x):
        return x.data_ptr() if hasattr(x, "data_ptr") else x.unsafe_buffer_pointer()

    def kinds(n):
        t, a = arrays[n]
        return [
            ("torch->jax", "bare", t, lambda: jax.dlpack.from_dlpack(t).block_until_ready()),
            ("jax->torch", "bare", a, lambda: torch.from_dlpack(a)),
            ("torch->jax", "duogard", t, lambda: convert(t, to="jax").block_until_ready()),
            ("jax->torch", "duogard", a, lambda: convert(a, to="torch")),
        ]

    times: dict = {}
    zero_copy: dict = {}
    for n in sz.conv_sizes:
        for direction, impl, src, f in kinds(n):
            try:
                zero_copy[(direction, impl, n)] = ptr(f()) == ptr(src)
            except Exception as exc:  # noqa: BLE001 - reported
                zero_copy[(direction, impl, n)] = f"{type(exc).__name__}: {exc}"[:200]
    for _ in range(rounds):
        for n in sz.conv_sizes:
            for direction, impl, _, f in kinds(n):
                if isinstance(zero_copy.get((direction, impl, n)), str):
                    continue
                for _ in range(sz.conv_reps):
                    t0 = time.perf_counter()
                    f()
                    times.setdefault((direction, impl, n), []).append(time.perf_counter() - t0)
    recs = []
    for (direction, impl, n), zc in zero_copy.items():
        rec = {
            "section": "conversion",
            "direction": direction,
            "impl": impl,
            "elements": n,
            "median_s": median(times.get((direction, impl, n), [])),
        }
        if isinstance(zc, str):
            rec["error"] = zc
        else:
            rec["zero_copy"] = bool(zc)
        recs.append(rec)
    smallest = min(sz.conv_sizes)
    for rec in recs:
        ref = next(
            (
                r
                for r in recs
                if r["direction"] == rec["direction"]
                and r["impl"] == rec["impl"]
                and r["elements"] == smallest
            ),
            None,
        )
        rec["ratios"] = {"to_smallest": ratio_of(rec["median_s"], ref["median_s"]) if ref else float("nan")}
    arrays.clear()  # the 1e8-element buffers go before the next section
    return recs
