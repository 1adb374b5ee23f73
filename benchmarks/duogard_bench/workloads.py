"""What is timed: the benchmark models, their params and data, and duogard's own training step."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ._common import LR, METHODS, Sizes, block_until_ready

__all__ = [
    "Workload",
    "data_for",
    "duogard_model",
    "duogard_step",
    "has_jvp_option",
    "layers_of",
    "ops_for",
    "workload",
]


def ops_for(model: str, sz: Sizes) -> list[str]:
    """The architecture as a list of ops; ``linear``/``conv`` take the next layer's params.

    Args:
        model: ``"mlp"`` or ``"cnn"``.
        sz: the run's sizes.

    Returns:
        The op names, in order (``flatten``, ``linear``, ``conv``, ``relu``, ``pool``).
    """
    if model == "mlp":
        return ["flatten"] + ["linear", "relu"] * len(sz.mlp_hidden) + ["linear"]
    block = ["conv", "relu", "conv", "relu", "pool"]
    return block + block + ["flatten", "linear", "relu", "linear"]


def duogard_model(model: str, sz: Sizes, hidden=None):
    """duogard's model for ``"mlp"`` (hidden widths ``hidden``, else the run's) or ``"cnn"``."""
    from duogard.train import build_model

    if model == "mlp":
        return build_model("mlp", 10, hidden=tuple(hidden or sz.mlp_hidden))
    return build_model("cnn", 10, channels=sz.cnn_channels, cnn_hidden=sz.cnn_hidden)


class Workload(NamedTuple):
    """One benchmark model, made once: the duogard model, its NumPy params, and the op list and
    per-layer params that the hand-written steps read."""

    model: Any
    params_np: dict
    ops: list
    layers_np: list


def workload(model_name: str, sz: Sizes, x_np) -> Workload:
    """Build one benchmark model and its params (seed 0).

    Args:
        model_name: ``"mlp"`` or ``"cnn"``.
        sz: the run's sizes.
        x_np: an input batch (sets the params' shapes).

    Returns:
        The :class:`Workload`.
    """
    model = duogard_model(model_name, sz)
    params_np = model.init(0, x_np)
    return Workload(model, params_np, ops_for(model_name, sz), layers_of(params_np))


def layers_of(params_np) -> list[dict]:
    """duogard's params ({"1": {"weight", "bias"}, ...}) as an ordered list of layers."""
    return [params_np[k] for k in sorted(params_np, key=int)]


def data_for(sz: Sizes, batch=None):
    """A fixed batch (seed 0) of ``batch`` (default ``sz.batch``) images and labels, as NumPy arrays.

    Returns:
        ``(x, y)``: float32 images of shape ``(batch, *sz.image)`` and int64 labels in ``[0, 10)``.
    """
    rng = np.random.default_rng(0)
    b = batch or sz.batch
    x = rng.standard_normal((b, *sz.image)).astype(np.float32)
    y = rng.integers(0, 10, b).astype(np.int64)
    return x, y


def has_jvp_option() -> bool:
    """Whether duogard's forward estimator takes a ``jvp`` option."""
    import inspect

    from duogard.grad import Forward

    return "jvp" in inspect.signature(Forward.__init__).parameters


def duogard_step(
    backend,
    model,
    params_np,
    x_np,
    y_np,
    method,
    compile=None,
    jvp=None,
    lean=False,
    grad_norm=False,
    generator=None,
):
    """duogard's ``Trainer.step`` (estimator + SGD update).

    Args:
        backend: ``"jax"`` or ``"torch"``.
        model: the duogard model.
        params_np: its NumPy params.
        x_np: the input batch.
        y_np: the labels.
        method: a key of ``METHODS``.
        compile: the Trainer's ``compile`` option.
        jvp: the forward estimator's ``jvp`` option (``"framework"`` forces the framework's
            generic forward AD where duogard would use its own rules).
        lean: the forward estimator's ``lean`` option (the fused, layer-by-layer step of
            ``duogard.grad._lean``).
        grad_norm: the Trainer's option (fit's default; off here, as the hand-written steps
            compute no norm: the ``duogard-gradnorm`` rows measure what it costs).
        generator: the forward estimator's ``generator`` option (None: its default, duogard's
            portable Philox generator; ``"native"``: the framework's own).

    Returns:
        ``(run, draw)``: ``run()`` takes one step and returns the loss; ``draw()`` draws one
        step's tangents alone (None for a deterministic estimator).
    """
    import duogard as dg
    from duogard import optim
    from duogard.train import Trainer

    be = dg.backend(backend)
    est_name, opts = METHODS[method]
    if jvp is not None:
        opts = {**opts, "jvp": jvp}
    if lean:
        opts = {**opts, "lean": True}
    if generator is not None:
        opts = {**opts, "generator": generator}
    est = dg.estimator(est_name, **opts)
    tr = Trainer(
        model, optimizer=optim.sgd(LR), estimator=est, backend=backend, compile=compile, grad_norm=grad_norm
    )
    params, opt_state = tr.init_state(params_np)
    x, y = be.asarray(x_np), be.asarray(y_np)
    keys = [be.fold_in(be.key(0), i) for i in range(16)]
    state = {"p": params, "s": opt_state, "i": 0}

    def run():
        p, s, value, _ = tr.step(state["p"], state["s"], x, y, keys[state["i"] % 16])
        block_until_ready(p)
        state.update(p=p, s=s, i=state["i"] + 1)
        return value

    draw = None
    if est.stochastic and getattr(est, "tangents", "dense") == "rank1":
        from duogard.tree import Rank1, tree_leaves

        # the factors as drawn (est.sample would form the dense u wᵀ to flatten them)
        sample = be.jit(
            lambda p, key: [
                (t.u, t.w) if isinstance(t, Rank1) else t for t in tree_leaves(est.tangent_tree(p, key))
            ]
        )

        def draw():
            block_until_ready(sample(state["p"], keys[0]))
    elif est.stochastic:
        sample = be.jit(lambda p, xx, yy, key: est.sample(tr.loss_fn, p, (xx, yy), key))

        def draw():
            block_until_ready(sample(state["p"], x, y, keys[0]))

    return run, draw
