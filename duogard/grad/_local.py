"""Local losses: each :class:`duogard.nn.Local` block learns from its own heads.

A model for local losses is a :class:`duogard.nn.Sequential` whose layers with parameters are
:class:`duogard.nn.Local` blocks, up to the last one, and then the *output part* (the layers
after the last block: the classifier). Its **local objective** is

    Σ_blocks Σ_groups loss(head_g(block output, group g), y)  +  loss(model output, y)

with the gradient stopped at the input of every block and of the output part: each block
learns only from its own heads (greedy, block by block; Belilovsky et al. 2019, Nøkland and
Eidnes 2019), and the output part from the task loss. The estimators here estimate the
gradient of that objective, except ``"forward-guess"`` which estimates the end-to-end one:

- ``"local-backprop"`` (LG-BP): its exact gradient (reverse mode inside each block): the
  control that separates the cost of greediness from the cost of an estimator;
- ``"local-forward-activity"`` (LG-FG-A, Ren et al. 2023): each block's Linear output is
  perturbed per example; group g's perturbation enters only group g's loss (the block's groups
  are separate after its Linear), so one JVP gives each group's directional derivative and
  the variance scales with the group's width, not the network's;
- ``"local-forward"`` (LG-FG-W): each block's Linear weight is perturbed, one directional
  derivative per group;
- ``"forward-guess"``: guessed tangents (Fournier et al. 2023).

In the forward-gradient ones the heads and the output part get their exact local gradient
(a linear head's is ``(p - y)ᵀ h``: no backward pass through the network). Their blocks must
be: parameterless layers (``LayerNorm(elementwise_affine=False)``, Flatten ...), one
:class:`duogard.nn.Linear`, then elementwise activations or Dropout: then group g's units
depend on group g's rows of the Linear only, which is what makes the group-wise estimates
unbiased. The training loss these estimators return is the task loss at the model's output.
"""

from __future__ import annotations

from duogard.backend import check_generator
from duogard.grad._base import Estimator, params_backend, register
from duogard.grad._forward import forward_mode_errors
from duogard.grad._objective import Supervised, _unpack
from duogard.nn import Activation, Dropout, Linear, Local, Sequential

__all__ = [
    "LocalBackprop",
    "LocalForward",
    "LocalForwardActivity",
    "local_objective",
    "local_losses",
    "local_model_of",
    "map_heads",
    "leaves_no_head",
]

_DISTRIBUTIONS = ("normal", "rademacher")
_NOT_ELEMENTWISE = ("softmax", "log_softmax")


def local_model_of(loss_fn, method: str):
    """``(model, loss, blocks, top)``: the Local blocks' indices and where the output part starts."""
    if not isinstance(loss_fn, Supervised) or not isinstance(loss_fn.model, Sequential):
        raise TypeError(
            f"{method}: supports losses made by duogard.grad.supervised(model, loss) with a "
            f"duogard.nn.Sequential model of nn.Local blocks; got {type(loss_fn).__name__}"
            + (f" over {type(loss_fn.model).__name__}" if isinstance(loss_fn, Supervised) else "")
        )
    model = loss_fn.model
    blocks = [i for i, layer in enumerate(model.layers) if isinstance(layer, Local)]
    if not blocks:
        raise TypeError(
            f"{method}: the model has no nn.Local block, so no local loss; wrap its hidden layers "
            "in nn.Local(..., num_classes=..., groups=...) or use an end-to-end estimator"
        )
    return model, loss_fn.loss, blocks, blocks[-1] + 1


def _check_parameterless(params, model, top: int, method: str) -> None:
    """Layers before the output part are Local blocks or have no parameters."""
    for i, layer in enumerate(model.layers[:top]):
        if not isinstance(layer, Local) and params.get(str(i)):
            raise TypeError(
                f"{method}: layer {i} ({type(layer).__name__}) has parameters but is outside any "
                "nn.Local block and before the last one; put it in a block (or after the last one)"
            )


def _block_loss(be, block, p, h, y, loss):
    """The block's local loss: the sum over its groups of each head's (batch-mean) loss."""
    logits = block.heads(be, p, h)  # (G, B, C)
    return block.groups * loss(logits, _per_group(be, y, block.groups))


def _per_group(be, y, groups: int):
    """The targets ``y`` repeated for each group: ``(G, *y.shape)``."""
    return be.xp.broadcast_to(y[None], (groups, *y.shape))


def local_losses(loss_fn, params, batch):
    """``(task_loss, [block losses])`` of a model of :class:`duogard.nn.Local` blocks, with the
    gradient stopped at the input of every block and of the output part.

    Args:
        loss_fn: ``duogard.grad.supervised(model, loss)``.
        params: the model's params.
        batch: ``(x, y)`` or ``(x, y, model_key)``.

    Returns:
        The task loss at the model's output and each block's local loss (the sum over its
        groups of its heads' losses), in the blocks' order.
    """
    model, loss, _, top = local_model_of(loss_fn, "local_losses")
    be = params_backend(params)
    x, y, key = _unpack(batch)
    train = key is not None
    block_losses = []
    for i, layer in enumerate(model.layers[:top]):
        p = params.get(str(i), {})
        lk = model.layer_key(be, key, i)
        if isinstance(layer, Local):
            x = layer.forward(be, p, be.stop_gradient(x), key=lk, train=train)
            block_losses.append(_block_loss(be, layer, p, x, y, loss))
        else:
            x = layer.forward(be, p, x, key=lk, train=train)
    x = be.stop_gradient(x)
    for i in range(top, len(model.layers)):
        x = model.layers[i].forward(
            be, params.get(str(i), {}), x, key=model.layer_key(be, key, i), train=train
        )
    return loss(x, y), block_losses


class _LocalObjective:
    """The local objective as a ``loss_fn(params, batch)`` (see :func:`local_objective`)."""

    def __init__(self, loss_fn):
        local_model_of(loss_fn, "local_objective")
        self.loss_fn = loss_fn

    def __call__(self, params, batch):
        task, blocks = local_losses(self.loss_fn, params, batch)
        return sum(blocks, task)

    def __repr__(self) -> str:
        return f"local_objective({self.loss_fn!r})"


def local_objective(loss_fn):
    """The local objective of a model of :class:`duogard.nn.Local` blocks, as a loss function.

    ``local_objective(supervised(model, loss))(params, batch)`` is the task loss at the model's
    output plus every block's local loss (:func:`local_losses`), with the gradient stopped at
    the input of every block and of the output part: its gradient (``"backprop"`` of it, or
    ``"local-backprop"``) gives each block the gradient of its own heads' loss only. The
    local estimators estimate this gradient.
    """
    return _LocalObjective(loss_fn)


@register("local-backprop")
class LocalBackprop(Estimator):
    """Local greedy backprop (LG-BP): the exact gradient of the local objective.

    Reverse mode inside each :class:`duogard.nn.Local` block and its heads (and the output
    part), the gradient stopped between blocks: the control for the local forward gradients.
    Any layers inside the blocks. The loss it returns is the task loss at the model's output.
    """

    def estimate(self, loss_fn, params, batch, tangents=None):
        local_model_of(loss_fn, "local-backprop")
        be = params_backend(params)

        def objective(p, b):
            task, blocks = local_losses(loss_fn, p, b)
            return sum(blocks, task), task

        (_, task), grads = be.value_and_grad(objective, has_aux=True)(params, batch)
        return task, grads


class _BlockPlan:
    """A Local block split as the forward-gradient estimators need it: parameterless layers,
    one Linear (the position ``linear``), then elementwise layers.
    """

    def __init__(self, index: int, block: Local, method: str):
        linears = [j for j, layer in enumerate(block.layers) if isinstance(layer, Linear)]
        if len(linears) != 1:
            raise TypeError(
                f"{method}: block {index} must hold exactly one nn.Linear (then each group's units "
                f"depend on its own rows only), got {len(linears)}; use local-backprop for other blocks"
            )
        self.index, self.block, self.linear = index, block, linears[0]
        for j, layer in enumerate(block.layers[self.linear + 1 :], start=self.linear + 1):
            elementwise = isinstance(layer, Dropout) or (
                isinstance(layer, Activation) and layer.name not in _NOT_ELEMENTWISE
            )
            if not elementwise:
                raise TypeError(
                    f"{method}: block {index}'s layer {j} ({layer!r}) comes after its Linear but is not "
                    "elementwise (an activation or Dropout); the groups would mix. Use local-backprop"
                )

    def check_params(self, p, method: str) -> None:
        for j in range(len(self.block.layers)):
            if j != self.linear and p.get(str(j)):
                raise TypeError(
                    f"{method}: block {self.index}'s layer {j} ({type(self.block.layers[j]).__name__}) "
                    "has parameters; only the block's Linear may (e.g. LayerNorm(elementwise_affine=False))"
                )

    def run(self, be, p, layers, x, key, train):
        """Apply ``layers`` (a range of the block's positions) to ``x``."""
        for j in layers:
            lk = None if key is None else self.block.layer_key(be, key, j)
            x = self.block.layers[j].forward(be, p.get(str(j), {}), x, key=lk, train=train)
        return x

    def before(self, be, p, x, key, train):
        return self.run(be, p, range(self.linear), x, key, train)

    def after(self, be, p, z, key, train):
        return self.run(be, p, range(self.linear + 1, len(self.block.layers)), z, key, train)


class _LocalForwardBase(Estimator):
    """The traversal that the local forward gradients share: each block's estimate from its
    input, the heads' and the output part's exact gradients, the task loss.
    """

    stochastic = True

    def __init__(self, *, distribution: str = "normal", generator: str = "portable"):
        if distribution not in _DISTRIBUTIONS:
            raise ValueError(
                f"{self.name}: distribution must be one of {_DISTRIBUTIONS}, got {distribution!r}"
            )
        try:
            self.generator = check_generator(generator)
        except ValueError as exc:
            raise ValueError(f"{self.name}: {exc}") from None
        self.distribution = distribution
        self._plans: dict = {}
        self._shape_cache: dict = {}

    def _plan(self, loss_fn, params):
        model, loss, blocks, top = local_model_of(loss_fn, self.name)
        cached = self._plans.get(id(model))
        if cached is None or cached[0] is not model:
            cached = (model, [_BlockPlan(i, model.layers[i], self.name) for i in blocks])
            self._plans = {id(model): cached}
        _check_parameterless(params, model, top, self.name)
        for plan in cached[1]:
            plan.check_params(params[str(plan.index)], self.name)
        return model, loss, cached[1], top

    def _draw(self, be, key, shape, like):
        draw = be.rademacher if self.distribution == "rademacher" else be.normal
        return draw(key, tuple(shape), dtype=like.dtype, device=be.device_of(like), generator=self.generator)

    def _block_grads(self, be, plan, p, xin, y, loss, tangent, key, train):
        """``(h, grads of the block's Linear)``: the block's output and its estimate."""
        raise NotImplementedError

    def estimate(self, loss_fn, params, batch, tangents):
        model, loss, plans, top = self._plan(loss_fn, params)
        be = params_backend(params)
        x, y, key = _unpack(batch)
        train = key is not None
        grads = {}
        by_index = {plan.index: plan for plan in plans}
        with forward_mode_errors(self.name):
            for i, layer in enumerate(model.layers[:top]):
                name, lk = str(i), model.layer_key(be, key, i)
                if i not in by_index:
                    x = layer.forward(be, params.get(name, {}), x, key=lk, train=train)
                    continue
                plan, p = by_index[i], params[name]
                xin = plan.before(be, p, x, lk, train)
                h, lin = self._block_grads(be, plan, p, xin, y, loss, tangents[name], lk, train)
                grads[name] = {str(plan.linear): lin, "head": _head_grads(be, layer, p, h, y, loss)}
                x = h
        value, top_grads = _output_grads(be, model, params, top, x, y, loss, key)
        for name, g in top_grads.items():
            grads[name] = g
        return value, _like(params, grads)


def _head_grads(be, block, p, h, y, loss):
    """The exact gradient of the block's local loss in its heads (``h`` held constant)."""
    h = be.stop_gradient(h)
    fn = lambda head, hh: _block_loss(be, block, {"head": head}, hh, y, loss)  # noqa: E731
    return be.grad(fn)(p["head"], h)


def _output_grads(be, model, params, top, x, y, loss, key):
    """The task loss and the exact gradient of the output part (its input held constant)."""
    names = [str(i) for i in range(top, len(model.layers)) if params.get(str(i))]

    def task(tp, a):
        for i in range(top, len(model.layers)):
            lk = model.layer_key(be, key, i)
            a = model.layers[i].forward(be, tp.get(str(i), {}), a, key=lk, train=key is not None)
        return loss(a, y)

    x = be.stop_gradient(x)
    if not names:
        return task({}, x), {}
    return be.value_and_grad(task)({n: params[n] for n in names}, x)


def _like(params, grads):
    """``grads`` in ``params``'s key order (a pytree of the same structure)."""
    out = {}
    for name, p in params.items():
        g = grads[name]
        out[name] = _like(p, g) if isinstance(p, dict) else g
    return out


def _group_rows(xp, t, groups: int):
    """``t`` (``(D, ...)`` or ``(B, D)`` with ``axis``) as ``groups`` groups of consecutive rows."""
    return xp.reshape(t, (groups, t.shape[0] // groups, *t.shape[1:]))


@register("local-forward-activity")
class LocalForwardActivity(_LocalForwardBase):
    """Activity-perturbed forward gradients under local losses (LG-FG-A; Ren, Kornblith, Liao,
    Hinton, ICLR 2023).

    In each :class:`duogard.nn.Local` block the output ``z`` of its Linear is perturbed by a
    draw ``u`` of ``z``'s shape (one per example). Group g's local loss sees group g's units
    only, so one JVP of the per-example, per-group losses along ``u`` gives each group's
    directional derivative ``d[g, b] = ∇_{z_g[b]} L_g · u_g[b]``; the estimate of
    ``∂L/∂z_g[b]`` is ``d[g, b] u_g[b]``, unbiased (``E[u uᵀ] = I``), its variance set by the
    group's width. The Linear's gradients follow from its input: ``Σ_b ĝ_z[b] ⊗ x[b]`` (the
    same contraction as forward-activity). The heads and the output part get their exact
    gradient (see :mod:`duogard.grad._local`).

    Args:
        num_tangents: K (default 1): the mean of K estimates, each from its own perturbation
            (the K JVPs batched with ``vmap``; the primal is computed once).
        distribution: ``"normal"`` (default) or ``"rademacher"``.
        generator: ``"portable"`` (default: the same draws on every backend) or ``"native"``.

    :meth:`sample` gives ``{block name: u}`` (``u`` shaped like the block's Linear output, with
    a leading K axis when K > 1).
    """

    def __init__(self, *, num_tangents: int = 1, distribution: str = "normal", generator: str = "portable"):
        super().__init__(distribution=distribution, generator=generator)
        if isinstance(num_tangents, bool) or not isinstance(num_tangents, int) or num_tangents < 1:
            raise ValueError(f"{self.name}: num_tangents must be a positive int, got {num_tangents!r}")
        self.num_tangents = num_tangents

    def sample(self, loss_fn, params, batch, key):
        model, _, plans, _ = self._plan(loss_fn, params)
        be = params_backend(params)
        x, _, _ = _unpack(batch)
        shapes = self._shapes(model, tuple(x.shape))
        keys = be.split(key, len(plans))
        lead = () if self.num_tangents == 1 else (self.num_tangents,)
        return {
            str(plan.index): self._draw(be, keys[j], (*lead, *shapes[plan.index]), x)
            for j, plan in enumerate(plans)
        }

    def _shapes(self, model, x_shape):
        """The shape of each block's Linear output, for an input shape."""
        cache = self._shape_cache
        key = (id(model), x_shape)
        if key not in cache:
            shapes, shape = {}, x_shape
            for i, layer in enumerate(model.layers):
                if isinstance(layer, Local):
                    inner = layer.layer_shapes(shape)
                    linear = next(j for j, m in enumerate(layer.layers) if isinstance(m, Linear))
                    shapes[i] = inner[linear]
                shape = layer.output_shape(shape)
            cache.clear()
            cache[key] = shapes
        return cache[key]

    def _block_grads(self, be, plan, p, xin, y, loss, u, key, train):
        xp = be.xp
        block, groups = plan.block, plan.block.groups
        lin_p = p[str(plan.linear)]
        lin = block.layers[plan.linear]
        z = lin.forward(be, lin_p, xin)

        def shares(zz):  # each example's share of each group's batch-mean loss: (G, B)
            h = plan.after(be, p, zz, key, train)
            return _per_example(be, loss, block.heads(be, p, h), y, groups), h

        b = z.shape[0]
        if u.ndim == z.ndim:
            _, d, h = be.jvp(shares, (z,), (u,), has_aux=True)
            # ĝ_z[b, group g] = d[g, b] u[b, group g]
            each = xp.reshape(u, (b, groups, -1)) * xp.matrix_transpose(d)[:, :, None]
            gz = xp.reshape(each, tuple(z.shape))
        else:  # K perturbations: the mean of the K estimates
            _, d, h = be.vmap(lambda t: be.jvp(shares, (z,), (t,), has_aux=True))(u)
            k, h = u.shape[0], h[0]
            each = xp.reshape(u, (k, b, groups, -1)) * xp.permute_dims(d, (0, 2, 1))[..., None]
            gz = xp.reshape(xp.sum(each, axis=0) / k, tuple(z.shape))
        out = {"weight": xp.matmul(xp.matrix_transpose(gz), xin)}
        if lin.bias:
            out["bias"] = xp.sum(gz, axis=0)
        return h, out


def _per_example(be, loss, logits, y, groups: int):
    """Each example's share of each group's batch-mean loss, ``(G, B)`` (rows sum to the losses)."""
    xp = be.xp
    values = loss(logits, _per_group(be, y, groups), reduction="none")
    values = xp.reshape(values, (groups, logits.shape[1], -1))
    return xp.sum(values, axis=-1) / (values.shape[1] * values.shape[2])


@register("local-forward")
class LocalForward(_LocalForwardBase):
    """Weight-perturbed forward gradients under local losses (LG-FG-W).

    In each :class:`duogard.nn.Local` block the Linear's weight and bias get a tangent ``v``
    (one for the batch); group g's rows feed group g's local loss only, so one JVP of the
    per-group losses gives each group's directional derivative ``d_g = ∇_{θ_g} L_g · v_g`` and
    the estimate ``d_g v_g`` of its rows' gradient: unbiased, the variance set by the group's
    share of the block's parameters. The heads and the output part get their exact gradient.

    Args:
        distribution: ``"normal"`` (default) or ``"rademacher"``.
        generator: ``"portable"`` (default: the same draws on every backend) or ``"native"``.

    :meth:`sample` gives ``{block name: {"weight": v_w, "bias": v_b}}``.
    """

    def sample(self, loss_fn, params, batch, key):
        _, _, plans, _ = self._plan(loss_fn, params)
        be = params_backend(params)
        keys = be.split(key, len(plans))
        out = {}
        for j, plan in enumerate(plans):
            lin_p = params[str(plan.index)][str(plan.linear)]
            names = sorted(lin_p)  # by name: a framework may keep a dict's keys in another order
            leaf_keys = be.split(keys[j], len(names))
            out[str(plan.index)] = {  # in the params' own order (torch's pytrees compare it)
                n: self._draw(be, leaf_keys[names.index(n)], tuple(a.shape), a) for n, a in lin_p.items()
            }
        return out

    def _block_grads(self, be, plan, p, xin, y, loss, v, key, train):
        xp = be.xp
        block, groups = plan.block, plan.block.groups
        lin = block.layers[plan.linear]

        def group_losses(lp):  # each group's batch-mean loss: (G,)
            h = plan.after(be, p, lin.forward(be, lp, xin), key, train)
            return xp.sum(_per_example(be, loss, block.heads(be, p, h), y, groups), axis=1), h

        lin_p = p[str(plan.linear)]
        v = {n: v[n] for n in lin_p}  # the params' key order (given tangents may come in another)
        _, d, h = be.jvp(group_losses, (lin_p,), (v,), has_aux=True)
        out = {}
        for n, t in v.items():
            rows = _group_rows(xp, t, groups)
            out[n] = xp.reshape(xp.reshape(d, (groups,) + (1,) * (rows.ndim - 1)) * rows, tuple(t.shape))
        return h, out


def map_heads(tree, fn, head: bool = False):
    """``fn(leaf, in_head)`` over a block's gradient tree (``in_head``: under its ``"head"`` key)."""
    if isinstance(tree, dict):
        return {k: map_heads(v, fn, head or k == "head") for k, v in tree.items()}
    return fn(tree, head)


def leaves_no_head(tree):
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k != "head":
                yield from leaves_no_head(v)
    else:
        yield tree
