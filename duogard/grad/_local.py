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
(a linear head's is ``(p - y)ᵀ h``: no backward pass through the network). Their blocks may
hold any layers that keep the examples apart; each layer with parameters is perturbed, and
which group's (and token's) loss each perturbation is credited to follows from the layers
after it (:mod:`duogard.grad._local_plan`): with ``LayerNorm(elementwise_affine=False)``,
one Linear and elementwise activations (``local-mlp``), group g's units depend on group g's
rows only, which makes the group-wise estimates unbiased with one group's variance. The
training loss these estimators return is the task loss at the model's output.
"""

from __future__ import annotations

from duogard.backend import check_generator
from duogard.grad._base import Estimator, params_backend, register
from duogard.grad._forward import forward_mode_errors
from duogard.grad._local_plan import BlockPlan, combine, per_term, rows_are_units, site_grads
from duogard.grad._objective import Supervised, _unpack
from duogard.nn import Local, Sequential

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

    def _plan(self, loss_fn, params, x_shape):
        """``(model, loss, plans, top)``; the plans are cached per model and input shape."""
        model, loss, blocks, top = local_model_of(loss_fn, self.name)
        _check_parameterless(params, model, top, self.name)
        key = (id(model), tuple(x_shape[1:]))
        cached = self._plans.get(key)
        if cached is None or cached[0] is not model:
            shapes = [(1, *x_shape[1:]), *model.layer_shapes((1, *x_shape[1:]))]
            cached = (model, [BlockPlan(i, model.layers[i], params[str(i)], shapes[i]) for i in blocks])
            self._plans = {key: cached}
        return model, loss, cached[1], top

    def _draw(self, be, key, shape, like):
        draw = be.rademacher if self.distribution == "rademacher" else be.normal
        return draw(key, tuple(shape), dtype=like.dtype, device=be.device_of(like), generator=self.generator)

    def _block_grads(self, be, plan, p, x0, y, loss, tangent, key, train):
        """``(h, {site: grads})``: the block's output and its sites' estimates."""
        raise NotImplementedError

    def estimate(self, loss_fn, params, batch, tangents):
        x, y, key = _unpack(batch)
        model, loss, plans, top = self._plan(loss_fn, params, tuple(x.shape))
        be = params_backend(params)
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
                h, sites = self._block_grads(be, plan, p, x, y, loss, tangents.get(name), lk, train)
                grads[name] = {**sites, "head": _head_grads(be, layer, p, h, y, loss)}
                x = h
        value, top_grads = _output_grads(be, model, params, top, x, y, loss, key)
        for name, g in top_grads.items():
            grads[name] = g
        return value, _like(params, grads)

    @staticmethod
    def _by_site(plan, tangent):
        """A block's tangents by site: one site's are given bare, several by position."""
        if len(plan.sites) == 1:
            return {str(plan.sites[0]): tangent}
        return tangent or {}


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
    """``t`` (``(D, ...)``) as ``groups`` groups of consecutive rows."""
    return xp.reshape(t, (groups, t.shape[0] // groups, *t.shape[1:]))


@register("local-forward-activity")
class LocalForwardActivity(_LocalForwardBase):
    """Activity-perturbed forward gradients under local losses (LG-FG-A; Ren, Kornblith, Liao,
    Hinton, ICLR 2023).

    In each :class:`duogard.nn.Local` block the output ``z`` of every layer with parameters
    (its *sites*: a Linear, a mixer's TokenLinear and GroupedLinear ...) is perturbed by a draw
    ``u`` of ``z``'s shape (one per example), all of the block's at once. Group g's local loss
    sees group g's units only (of each token, for a mixer's patch-wise losses), so one JVP of
    the per-example, per-group (per-token) losses along ``u`` gives each term's directional
    derivative ``d[g, b, t]``; the estimate of the gradient at the site's units of group g
    (token t) is ``d[g, b, t]`` times their perturbation: unbiased (``E[u uᵀ] = I``, the
    sites' draws independent), its variance set by one group's width. A site whose later
    layers mix the groups (or the tokens) uses the sum of the terms it reaches
    (:mod:`duogard.grad._local_plan`). The site's params' gradients follow from its input:
    ``Σ_b ĝ_z[b] ⊗ x[b]`` for a Linear (the same contraction as forward-activity). The heads
    and the output part get their exact gradient (see :mod:`duogard.grad._local`).

    Args:
        num_tangents: K (default 1): the mean of K estimates, each from its own perturbation
            (the K JVPs batched with ``vmap``; the primal is computed once).
        distribution: ``"normal"`` (default) or ``"rademacher"``.
        generator: ``"portable"`` (default: the same draws on every backend) or ``"native"``.

    :meth:`sample` gives ``{block name: u}`` (``u`` shaped like the site's output, with a
    leading K axis when K > 1), or ``{block name: {site position: u}}`` for a block with
    several sites.
    """

    def __init__(self, *, num_tangents: int = 1, distribution: str = "normal", generator: str = "portable"):
        super().__init__(distribution=distribution, generator=generator)
        if isinstance(num_tangents, bool) or not isinstance(num_tangents, int) or num_tangents < 1:
            raise ValueError(f"{self.name}: num_tangents must be a positive int, got {num_tangents!r}")
        self.num_tangents = num_tangents

    def sample(self, loss_fn, params, batch, key):
        be = params_backend(params)
        x, _, _ = _unpack(batch)
        _, _, plans, _ = self._plan(loss_fn, params, tuple(x.shape))
        keys = be.split(key, len(plans))
        lead = (x.shape[0],) if self.num_tangents == 1 else (self.num_tangents, x.shape[0])
        out = {}
        for j, plan in enumerate(plans):
            if len(plan.sites) == 1:
                out[str(plan.index)] = self._draw(be, keys[j], (*lead, *plan.shapes[plan.sites[0]]), x)
            elif plan.sites:
                site_keys = be.split(keys[j], len(plan.sites))
                out[str(plan.index)] = {
                    str(s): self._draw(be, site_keys[n], (*lead, *plan.shapes[s]), x)
                    for n, s in enumerate(plan.sites)
                }
        return out

    def _block_grads(self, be, plan, p, x0, y, loss, u, key, train):
        xp = be.xp
        block, groups = plan.block, plan.block.groups
        u = self._by_site(plan, u)
        xin = plan.prefix(be, p, x0, key, train)
        if not plan.sites:
            return plan.rest(be, p, xin, x0, key, train)[0], {}

        def terms(deltas):  # each term's share of its group's batch-mean loss: (G, B, T)
            h, inputs = plan.rest(be, p, xin, x0, key, train, deltas=deltas)
            return per_term(be, loss, block.token_logits(be, p, h), y, groups), (h, inputs)

        first = u[str(plan.sites[0])]
        k = None if first.ndim == len(plan.shapes[plan.sites[0]]) + 1 else first.shape[0]
        if k is None:
            zeros = {n: xp.zeros_like(t) for n, t in u.items()}
            _, d, (h, inputs) = be.jvp(terms, (zeros,), (u,), has_aux=True)
            d, u = d[None], {n: t[None] for n, t in u.items()}
        else:  # K perturbations: the mean of the K estimates
            zeros = {n: xp.zeros_like(t[0]) for n, t in u.items()}
            _, d, (h, inputs) = be.vmap(lambda t: be.jvp(terms, (zeros,), (t,), has_aux=True))(u)
            h, inputs = h[0], {n: a[0] for n, a in inputs.items()}
        out = {}
        for s in plan.sites:
            n = str(s)
            gz = combine(xp, d, u[n], groups, plan.kept[s])
            lk = None if key is None else block.layer_key(be, key, s)
            out[n] = site_grads(be, block.layers[s], p[n], inputs[n], gz, lk, train)
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

    In each :class:`duogard.nn.Local` block the params of every layer that has some (its
    sites) get a tangent ``v`` (one for the batch); where a site's rows are its output units
    (a Linear, a GroupedLinear) and its later layers keep the groups apart, group g's rows
    feed group g's local loss only, so one JVP of the per-group losses gives each group's
    directional derivative ``d_g`` and the estimate ``d_g v_g`` of its rows' gradient:
    unbiased, the variance set by the group's share of the block's parameters. Other sites
    get ``(Σ_g d_g) v`` (unbiased, noisier). The heads and the output part get their exact
    gradient.

    Args:
        distribution: ``"normal"`` (default) or ``"rademacher"``.
        generator: ``"portable"`` (default: the same draws on every backend) or ``"native"``.

    :meth:`sample` gives ``{block name: {"weight": v_w, "bias": v_b}}`` for a block with one
    site, ``{block name: {site position: {...}}}`` for one with several.
    """

    def sample(self, loss_fn, params, batch, key):
        be = params_backend(params)
        x, _, _ = _unpack(batch)
        _, _, plans, _ = self._plan(loss_fn, params, tuple(x.shape))
        keys = be.split(key, len(plans))
        out = {}
        for j, plan in enumerate(plans):
            site_keys = [keys[j]] if len(plan.sites) == 1 else be.split(keys[j], max(len(plan.sites), 1))
            drawn = {}
            for n, s in enumerate(plan.sites):
                lin_p = params[str(plan.index)][str(s)]
                names = sorted(lin_p)  # by name: a framework may keep a dict's keys in another order
                leaf_keys = be.split(site_keys[n], len(names))
                drawn[str(s)] = {  # in the params' own order (torch's pytrees compare it)
                    m: self._draw(be, leaf_keys[names.index(m)], tuple(a.shape), a) for m, a in lin_p.items()
                }
            if drawn:
                out[str(plan.index)] = drawn[str(plan.sites[0])] if len(plan.sites) == 1 else drawn
        return out

    def _block_grads(self, be, plan, p, x0, y, loss, v, key, train):
        xp = be.xp
        block, groups = plan.block, plan.block.groups
        v = self._by_site(plan, v)
        xin = plan.prefix(be, p, x0, key, train)
        if not plan.sites:
            return plan.rest(be, p, xin, x0, key, train)[0], {}

        def group_losses(sp):  # each group's batch-mean loss: (G,)
            h, _ = plan.rest(be, p, xin, x0, key, train, site_params=sp)
            return xp.sum(_per_example(be, loss, block.heads(be, p, h), y, groups), axis=1), h

        sp = {str(s): p[str(s)] for s in plan.sites}
        # the params' key order (given tangents may come in another)
        v = {n: {m: v[n][m] for m in sp[n]} for n in sp}
        _, d, h = be.jvp(group_losses, (sp,), (v,), has_aux=True)
        out = {}
        for s in plan.sites:
            n = str(s)
            if rows_are_units(block.layers[s]) and plan.kept[s][0]:
                out[n] = {
                    m: xp.reshape(
                        xp.reshape(d, (groups,) + (1,) * t.ndim) * _group_rows(xp, t, groups), tuple(t.shape)
                    )
                    for m, t in v[n].items()
                }
            else:
                total = xp.sum(d)
                out[n] = {m: total * t for m, t in v[n].items()}
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
