"""Where a forward-gradient step's time goes, piece by piece, duogard against bare framework
code (interleaved, medians). Backs the proposals in RESULTS.md.

    python benchmarks/forward_breakdown.py --model mlp [--rounds 7]

torch pieces: the tangent draw; the model's forward pass (duogard's layers through the array
API vs F.linear/F.conv2d) with no autodiff; the JVP (torch.func.jvp over duogard's loss, over
F ops, and hand-written rules); what follows the JVP in duogard (d*v, the SGD transform,
apply_updates, the |grad|^2 the trainer logs) against one in-place _foreach_add_; backprop
(duogard, torch.func, loss.backward()). JAX pieces: the jitted estimator alone, the jitted
Trainer step, and hand-written jitted jvp / step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def _stepper(tr, params_np, x, y, key):
    """A step of ``tr`` on params of its own, each call continuing from the last (the step donates
    its params on JAX: a buffer cannot be stepped twice)."""
    state = list(tr.init_state(params_np))

    def run():
        state[0], state[1], loss, _ = tr.step(state[0], state[1], x, y, key)
        return loss

    return run


def main() -> int:
    import jax
    import jax.numpy as jnp
    import torch
    import torch.func
    import torch.nn.functional as F

    import duogard as dg
    import duogard_bench as bench
    from duogard import optim
    from duogard.grad import FlatView, supervised
    from duogard.tree import tree_leaves, tree_map

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()

    sz = bench.sizes_for()
    x_np, y_np = bench.data_for(sz)
    model, params_np, ops, layers_np = bench.workload(a.model, sz, x_np)
    loss_fn = supervised(model, dg.losses.cross_entropy)
    pieces: dict[str, callable] = {}

    # ------------------------------------------------------------------ torch
    bt = dg.backend("torch")
    tp = tree_map(bt.asarray, params_np)
    tx, ty = bt.asarray(x_np), bt.asarray(y_np)
    key = bt.key(0)
    est_n = dg.estimator("forward", num_tangents=1, distribution="normal")
    flat = FlatView.of(tp)
    v = est_n.sample(loss_fn, tp, (tx, ty), key)
    vtree = flat.unflatten(bt, v[0])
    layers = [{k: torch.tensor(t) for k, t in layer.items()} for layer in layers_np]
    leaves = bench.torch_leaves(layers)
    vleaves = [t.clone() for t in tree_leaves(vtree)]
    # duogard orders leaves by sorted dict keys; the hand-written layers list is in layer order
    vhand = [{"weight": vtree[k]["weight"], "bias": vtree[k]["bias"]} for k in sorted(vtree, key=int)]
    vhand_leaves = bench.torch_leaves(vhand)

    def hand_loss(*flat_leaves):
        ls = [
            {"weight": flat_leaves[2 * i], "bias": flat_leaves[2 * i + 1]}
            for i in range(len(flat_leaves) // 2)
        ]
        return F.cross_entropy(bench.torch_apply(ops, ls, tx), ty)

    sgd = optim.sgd(bench.LR)
    sgd_state = sgd.init(tp)
    d_scalar = torch.tensor(0.5)

    def duogard_after_jvp():
        g = flat.unflatten(bt, d_scalar * v[0])
        u, _ = sgd.update(g, sgd_state, tp)
        new = optim.apply_updates(tp, u)
        gsq = sum(bt.xp.sum(t * t) for t in tree_leaves(g))
        return new, gsq

    scratch = [t.clone() for t in leaves]
    pieces.update(
        {
            "torch draw: duogard est.sample (normal)": lambda: est_n.sample(loss_fn, tp, (tx, ty), key),
            "torch draw: torch.randn per leaf (global generator)": lambda: [
                torch.randn(t.shape) for t in leaves
            ],
            "torch forward pass: duogard model.apply + loss": lambda: loss_fn(tp, (tx, ty)),
            "torch forward pass: F ops + F.cross_entropy": lambda: hand_loss(*leaves),
            "torch jvp: torch.func.jvp over duogard loss": lambda: bt.jvp(
                lambda q: loss_fn(q, (tx, ty)), (tp,), (vtree,)
            ),
            "torch jvp: torch.func.jvp over F ops": lambda: torch.func.jvp(
                hand_loss, tuple(leaves), tuple(vhand_leaves)
            ),
            "torch jvp: hand-written rules": lambda: bench.manual_jvp(
                ops, layers, [{k: t[None] for k, t in layer.items()} for layer in vhand], tx, ty, 1
            ),
            "torch after jvp: duogard d*v, sgd, apply_updates, |g|^2": duogard_after_jvp,
            "torch after jvp: |g|^2 alone (sum of g*g per leaf)": lambda: sum(
                bt.xp.sum(t * t) for t in vleaves
            ),
            "torch after jvp: |g|^2 by torch._foreach_norm": lambda: (
                torch.stack(torch._foreach_norm(vleaves)).square().sum()
            ),
            "torch after jvp: in-place _foreach_add_": lambda: torch._foreach_add_(
                scratch, vhand_leaves, alpha=-1e-12
            ),
            "torch backprop: duogard value_and_grad": lambda: bt.value_and_grad(loss_fn)(tp, (tx, ty)),
            "torch backprop: torch.func.grad_and_value over F ops": lambda: torch.func.grad_and_value(
                hand_loss, argnums=tuple(range(len(leaves)))
            )(*leaves),
        }
    )
    est_r = dg.estimator("forward", num_tangents=1, distribution="rademacher")
    tr_r = dg.Trainer(model, optimizer=optim.sgd(bench.LR), estimator=est_r, backend="torch")
    st_r = tr_r.optimizer.init(tp)
    own = tree_map(lambda t: t.clone(), tp)
    own_leaves = tree_leaves(own)

    def inplace_rademacher():
        value, g = est_r(loss_fn, own, (tx, ty), key)
        torch._foreach_add_(own_leaves, tree_leaves(g), alpha=-bench.LR)
        return value

    pieces["torch Trainer.step (rademacher)"] = lambda: tr_r.step(tp, st_r, tx, ty, key)
    pieces["torch estimator (rademacher) + in-place _foreach_add_"] = inplace_rademacher
    pieces["torch estimator (rademacher) alone"] = lambda: est_r(loss_fn, tp, (tx, ty), key)
    grad_leaves = [t.clone().requires_grad_(True) for t in leaves]

    def autograd_bp():
        ls = [
            {"weight": grad_leaves[2 * i], "bias": grad_leaves[2 * i + 1]}
            for i in range(len(grad_leaves) // 2)
        ]
        loss = F.cross_entropy(bench.torch_apply(ops, ls, tx), ty)
        loss.backward()
        for t in grad_leaves:
            t.grad = None

    pieces["torch backprop: loss.backward()"] = autograd_bp

    # ------------------------------------------------------------------ jax
    bj = dg.backend("jax")
    jp = tree_map(bj.asarray, params_np)
    jx, jy = bj.asarray(x_np), bj.asarray(y_np)
    jkey = bj.key(0)
    for dist in ("normal", "rademacher"):
        est = dg.estimator("forward", num_tangents=1, distribution=dist)
        est_j = jax.jit(lambda q, xx, yy, k, est=est: est(loss_fn, q, (xx, yy), k))
        tr = dg.Trainer(model, optimizer=optim.sgd(bench.LR), estimator=est, backend="jax")
        pieces[f"jax estimator alone (jit), {dist}"] = lambda f=est_j: f(jp, jx, jy, jkey)
        pieces[f"jax Trainer.step, {dist}"] = _stepper(tr, params_np, jx, jy, jkey)
        hand_run = bench.jax_hand(ops, layers_np, x_np, y_np, f"fwd-K1-{dist}")[0]
        pieces[f"jax hand-written step, {dist}"] = hand_run
    est_b = dg.estimator("backprop")
    pieces["jax estimator alone (jit), backprop"] = (
        lambda f=jax.jit(lambda q, xx, yy: est_b(loss_fn, q, (xx, yy))): f(jp, jx, jy)
    )
    pieces["jax hand-written step, backprop"] = bench.jax_hand(ops, layers_np, x_np, y_np, "backprop")[0]
    hand_jvp_only = jax.jit(
        lambda q, t: jax.jvp(
            lambda r: jnp.mean(
                bench.jax_per_example(
                    bench.jax_apply(ops, r, jnp.asarray(x_np)), jnp.asarray(y_np, jnp.int32)
                )
            ),
            (q,),
            (t,),
        )
    )
    jl = jax.tree.map(jnp.asarray, layers_np)
    jt = jax.tree.map(jnp.ones_like, jl)
    pieces["jax hand-written jvp alone (jit, tangent given)"] = lambda: hand_jvp_only(jl, jt)

    # what Trainer.step adds around the estimator: the SGD transform, apply_updates, |g|^2
    for name in ("backprop", "rademacher"):
        est = (
            est_b
            if name == "backprop"
            else dg.estimator("forward", num_tangents=1, distribution="rademacher")
        )
        opt = optim.sgd(bench.LR)

        def make(gsq: bool, est=est, opt=opt):
            def step(q, s, xx, yy, k):
                value, g = est(loss_fn, q, (xx, yy), k)
                u, s = opt.update(g, s, q)
                q = optim.apply_updates(q, u)
                extra = sum(jnp.sum(t * t) for t in tree_leaves(g)) if gsq else 0.0
                return q, s, value, extra

            return step

        st0 = opt.init(jp)
        with_gsq, no_gsq = jax.jit(make(True)), jax.jit(make(False))
        donated = jax.jit(make(False), donate_argnums=(0,))
        holder = {"p": tree_map(jnp.array, jp)}

        def run_donated(f=donated, holder=holder, st0=st0):
            holder["p"] = f(holder["p"], st0, jx, jy, jkey)[0]
            return holder["p"]

        pieces[f"jax step as Trainer ({name}): est + sgd + |g|^2"] = lambda f=with_gsq, st0=st0: f(
            jp, st0, jx, jy, jkey
        )
        pieces[f"jax step as Trainer ({name}) without |g|^2"] = lambda f=no_gsq, st0=st0: f(
            jp, st0, jx, jy, jkey
        )
        pieces[f"jax step as Trainer ({name}) without |g|^2, params donated"] = run_donated

    # JAX, K = 4 tangents: the draw, the vmapped JVP with tangents given, and both in one program
    k4 = 4
    est4 = dg.estimator("forward", num_tangents=k4)
    tr4 = dg.Trainer(model, optimizer=optim.sgd(bench.LR), estimator=est4, backend="jax")
    draw4 = jax.jit(lambda q, xx, yy, k: est4.sample(loss_fn, q, (xx, yy), k))
    v4 = draw4(jp, jx, jy, jkey)
    est4_given = jax.jit(lambda q, xx, yy, v: est4.estimate(loss_fn, q, (xx, yy), v))

    def est4_lax_map(q, xx, yy, k):
        v = est4.sample(loss_fn, q, (xx, yy), k)
        vt = FlatView.of(q).unflatten(bj, v, leading=(k4,))
        _, ds = jax.lax.map(lambda t: jax.jvp(lambda r: loss_fn(r, (xx, yy)), (q,), (t,)), vt)
        return FlatView.of(q).unflatten(bj, ds @ v / k4)

    est4_map = jax.jit(est4_lax_map)
    pieces.update(
        {
            "jax K=4: Trainer.step": _stepper(tr4, params_np, jx, jy, jkey),
            "jax K=4: est.sample alone (jit)": lambda: draw4(jp, jx, jy, jkey),
            "jax K=4: est.estimate with tangents given (jit)": lambda: est4_given(jp, jx, jy, v4),
            "jax K=4: sample + lax.map over the K jvps (jit)": lambda: est4_map(jp, jx, jy, jkey),
        }
    )

    # ------------------------------------------------------------------ time, interleaved
    def block(out):
        bench.block_until_ready(out)

    for f in pieces.values():
        block(f())
        block(f())
    times = {k: [] for k in pieces}
    for _ in range(a.rounds):
        for k, f in pieces.items():
            for _ in range(a.reps):
                t0 = time.perf_counter()
                block(f())
                times[k].append(time.perf_counter() - t0)
    print(f"{a.model}, batch {sz.batch}, n = {flat.size:,} parameters; median ms over {a.rounds}x{a.reps}")
    width = max(len(k) for k in times)
    for k, ts in times.items():
        print(f"  {k.ljust(width)}  {1e3 * statistics.median(ts):8.3f}")
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    raise SystemExit(main())
