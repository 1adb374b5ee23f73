"""Hand-written forward-mode rules for duogard's own layers and losses.

Where a framework's generic forward AD is the bottleneck (``torch.func.jvp`` pays for dual
tensors op by op), a JVP through a :class:`duogard.nn.Sequential` of duogard's own layers can
be written directly: for ``y = x Wᵀ + b`` the tangent is ``ẏ = ẋ Wᵀ + x Ẇᵀ + ḃ``, and so on.
The rules are written once against the backend contract and carry K tangents at once. A
layer's K tangents are batch-major, ``(B, K, ...)``: then one matrix product (or one
convolution) serves all K, ``x @ [V_1; ...; V_K]ᵀ`` for the weight tangents and a ``(B·K, in)``
by ``(in, out)`` product for the incoming ones, with no transposes between layers. They are
checked against the framework's ``jvp`` in the tests. Any
layer without a rule here goes through the framework's ``jvp`` for that layer alone; a model
or loss that is not covered at all makes :func:`plan` return None, and the estimator uses the
framework's ``jvp`` for the whole loss (the path for arbitrary user code).
"""

from __future__ import annotations

from duogard import losses as _losses
from duogard.grad._objective import Supervised, _unpack
from duogard.nn import Activation, Conv2d, Dropout, Flatten, Frozen, Linear, LoRALinear, Sequential
from duogard.tree import Rank1

__all__ = ["plan", "sequential_activity_jvp", "sequential_loss_jvp"]

_ELEMENTWISE = {
    # name -> derivative as a function of (be, x, y, options)
    "relu": lambda be, x, y, o: be.xp.astype(x > 0, x.dtype),
    "tanh": lambda be, x, y, o: 1 - y * y,
    "sigmoid": lambda be, x, y, o: y * (1 - y),
    "leaky_relu": lambda be, x, y, o: be.xp.where(
        x > 0, be.xp.ones_like(x), be.xp.full_like(x, o.get("negative_slope", 0.01))
    ),
}


def plan(loss_fn, batch, *, convolutions: bool = True):
    """``(model, loss)`` when hand-written rules cover this loss, else None.

    ``convolutions=False`` declines models with a Conv2d (where they are not faster).
    """
    if not isinstance(loss_fn, Supervised) or not isinstance(loss_fn.model, Sequential):
        return None
    if loss_fn.loss_rule is None:  # the objective says whether its loss has a rule here
        return None
    if len(batch) == 3 and batch[2] is not None:  # dropout in training mode: generic path
        return None
    layers = loss_fn.model.layers
    if not any(isinstance(layer, (Linear, Conv2d, LoRALinear)) for layer in layers):
        return None
    if not convolutions and any(isinstance(_unfrozen(layer), Conv2d) for layer in layers):
        return None
    for layer in layers:
        if not layer.has_params or isinstance(layer, (Linear, Conv2d, LoRALinear)):
            continue
        return None  # a layer with params but no rule here (LayerNorm, users' layers ...)
    return loss_fn.model, loss_fn.loss


def _unfrozen(layer):
    """The layer a :class:`Frozen` holds (itself for any other layer)."""
    return layer.layer if isinstance(layer, Frozen) else layer


def _after_batch(xp, t, k: int):
    """``(B, *rest, K*n)`` -> ``(B, K, *rest, n)``: a stacked product's K tangents, batch-major."""
    t = xp.reshape(t, (*t.shape[:-1], k, t.shape[-1] // k))
    return t if t.ndim == 3 else xp.moveaxis(t, -2, 1)


def _through(xp, f, tx):
    """``f`` (a map of the batch axis and features) applied to the K tangents ``tx`` (B, K, ...)
    at once: they are folded into the batch axis, so one product serves all K.
    """
    b, k = tx.shape[0], tx.shape[1]
    t = f(xp.reshape(tx, (b * k, *tx.shape[2:])))
    return xp.reshape(t, (b, k, *t.shape[1:]))


def _bias_tangent(xp, tb, ndim: int):
    """A bias tangent ``(K, n)`` shaped to add to ``(B, K, *rest, n)`` (or ``(B, K, n, H, W)``)."""
    return xp.reshape(tb, (1, tb.shape[0]) + (1,) * (ndim - 3) + (tb.shape[-1],))


def _linear(be, layer, p, tp, x, tx, k):
    xp = be.xp
    w = p["weight"]
    y = be.linear(x, w, p["bias"] if layer.bias else None)
    tw = tp.get("weight")
    if x.dtype != w.dtype:  # be.linear promotes (float32 data, float16 params: float32); so do its tangents
        dt = y.dtype
        cast = lambda a: a if a is None or a.dtype == dt else xp.astype(a, dt)  # noqa: E731
        x, tx, w = cast(x), cast(tx), cast(w)
        tw = Rank1(cast(tw.u), cast(tw.w)) if isinstance(tw, Rank1) else cast(tw)
    ty = None  # stays None without param tangents (activity perturbation): only tx moves
    if isinstance(tw, Rank1):
        # x (u wᵀ)ᵀ = (x·w) uᵀ: one (B, in) by (in, K) product for all K tangents, then an
        # outer product, instead of a (B, in) by (in, out) product per tangent
        xw = xp.matmul(x, xp.matrix_transpose(tw.w))  # (B, *rest, K)
        xw = xw if xw.ndim == 2 else xp.moveaxis(xw, -1, 1)  # (B, K, *rest)
        ty = xw[..., None] * xp.reshape(tw.u, (1, k) + (1,) * (x.ndim - 2) + (tw.u.shape[1],))
    elif tw is not None:
        # the K weight tangents stacked: one (B, in) by (in, K·out) product for all K
        ty = _after_batch(xp, xp.matmul(x, xp.matrix_transpose(xp.reshape(tw, (-1, tw.shape[-1])))), k)
    if tx is not None:  # the incoming tangents through W: one (B·K, in) by (in, out) product
        t_in = _through(xp, lambda t: xp.matmul(t, xp.matrix_transpose(w)), tx)
        ty = t_in if ty is None else ty + t_in
    if layer.bias and "bias" in tp:
        ty = ty + _bias_tangent(xp, tp["bias"], ty.ndim)
    return y, ty


def _conv(be, layer, p, tp, x, tx, k):
    xp = be.xp
    layer._output_hw(tuple(x.shape))  # an input smaller than the kernel: the layer's own error
    w, tw = p["weight"], tp.get("weight")
    conv = lambda inp, ker, bias=None: be.conv2d(
        inp,
        ker,
        bias,
        stride=layer.stride,  # noqa: E731
        padding=layer._pads(),
        dilation=layer.dilation,
        groups=layer.groups,
    )
    y = conv(x, w, p["bias"] if layer.bias else None)
    out = w.shape[0]
    if isinstance(tw, Rank1) and layer.groups != 1:
        tw = tw.dense(xp)  # a grouped kernel's factor is not a kernel of its own: form u ⊗ k
    ty = None  # stays None without param tangents (activity perturbation): only tx moves
    if isinstance(tw, Rank1):
        # conv(x, u ⊗ k) = u ⊗ conv(x, k): one convolution with K single output channels
        t = conv(x, tw.w)  # (B, K, H, W)
        ty = t[:, :, None] * tw.u[None, :, :, None, None]
    elif tw is not None and layer.groups == 1:
        # all K weight tangents in one convolution: (B, K*out, H, W) -> (B, K, out, H, W)
        t = conv(x, xp.reshape(tw, (k * out, *w.shape[1:])))
        ty = xp.reshape(t, (t.shape[0], k, out, *t.shape[2:]))
    elif tw is not None:
        ty = xp.stack([conv(x, tw[i]) for i in range(k)], axis=1)
    if tx is not None:  # the incoming tangents through the kernel: one (B·K, ...) convolution
        t_in = _through(xp, lambda t: conv(t, w), tx)
        ty = t_in if ty is None else ty + t_in
    if layer.bias and "bias" in tp:
        ty = ty + xp.reshape(tp["bias"], (1, k, -1, 1, 1))
    return y, ty


def _lora_linear(be, layer, p, tp, x, tx, k):
    """``y = x Wᵀ + b + s (x Aᵀ) Bᵀ`` (W, b frozen): ``ẏ = ẋ Wᵀ + ḣ Bᵀ + h Ḃᵀ`` with
    ``h = s x Aᵀ`` and ``ḣ = s (ẋ Aᵀ + x Ȧᵀ)``: three of :func:`_linear`'s products, the
    adapters' rank-1 tangents kept factored.
    """
    y, ty = _linear(be, layer.linear, layer.constants(be, x), {}, x, tx, k)
    h, th = _linear(be, layer.down, {"weight": p["lora_A"]}, _as_weight(tp, "lora_A"), x, tx, k)
    h = h * layer.scale
    th = None if th is None else th * layer.scale
    z, tz = _linear(be, layer.up, {"weight": p["lora_B"]}, _as_weight(tp, "lora_B"), h, th, k)
    if tz is None:
        return y + z, ty
    return y + z, tz if ty is None else ty + tz


def _as_weight(tp, name):
    return {"weight": tp[name]} if name in tp else {}


def _layer(be, layer, p, tp, x, tx, k):
    """``(y, ty)``: the layer's output and its K tangents, batch-major: ``ty`` is ``(B, K, ...)``."""
    if isinstance(layer, Linear):
        return _linear(be, layer, p, tp, x, tx, k)
    if isinstance(layer, Conv2d):
        return _conv(be, layer, p, tp, x, tx, k)
    if isinstance(layer, LoRALinear):
        return _lora_linear(be, layer, p, tp, x, tx, k)
    if isinstance(layer, Frozen) and isinstance(layer.layer, (Linear, Conv2d)):
        # no param tangents: only the incoming ones pass through the frozen weights
        return _layer(be, layer.layer, layer.constants(be, x), {}, x, tx, k)
    if isinstance(layer, Flatten):
        y = layer.forward(be, {}, x)
        return y, None if tx is None else be.xp.reshape(tx, (y.shape[0], k, *y.shape[1:]))
    if isinstance(layer, Dropout):  # not training: identity
        return x, tx
    if isinstance(layer, Activation) and layer.name in _ELEMENTWISE:
        y = layer.forward(be, {}, x)
        if tx is None:
            return y, None
        return y, tx * be.xp.expand_dims(_ELEMENTWISE[layer.name](be, x, y, layer.options), axis=1)
    return _generic_layer(be, layer, x, tx, k)


def _generic_layer(be, layer, x, tx, k):
    """A parameterless layer without a rule (pooling ...): the framework's jvp for it alone, over K."""
    f = lambda z: layer.forward(be, {}, z)  # noqa: E731
    y = f(x)
    if tx is None:
        return y, None
    return y, be.vmap(lambda t: be.jvp(f, (x,), (t,))[1], in_axes=1, out_axes=1)(tx)


def _loss_jvp(be, loss, z, tz, y, *, per_example: bool = False):
    """(loss, K directional derivatives) of the batch-mean loss at logits ``z`` along ``tz`` (B, K, ...).

    ``per_example``: each example's share of them instead, ``(B, K)`` (they sum to the K).
    """
    xp = be.xp
    axes = tuple(range(2, tz.ndim)) if per_example else (0,) + tuple(range(2, tz.ndim))
    if loss is _losses.cross_entropy:
        value = loss(z, y)
        target = _losses._targets_from(be, "cross_entropy", z, y, 0.0)
        g = (be.softmax(z, axis=-1) - target) / z.shape[0]  # d mean CE / dz
        return value, xp.sum(xp.expand_dims(g, axis=1) * tz, axis=axes)
    diff = z - y  # mse
    numel = 1
    for d in diff.shape:
        numel *= int(d)
    return xp.mean(diff * diff), xp.sum((2.0 / numel) * xp.expand_dims(diff, axis=1) * tz, axis=axes)


def sequential_loss_jvp(be, model, loss, params, tparams, batch, k: int):
    """``(loss, d)`` with ``d[i] = ∇loss · tparams[i]`` for K tangents (leading axis on every leaf)."""
    x, y, _ = _unpack(batch)
    tx = None
    for i, layer in enumerate(model.layers):
        name = str(i)
        x, tx = _layer(be, layer, params.get(name, {}), tparams.get(name, {}), x, tx, k)
    return _loss_jvp(be, loss, x, tx, y)


def sequential_activity_jvp(be, model, loss, params, batch, perturb: dict, *, layerwise: bool):
    """The activity-perturbed JVP of a Sequential of Linear and parameterless layers (the
    layers' rules with no param tangents).

    The tangent enters at the outputs of the layers named in ``perturb`` (``{name: u}``, ``u``
    shaped like that layer's output): all of them into one tangent, or with ``layerwise`` each
    into a tangent of its own (K = the number of layers perturbed, in ``perturb``'s order).

    Returns:
        ``(loss, d, inputs)``: the batch-mean loss, each example's share of the directional
        derivatives ``(B, K)``, and ``{name: input}`` of the perturbed layers.
    """
    xp = be.xp
    x, y, _ = _unpack(batch)
    names = list(perturb)
    k = len(names) if layerwise else 1
    tx, inputs = None, {}
    for i, layer in enumerate(model.layers):
        name = str(i)
        if name in perturb:
            inputs[name] = x
        x, tx = _layer(be, layer, params.get(name, {}), {}, x, tx, k)  # no param tangents
        if name in perturb:
            u = perturb[name]
            if layerwise:  # u enters slot j only: a (B, K, ...) tangent with u in column j
                j = names.index(name)
                onehot = xp.reshape(xp.astype(xp.arange(k) == j, u.dtype), (1, k) + (1,) * (u.ndim - 1))
                t = xp.expand_dims(u, axis=1) * onehot
            else:
                t = xp.expand_dims(u, axis=1)
            tx = t if tx is None else tx + t
    value, d = _loss_jvp(be, loss, x, tx, y, per_example=True)
    return value, d, inputs
