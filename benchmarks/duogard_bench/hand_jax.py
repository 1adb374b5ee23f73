"""The hand-written JAX baselines: the benchmark models and their steps in bare JAX, without duogard."""

from __future__ import annotations

from ._common import LR, METHODS

__all__ = ["jax_apply", "jax_draw", "jax_draw_rank1", "jax_hand", "jax_per_example", "jax_rank1_jvp"]


def jax_apply(ops, layers, x, eps=None, inputs=None, pre=None):
    """The model's forward pass in bare JAX.

    Args:
        ops: the op list (:func:`duogard_bench.workloads.ops_for`).
        layers: per-layer params, ``[{"weight", "bias"}, ...]``.
        x: the input batch.
        eps: if given, added to each layer's pre-activation (forward-activity).
        inputs: if given, each layer's input is appended to it.
        pre: if given, each layer's pre-activation is appended to it.

    Returns:
        The logits.
    """
    import jax
    import jax.numpy as jnp

    h, i = x, 0
    for op in ops:
        if op in ("linear", "conv"):
            if inputs is not None:
                inputs.append(h)
            w, b = layers[i]["weight"], layers[i]["bias"]
            if op == "linear":
                h = h @ w.T + b
            else:
                h = jax.lax.conv_general_dilated(
                    h, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NCHW", "OIHW", "NCHW")
                )
                h = h + b[None, :, None, None]
            if pre is not None:
                pre.append(h)
            if eps is not None:
                h = h + eps[i]
            i += 1
        elif op == "relu":
            h = jnp.maximum(h, 0)
        elif op == "pool":
            h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
        elif op == "flatten":
            h = h.reshape(h.shape[0], -1)
    return h


def jax_per_example(z, y):
    """Per-example cross-entropy of logits ``z`` against labels ``y``."""
    import jax
    import jax.numpy as jnp

    return -jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], axis=1)[:, 0]


def jax_draw(key, shapes, dist):
    """One array of each shape in ``shapes``, normal or (``dist="rademacher"``) Rademacher."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(key, len(shapes))
    if dist == "rademacher":
        return [jax.random.rademacher(k, s, dtype=jnp.float32) for k, s in zip(keys, shapes)]
    return [jax.random.normal(k, s, dtype=jnp.float32) for k, s in zip(keys, shapes)]


def jax_draw_rank1(key, shapes, k, dist):
    """K rank-1 tangents per leaf: ``(u, w)`` with ``u`` ``(K, out)`` and ``w`` ``(K, *rest)`` for
    a leaf of two or more axes (the tangent ``u ⊗ w``), a dense ``(K, *shape)`` array otherwise."""
    import jax

    out = []
    for kk, s in zip(jax.random.split(key, len(shapes)), shapes):
        if len(s) >= 2:
            u, w = jax_draw(kk, [(k, s[0]), (k, *s[1:])], dist)
            out.append((u, w))
        else:
            out.append(jax_draw(kk, [(k, *s)], dist)[0])
    return out


def _conv(h, w):
    import jax

    return jax.lax.conv_general_dilated(
        h, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NCHW", "OIHW", "NCHW")
    )


def jax_rank1_jvp(ops, layers, tangents, x, y, k):
    """Loss and its K directional derivatives along rank-1 tangents, the factors carried through.

    Linear: ``t_out = (x·w) uᵀ + t_in Wᵀ + t_b``; Conv2d: ``u ⊗ conv(x, k) + conv(t_in, W) + t_b``;
    ReLU masks, pooling is ``jax.jvp`` of the pool (vmapped over K), cross-entropy's tangent is
    ``(softmax(z) - onehot(y)) / B`` against ``t_z``.

    Args:
        ops: the op list.
        layers: per-layer params (JAX arrays).
        tangents: per layer ``{"weight": (u, w), "bias": (K, out)}`` (:func:`jax_draw_rank1`).
        x: the input batch.
        y: the labels.
        k: the number of tangents K.

    Returns:
        ``(value, d)``: the mean cross-entropy and its K directional derivatives, shape ``(K,)``.
    """
    import jax
    import jax.numpy as jnp

    def pool(h):
        return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")

    h, hd, i = x, None, 0
    for op in ops:
        if op in ("linear", "conv"):
            w, b = layers[i]["weight"], layers[i]["bias"]
            (u, wf), tb = tangents[i]["weight"], tangents[i]["bias"]
            if op == "linear":
                z = h @ w.T + b
                zd = (wf @ h.T)[:, :, None] * u[:, None, :] + tb[:, None, :]  # (K, B, out)
                if hd is not None:
                    zd = zd + hd @ w.T
            else:
                z = _conv(h, w) + b[None, :, None, None]
                t = jnp.transpose(_conv(h, wf), (1, 0, 2, 3))[:, :, None]  # (K, B, 1, H, W)
                zd = t * u[:, None, :, None, None] + tb[:, None, :, None, None]
                if hd is not None:
                    n = hd.shape[1]
                    zd = zd + _conv(hd.reshape(k * n, *hd.shape[2:]), w).reshape(k, n, *z.shape[1:])
            h, hd, i = z, zd, i + 1
        elif op == "relu":
            h, hd = jnp.maximum(h, 0), hd * (h > 0)
        elif op == "pool":
            h, hd = pool(h), jax.vmap(lambda t, h=h: jax.jvp(pool, (h,), (t,))[1])(hd)
        elif op == "flatten":
            h, hd = h.reshape(h.shape[0], -1), (None if hd is None else hd.reshape(k, h.shape[0], -1))
    value = jnp.mean(jax_per_example(h, y))
    g = (jax.nn.softmax(h) - jax.nn.one_hot(y, h.shape[-1], dtype=h.dtype)) / h.shape[0]
    return value, jnp.sum(g[None] * hd, axis=(1, 2))


def jax_hand(ops, layers_np, x_np, y_np, method, *, jit=None):
    """A hand-written JAX step (jit of value_and_grad / jvp + SGD).

    Args:
        ops: the op list.
        layers_np: per-layer NumPy params.
        x_np: the input batch.
        y_np: the labels.
        method: a key of ``METHODS``.
        jit: compiles the step (None: ``jax.jit``; the memory section passes the backend's
            ``jit``, whose programs its ``step_memory`` sees).

    Returns:
        ``(run, draw)``: ``run()`` takes one step and returns the loss; ``draw()`` draws one
        step's tangents alone (None for backprop).
    """
    import jax
    import jax.numpy as jnp

    layers = jax.tree.map(jnp.asarray, layers_np)
    x, y = jnp.asarray(x_np), jnp.asarray(y_np, dtype=jnp.int32)
    batch = x.shape[0]
    treedef = jax.tree.structure(layers)
    leaf_shapes = [tuple(a.shape) for a in jax.tree.leaves(layers)]
    kinds = [op for op in ops if op in ("linear", "conv")]
    est, opts = METHODS[method]

    def loss(p):
        return jnp.mean(jax_per_example(jax_apply(ops, p, x), y))

    if est == "backprop":

        def step(p, key):
            value, g = jax.value_and_grad(loss)(p)
            return jax.tree.map(lambda a, b: a - LR * b, p, g), value

        sample = None
    elif est == "forward" and opts.get("tangents") == "rank1":
        k, dist = opts["num_tangents"], opts["distribution"]

        def sample(key):
            return jax_draw_rank1(key, leaf_shapes, k, dist)

        def step(p, key):  # the factored forward pass, then a rank-1 update per weight
            v = jax.tree.unflatten(treedef, sample(key))
            value, d = jax_rank1_jvp(ops, p, v, x, y, k)

            def update(a, t):
                if isinstance(t, tuple):
                    u, w = t
                    if k == 1:
                        return a - (LR * d[0]) * jnp.outer(u[0], w[0].reshape(-1)).reshape(a.shape)
                    g = (u * d[:, None]).T @ w.reshape(k, -1)  # sum_k d_k u_k w_kᵀ
                    return a - (LR / k) * g.reshape(a.shape)
                return a - (LR / k) * jnp.tensordot(d, t, axes=1)

            return jax.tree.map(update, p, v, is_leaf=lambda t: isinstance(t, tuple)), value
    elif est == "forward":
        k, dist = opts["num_tangents"], opts["distribution"]
        shapes = leaf_shapes if k == 1 else [(k, *s) for s in leaf_shapes]

        def sample(key):
            return jax_draw(key, shapes, dist)

        def step(p, key):
            v = jax.tree.unflatten(treedef, sample(key))
            if k == 1:
                value, d = jax.jvp(loss, (p,), (v,))
                return jax.tree.map(lambda a, t: a - (LR * d) * t, p, v), value
            values, d = jax.vmap(lambda t: jax.jvp(loss, (p,), (t,)))(v)
            return jax.tree.map(lambda a, t: a - (LR / k) * jnp.tensordot(d, t, axes=1), p, v), values[0]
    else:  # forward-activity: perturb each layer's pre-activations, per example

        def pre_activations(p):
            zs = []
            jax_apply(ops, p, x, pre=zs)
            return zs

        pre_shapes = [tuple(z.shape) for z in jax.eval_shape(pre_activations, layers)]

        def sample(key):
            return jax_draw(key, pre_shapes, opts.get("distribution", "normal"))

        def step(p, key):
            u = sample(key)

            def per_example(eps):
                inputs = []
                z = jax_apply(ops, p, x, eps=eps, inputs=inputs)
                return jax_per_example(z, y) / batch, inputs

            zeros = [jnp.zeros(s, jnp.float32) for s in pre_shapes]
            per, dper, inputs = jax.jvp(per_example, (zeros,), (u,), has_aux=True)
            new = []
            for kind, layer, a, ui in zip(kinds, p, inputs, u):
                gz = dper.reshape((-1,) + (1,) * (ui.ndim - 1)) * ui
                if kind == "linear":
                    gw, gb = gz.T @ a, gz.sum(0)
                else:
                    _, pull = jax.vjp(
                        lambda w: jax.lax.conv_general_dilated(
                            a, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NCHW", "OIHW", "NCHW")
                        ),
                        layer["weight"],
                    )
                    gw, gb = pull(gz)[0], gz.sum((0, 2, 3))
                new.append({"weight": layer["weight"] - LR * gw, "bias": layer["bias"] - LR * gb})
            return new, per.sum()

    jit = jax.jit if jit is None else jit
    step = jit(step)
    sample_j = jit(sample) if sample is not None else None
    keys = [jax.random.fold_in(jax.random.key(0), i) for i in range(16)]
    state = {"p": layers, "i": 0}

    def run():
        p, value = step(state["p"], keys[state["i"] % 16])
        jax.block_until_ready(p)
        state["p"], state["i"] = p, state["i"] + 1
        return value

    def draw():
        jax.block_until_ready(sample_j(keys[0]))

    return run, (draw if sample_j is not None else None)
