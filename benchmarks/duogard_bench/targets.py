"""The targets of the suite: each one PASS or MISS, with the measured ratio and the reason."""

from __future__ import annotations

import math

from ._common import BAYDIN_RATIO, FORWARD_METHODS, TARGETS, fmt, median, ratio_of

__all__ = ["evaluate_targets"]


# ============================================================================ targets


def evaluate_targets(step, memory, conv, draw_opts) -> list[dict]:
    """Every target of the benchmarks issue: measured figure, limit, PASS/MISS and, for a miss, why
    and what would reach it.

    Args:
        step: the step records.
        memory: the memory records.
        conv: the conversion records.
        draw_opts: the drawing-option records.

    Returns:
        The targets, each with ``status`` (``"PASS"`` or ``"MISS"``).
    """
    out = []
    idx = {(r["backend"], r["model"], r["method"], r["impl"]): r for r in step}

    def t(b, m, me, im="duogard"):
        r = idx.get((b, m, me, im))
        return r["median_s"] if r else float("nan")

    def share(b, m, me, im="duogard"):
        r = idx.get((b, m, me, im))
        return r.get("ratios", {}).get("tangent_share", float("nan")) if r else float("nan")

    backends = sorted({r["backend"] for r in step})
    models = [m for m in ("mlp", "cnn") if any(r["model"] == m for r in step)]
    # 1. forward <= 1.0 x backprop
    for b in backends:
        for m in models:
            for me, im in (
                ("fwd-K1-normal", "duogard"),
                ("fwd-K1-rademacher", "duogard"),
                ("fwd-K1-normal", "duogard-lean"),
                ("fwd-K1-rademacher", "duogard-lean"),
            ):
                if (b, m, me, im) not in idx:
                    continue
                ratio = ratio_of(t(b, m, me, im), t(b, m, "backprop"))
                rec = {
                    "target": "forward step / backprop step",
                    "backend": b,
                    "model": m,
                    "method": me + (" lean" if im == "duogard-lean" else ""),
                    "measured": ratio,
                    "limit": TARGETS["forward_over_backprop"],
                    "baydin": BAYDIN_RATIO,
                }
                if im != "duogard":
                    out.append(rec)
                    continue
                if not ratio <= rec["limit"]:
                    hand = ratio_of(t(b, m, me, "hand"), t(b, m, "backprop", "hand"))
                    hj = ratio_of(t(b, m, me, "hand-jvp"), t(b, m, "backprop", "hand-autograd"))
                    sh = share(b, m, me)
                    draw_ms = 1e3 * sh * t(b, m, me) if math.isfinite(sh) else float("nan")
                    rest = ratio_of(
                        t(b, m, me) - (draw_ms / 1e3 if math.isfinite(draw_ms) else 0), t(b, m, "backprop")
                    )
                    why = (
                        f"drawing the tangent takes {fmt(draw_ms)} ms ({fmt(100 * sh, '.0f')}% of the "
                        f"step); without it the step is {fmt(rest)}x backprop; the hand-written {b} "
                        f"forward step is {fmt(hand)}x its backprop"
                    )
                    if b == "torch" and math.isfinite(hj):
                        why += f", and with hand-written JVP rules {fmt(hj)}x (against loss.backward())"
                    lim = rec["limit"]
                    if rest <= lim:
                        fix = (
                            f"the tangent drawing alone makes the difference ({fmt(draw_ms)} ms): a "
                            "cheaper draw (see the drawing table) reaches it"
                        )
                    elif hand <= lim:
                        fix = (
                            f"the bare framework reaches it (hand-written {fmt(hand)}x), so the gap is "
                            "duogard's own overhead: see the duogard/hand-written target and the "
                            "proposals"
                        )
                    elif b == "torch" and hj <= lim:
                        fix = (
                            "forward-mode rules written by hand reach it: give duogard's Linear/Conv2d/"
                            "ReLU/pooling/cross-entropy their own JVP rules on torch instead of "
                            "torch.func.jvp"
                        )
                    elif math.isfinite(sh) and sh > 0.1:
                        fix = "draw cheaper tangents (see the drawing table), then the JVP itself"
                    else:
                        fix = (
                            "nothing within duogard: the framework's forward mode costs more than its "
                            "reverse mode for this model, hand-written too"
                        )
                    rec["why"] = why + ". To reach it: " + fix + "."
                out.append(rec)
    # 1b. rank-1 tangents against backprop (MLP)
    out.extend(_rank1_targets(idx, t, share, backends))
    # 2. duogard <= 1.15 x hand-written (issue 29)
    for b in backends:
        for m in models:
            ratios = {
                me: r["ratios"].get("duogard_over_hand")
                for (bb, mm, me, im), r in idx.items()
                if (bb, mm, im) == (b, m, "duogard") and r["ratios"].get("duogard_over_hand") is not None
            }
            ratios = {k: v for k, v in ratios.items() if math.isfinite(v)}
            if not ratios:
                continue
            worst = max(ratios, key=ratios.get)
            rec = {
                "target": "duogard step / hand-written step (worst method)",
                "backend": b,
                "model": m,
                "method": worst,
                "measured": ratios[worst],
                "limit": TARGETS["duogard_over_hand"],
                "per_method": ratios,
            }
            misses = {k: v for k, v in ratios.items() if v > rec["limit"]}
            if misses:
                parts = []
                for me, v in sorted(misses.items(), key=lambda kv: -kv[1]):
                    extra_ms = 1e3 * (t(b, m, me) - t(b, m, me, "hand"))
                    d_draw = 1e3 * (
                        (idx[(b, m, me, "duogard")].get("draw_median_s") or 0)
                        - (idx.get((b, m, me, "hand"), {}).get("draw_median_s") or 0)
                    )
                    drawing = f", of which tangent drawing +{d_draw:.2f} ms" if me != "backprop" else ""
                    parts.append(f"{me} {v:.2f}x (+{extra_ms:.2f} ms" + drawing + ")")
                rec["why"] = (
                    "misses: " + "; ".join(parts) + ". See RESULTS.md (third to fifth rounds): "
                    "the rows found above the limit and what was fixed; on this shared machine single "
                    "ratios move by up to ±20% between runs, so re-time a miss in pairs before "
                    "chasing it."
                )
            out.append(rec)
    # 3. tangent drawing <= 25% of the forward step
    for b in backends:
        for m in models:
            shares = {me: share(b, m, me) for me in FORWARD_METHODS if (b, m, me, "duogard") in idx}
            shares = {k: v for k, v in shares.items() if math.isfinite(v)}
            if not shares:
                continue
            worst = max(shares, key=shares.get)
            rec = {
                "target": "tangent drawing / forward step (worst method)",
                "backend": b,
                "model": m,
                "method": worst,
                "measured": shares[worst],
                "limit": TARGETS["tangent_share"],
                "per_method": shares,
            }
            misses = {k: v for k, v in shares.items() if v > rec["limit"]}
            if misses:
                cheap = [d for d in draw_opts if d["backend"] == b]
                best = min(cheap, key=lambda d: d["ns_per_element"]) if cheap else None
                rec["why"] = (
                    "misses: "
                    + ", ".join(f"{k} {100 * v:.0f}%" for k, v in misses.items())
                    + (
                        f". The cheapest way measured here is '{best['way']}' at "
                        f"{best['ns_per_element']:.2f} ns/number"
                        if best
                        else ""
                    )
                    + "."
                )
            out.append(rec)
    # 4. memory: forward peak at the deepest within 1.2x of depth 4
    out.extend(_memory_targets(memory))
    # 5. conversion at the largest size within 2x of the smallest
    for direction in ("torch->jax", "jax->torch"):
        for impl in ("duogard", "bare"):
            rows = [
                r
                for r in conv
                if r.get("direction") == direction
                and r.get("impl") == impl
                and r.get("leaves", 1) == 1
                and "error" not in r
            ]
            if not rows:
                continue
            big = max(rows, key=lambda r: r["elements"])
            rec = {
                "target": f"conversion {direction} at {big['elements']:.0e} / smallest",
                "backend": direction,
                "model": "-",
                "method": impl,
                "measured": big["ratios"]["to_smallest"],
                "limit": TARGETS["conversion_size_ratio"],
                "zero_copy": big.get("zero_copy"),
            }
            if not rec["measured"] <= rec["limit"]:
                rec["why"] = (
                    "a copy happens at this size"
                    if not big.get("zero_copy")
                    else "zero-copy, so the time should not grow: noise or page faults on first touch"
                )
            out.append(rec)
    # 5b. duogard.convert within 1.3x of the bare from_dlpack per leaf, 1.5x for a tree
    out.extend(_conversion_over_bare_targets(conv))
    for rec in out:
        rec["status"] = "PASS" if rec["measured"] <= rec["limit"] else "MISS"
    return out


def _conversion_over_bare_targets(conv) -> list[dict]:
    """Target 5b: ``convert`` against the bare ``from_dlpack`` calls, one leaf and a tree."""
    out = []
    for direction in ("torch->jax", "jax->torch"):
        for tree in (False, True):
            rows = [
                r
                for r in conv
                if r.get("direction") == direction
                and r.get("impl") == "duogard"
                and (r.get("leaves", 1) > 1) == tree
                and math.isfinite(r.get("ratios", {}).get("duogard_over_bare", float("nan")))
            ]
            if not rows:
                continue
            measured = median([r["ratios"]["duogard_over_bare"] for r in rows])
            k = rows[0].get("leaves", 1)
            rec = {
                "target": f"convert / bare from_dlpack, {k} leaves"
                if tree
                else "convert / bare from_dlpack, one leaf",
                "backend": direction,
                "model": "-",
                "method": "tree" if tree else f"median of {len(rows)} sizes",
                "measured": measured,
                "limit": TARGETS["conversion_tree_over_bare" if tree else "conversion_over_bare"],
            }
            if not measured <= rec["limit"]:
                bare = [
                    q
                    for q in conv
                    if (q.get("direction"), q.get("impl"), q.get("leaves", 1)) == (direction, "bare", k)
                ]
                ours, theirs = _us_per_leaf(rows), _us_per_leaf(bare)
                rec["why"] = (
                    f"{fmt(ours, '.1f')} µs against {fmt(theirs, '.1f')} µs per leaf bare: "
                    f"+{fmt(ours - theirs, '.1f')} µs per leaf of duogard's own work (the leaf's "
                    "checks and the lookups of the fast route; a leaf the fast route does not take pays "
                    "the general route's). On a loaded machine single ratios move by ±20% between "
                    "runs: re-time a miss (benchmarks/conversion.py) before chasing it."
                )
            out.append(rec)
    return out


def _us_per_leaf(rows) -> float:
    """The median over ``rows`` (conversion records) of µs per leaf."""
    return median([1e6 * r["median_s"] / r.get("leaves", 1) for r in rows])


def _rank1_targets(idx, t, share, backends) -> list[dict]:
    """Target 1b: the rank-1 forward step (duogard, and its lean step) against backprop, on the MLP
    and the CNN, and K = 16 dense Rademacher tangents on the MLP, at issue 29's limits."""
    out = []
    for b in backends:
        for model, me, im, limit in (
            ("mlp", "fwd-K1-normal-rank1", "duogard", TARGETS["rank1_over_backprop"]),
            ("mlp", "fwd-K1-normal-rank1", "duogard-lean", TARGETS["rank1_lean_over_backprop"]),
            ("cnn", "fwd-K1-normal-rank1", "duogard", TARGETS["rank1_cnn_over_backprop"]),
            ("mlp", "fwd-K16-normal-rank1", "duogard", TARGETS["rank1_k16_over_backprop"]),
            ("mlp", "fwd-K16-rademacher", "duogard", TARGETS["k16_rademacher_over_backprop"]),
        ):
            if (b, model, me, im) not in idx:
                continue
            r = idx[(b, model, me, im)]
            rec = {
                "target": ("rank-1 " if "rank1" in me else "dense ") + "forward step / backprop step",
                "backend": b,
                "model": model,
                "method": me + (" lean" if im == "duogard-lean" else ""),
                "measured": ratio_of(t(b, model, me, im), t(b, model, "backprop")),
                "limit": limit,
                "rank1_over_dense": r.get("ratios", {}).get("rank1_over_dense"),
            }
            if not rec["measured"] <= limit:
                hand = ratio_of(t(b, model, me, "hand"), t(b, model, "backprop", "hand"))
                sh = share(b, model, me, im)
                dense = rec["rank1_over_dense"]
                rec["why"] = (
                    f"{fmt(1e3 * t(b, model, me, im))} ms against {fmt(1e3 * t(b, model, 'backprop'))} ms; "
                    f"the hand-written {b} step is {fmt(hand)}x its backprop"
                    + (
                        f"; drawing the factors is {fmt(100 * sh, '.0f')}% of the step"
                        if math.isfinite(sh)
                        else ""
                    )
                    + (f"; {fmt(dense)}x the dense-tangent step of the same K" if dense is not None else "")
                    + (
                        ". The hand-written step misses too, so the gap is not duogard's own: it "
                        "is the framework's forward pass (the primal and its K tangents) against one "
                        "forward and one backward pass, or the machine"
                        if hand > limit
                        else ". The hand-written step reaches it: the gap is duogard's own overhead"
                    )
                    + "."
                )
            out.append(rec)
    return out


def _memory_targets(memory) -> list[dict]:
    """Target 4: the forward step memory at the deepest MLP within 1.2x of depth 4, per
    implementation (the step's own arrays, as ``fit`` reports them; not the process's RSS)."""
    out = []
    groups = sorted({(r["backend"], r["method"], r["impl"]) for r in memory if "error" not in r})
    for b, me, im in groups:
        rows = {
            r["depth"]: r
            for r in memory
            if (r["backend"], r["method"], r["impl"]) == (b, me, im) and "error" not in r
        }
        if len(rows) < 2 or me != "forward":
            continue
        deep = max(rows)
        ref = 4 if 4 in rows and 4 < deep else min(rows)
        ratio = ratio_of(rows[deep]["step_memory_mb"], rows[ref]["step_memory_mb"])
        rec = {
            "target": f"forward step memory, depth {deep} / depth {ref}",
            "backend": b,
            "model": "mlp",
            "method": f"forward ({im})",
            "measured": ratio,
            "limit": TARGETS["memory_depth_ratio"],
        }
        if not ratio <= rec["limit"]:
            p_deep = rows[deep]["params_mb"]
            times_p = ratio_of(rows[deep]["step_memory_mb"], p_deep)
            lean = [
                r
                for r in memory
                if (r["backend"], r["method"], r["impl"]) == (b, "forward", "duogard-lean")
                and r["depth"] == deep
                and "ratios" in r
            ]
            rec["why"] = (
                f"the step memory at depth {deep} is {times_p:.1f}x the parameters ({p_deep:.0f} MB): "
                "what grows is not activations but parameter-sized buffers (the whole tangent, "
                "the estimate d*v, the new params beside the old)"
            )
            if lean:
                lean_ratio = next(iter(lean[0]["ratios"].values()))
                rec["why"] += (
                    "; estimator('forward', lean=True) draws each layer's tangent from its own "
                    "key inside the JVP and again for an in-place update, and stays flat "
                    f"({lean_ratio:.2f}x)"
                )
        out.append(rec)
    return out
