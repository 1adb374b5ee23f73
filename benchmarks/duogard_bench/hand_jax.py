"""The hand-written JAX baselines: the benchmark models and their steps in bare JAX, without duogard."""

from __future__ import annotations

from ._common import LR, METHODS

__all__ = ["jax_apply", "jax_draw", "jax_hand", "jax_per_example"]


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


def jax_hand(ops, layers_np, x_np, y_np, method):
    """A hand-written JAX step (jit of value_and_grad / jvp + SGD).

    Args:
        ops: the op list.
        layers_np: per-layer NumPy params.
        x_np: the input batch.
        y_np: the labels.
        method: a key of ``METHODS``.

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

    step = jax.jit(step)
    sample_j = jax.jit(sample) if sample is not None else None
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
