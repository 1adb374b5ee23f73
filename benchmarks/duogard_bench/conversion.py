"""Section 4: DLPack conversion time against array size, both directions, ``duogard.convert`` and bare
calls, one leaf at a time and a tree of many small leaves."""

from __future__ import annotations

import time

from ._common import Sizes, median, ratio_of

__all__ = ["TREE_LEAVES", "TREE_LEAF_ELEMENTS", "conversion_section"]

TREE_LEAVES = 100  # the tree: this many small leaves (a model's parameters, gradients)
TREE_LEAF_ELEMENTS = 16


def conversion_section(sz: Sizes, rounds: int) -> list[dict]:
    """Time every conversion, size by size, and check each one shares memory with its input.

    One leaf: ``convert(x, to=...)`` against the bare ``from_dlpack(x)`` of the target framework
    (``jax.dlpack.from_dlpack``, ``torch.from_dlpack``), each size in both directions. A tree:
    ``convert`` of a dict of :data:`TREE_LEAVES` small leaves against as many bare calls. The
    duogard and bare calls of one case alternate call by call in every round, in one process, so
    their ratio (``ratios["duogard_over_bare"]``) compares like with like on a loaded machine.

    Args:
        sz: the run's sizes (``conv_sizes``, ``conv_reps``).
        rounds: rounds over every size and direction.

    Returns:
        The ``conversion`` records (``leaves``: 1, or :data:`TREE_LEAVES` for the tree), each with
        its ratio to the smallest size and, for duogard's, to the bare calls.
    """
    import jax
    import jax.numpy as jnp
    import torch

    from duogard.interop import convert

    arrays = {n: (torch.ones(n), jnp.ones(n, jnp.float32).block_until_ready()) for n in sz.conv_sizes}
    tree_t = {f"p{i:03d}": torch.full((TREE_LEAF_ELEMENTS,), float(i)) for i in range(TREE_LEAVES)}
    tree_j = {k: jnp.asarray(v.numpy()).block_until_ready() for k, v in tree_t.items()}
    leaves_t, leaves_j = list(tree_t.values()), list(tree_j.values())

    def ptr(x):
        return x.data_ptr() if hasattr(x, "data_ptr") else x.unsafe_buffer_pointer()

    def shares(out, src) -> bool:
        if isinstance(src, dict):
            out = list(out.values()) if isinstance(out, dict) else out
            return all(ptr(o) == ptr(s) for o, s in zip(out, src.values(), strict=True))
        return ptr(out) == ptr(src)

    def cases():
        """(direction, leaves, elements per leaf, source, bare call, duogard call)"""
        out = []
        for n in sz.conv_sizes:
            t, a = arrays[n]
            out += [
                (
                    "torch->jax",
                    1,
                    n,
                    t,
                    lambda t=t: jax.dlpack.from_dlpack(t).block_until_ready(),
                    lambda t=t: convert(t, to="jax").block_until_ready(),
                ),
                ("jax->torch", 1, n, a, lambda a=a: torch.from_dlpack(a), lambda a=a: convert(a, to="torch")),
            ]
        k, e = TREE_LEAVES, TREE_LEAF_ELEMENTS
        return out + [
            (
                "torch->jax",
                k,
                e,
                tree_t,
                lambda: [jax.dlpack.from_dlpack(t) for t in leaves_t],
                lambda: convert(tree_t, to="jax"),
            ),
            (
                "jax->torch",
                k,
                e,
                tree_j,
                lambda: [torch.from_dlpack(a) for a in leaves_j],
                lambda: convert(tree_j, to="torch"),
            ),
        ]

    times: dict = {}
    zero_copy: dict = {}
    for direction, k, n, src, *calls in cases():
        for impl, f in zip(("bare", "duogard"), calls):
            try:
                zero_copy[(direction, impl, k, n)] = shares(f(), src)
            except Exception as exc:  # noqa: BLE001 - reported
                zero_copy[(direction, impl, k, n)] = f"{type(exc).__name__}: {exc}"[:200]
    for _ in range(rounds):
        for direction, k, n, _, *calls in cases():
            timed = [
                ((direction, impl, k, n), f)
                for impl, f in zip(("bare", "duogard"), calls)
                if not isinstance(zero_copy.get((direction, impl, k, n)), str)
            ]
            # the bare and the duogard call alternate, call by call: a pair sees the same machine
            for _ in range(sz.conv_reps if k == 1 else max(3, sz.conv_reps // 2)):
                for key, f in timed:
                    t0 = time.perf_counter()
                    f()
                    times.setdefault(key, []).append(time.perf_counter() - t0)
    recs = []
    for (direction, impl, k, n), zc in zero_copy.items():
        rec = {
            "section": "conversion",
            "direction": direction,
            "impl": impl,
            "leaves": k,
            "elements": n,
            "median_s": median(times.get((direction, impl, k, n), [])),
        }
        if isinstance(zc, str):
            rec["error"] = zc
        else:
            rec["zero_copy"] = bool(zc)
        recs.append(rec)
    index = {(r["direction"], r["impl"], r["leaves"], r["elements"]): r for r in recs}
    smallest = min(sz.conv_sizes)
    for rec in recs:
        direction, impl, k = rec["direction"], rec["impl"], rec["leaves"]
        ref = index.get((direction, impl, k, smallest)) if k == 1 else None
        rec["ratios"] = {"to_smallest": ratio_of(rec["median_s"], ref["median_s"]) if ref else float("nan")}
        bare = index.get((direction, "bare", k, rec["elements"]))
        if impl == "duogard" and bare is not None:
            rec["ratios"]["duogard_over_bare"] = ratio_of(rec["median_s"], bare["median_s"])
    arrays.clear()  # the 1e8-element buffers go before the next section
    return recs
