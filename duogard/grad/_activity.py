"""Activity-perturbed forward gradients (Ren, Kornblith, Liao, Hinton; ICLR 2023)."""

from __future__ import annotations

import math

from duogard.backend.authoring import check_generator
from duogard.grad import _rules
from duogard.grad._base import Estimator, check_bool, params_backend, register
from duogard.grad._forward import forward_mode_errors
from duogard.grad._objective import Supervised, _unpack
from duogard.nn import Conv2d, Linear, Sequential

__all__ = ["ForwardActivity", "perturbed_forward"]

_DISTRIBUTIONS = ("normal", "rademacher")


@register("forward-activity")
class ForwardActivity(Estimator):
    """Perturb each Linear/Conv2d layer's pre-activations (per example) instead of its weights.

    For pre-activations z_l = W_l a_l + b_l, draw u_l per example, get the per-example
    directional derivatives d_b = Σ_l ∇_{z_l[b]} loss_b · u_l[b] from ONE forward-mode JVP,
    estimate ∂loss/∂z_l[b] ≈ d_b u_l[b], and form the weight gradients from the layer inputs:
    Σ_b ĝ_l[b] ⊗ a_l[b] for Linear (and the same contraction, the convolution's weight
    gradient, for Conv2d). The number of perturbed numbers falls from the parameter count to
    the activity count, which cuts the variance by about the fan-in.

    Supports: ``duogard.grad.supervised(model, loss)`` objectives whose model is a
    :class:`duogard.nn.Sequential` whose layers with parameters are all Linear or Conv2d
    (any parameterless layers between them: activations, pooling, Flatten, Dropout), and
    whose loss is per-example (cross-entropy, MSE ...; the batch mean). Anything else
    raises a clear error; use ``"forward"`` for arbitrary models.

    ``generator``: ``"portable"`` (default: duogard's Philox generator, the same perturbations on
    every backend for the same key) or ``"native"`` (the framework's own).

    ``layerwise=True`` perturbs one layer per JVP (vmapped over layers) so each layer's
    estimate carries no noise from the others: lower variance, L× the tangent work.
    """

    stochastic = True

    def __init__(self, *, distribution: str = "normal", layerwise: bool = False, generator: str = "portable"):
        if distribution not in _DISTRIBUTIONS:
            raise ValueError(
                f"forward-activity: distribution must be one of {_DISTRIBUTIONS}, got {distribution!r}"
            )
        try:
            self.generator = check_generator(generator)
        except ValueError as exc:
            raise ValueError(f"forward-activity: {exc}") from None
        self.distribution = distribution
        self.layerwise = check_bool("forward-activity", "layerwise", layerwise)
        self._shapes: dict = {}

    # -- which layers, and their output shapes
    def _layers(self, loss_fn):
        if not isinstance(loss_fn, Supervised) or not isinstance(loss_fn.model, Sequential):
            raise TypeError(
                "forward-activity: supports losses made by duogard.grad.supervised(model, loss) "
                f"with a duogard.nn.Sequential model; got {type(loss_fn).__name__}"
                + (f" over {type(loss_fn.model).__name__}" if isinstance(loss_fn, Supervised) else "")
                + ". Use --grad forward for other models."
            )
        names = []
        for i, layer in enumerate(loss_fn.model.layers):
            if isinstance(layer, (Linear, Conv2d)):
                names.append(str(i))
            elif getattr(layer, "has_params", True) and not _parameterless(layer):
                raise TypeError(
                    f"forward-activity: layer {i} ({type(layer).__name__}) has parameters but is "
                    "neither Linear nor Conv2d; use --grad forward for this model"
                )
        if not names:
            raise TypeError("forward-activity: the model has no Linear or Conv2d layer to perturb")
        return names

    def _out_shapes(self, model, x_shape):
        key = (id(model), tuple(x_shape))
        if key not in self._shapes:
            self._shapes[key] = model.layer_shapes(tuple(x_shape))
        return self._shapes[key]

    def sample(self, loss_fn, params, batch, key):
        names = self._layers(loss_fn)
        be = params_backend(params)
        x, _, _ = _unpack(batch)
        shapes = self._out_shapes(loss_fn.model, x.shape)
        draw = be.rademacher if self.distribution == "rademacher" else be.normal
        keys = be.split(key, len(names))
        dtype, dev = x.dtype, be.device_of(x)
        return {
            n: draw(keys[j], shapes[int(n)], dtype=dtype, device=dev, generator=self.generator)
            for j, n in enumerate(names)
        }

    def estimate(self, loss_fn, params, batch, tangents):
        names = self._layers(loss_fn)
        be = params_backend(params)
        xp = be.xp
        model = loss_fn.model
        rules = _rules.plan(loss_fn, batch, convolutions=False) if be.fast_jvp_rules else None
        with forward_mode_errors("forward-activity", be):
            if rules is not None:
                # duogard's own forward rules where the framework's jvp is the slower one (torch:
                # dual tensors op by op, and a Python decomposition of add under vmap)
                value, d, inputs = _rules.sequential_activity_jvp(
                    be,
                    model,
                    loss_fn.loss,
                    params,
                    batch,
                    {n: tangents[n] for n in names},
                    layerwise=self.layerwise,
                )
                dz = {
                    n: _scale_rows(xp, d[:, j if self.layerwise else 0], tangents[n])
                    for j, n in enumerate(names)
                }
            else:
                value, dz, inputs = self._framework_jvp(be, loss_fn, params, batch, tangents, names)
        grads = {n: _weight_grads(be, model.layers[int(n)], params[n], inputs[n], dz[n]) for n in names}
        return value, grads

    def _framework_jvp(self, be, loss_fn, params, batch, tangents, names):
        """``(loss, dz, inputs)`` by the framework's jvp of the per-example losses."""
        xp = be.xp
        x, y, dkey = _unpack(batch)
        model, loss = loss_fn.model, loss_fn.loss
        zeros = {n: xp.zeros_like(tangents[n]) for n in names}

        def per_example(perturb):
            out, inputs = perturbed_forward(be, model, params, x, perturb, key=dkey)
            values = loss(out, y, reduction="none")
            _check_per_example(be, values, x.shape[0])
            # each example's share of the batch-mean loss (ops are dear under forward AD: no
            # reshape and sum for the usual one value per example)
            count = math.prod(values.shape)
            if values.ndim != 1:
                values = xp.sum(xp.reshape(values, (x.shape[0], -1)), axis=1)
            return values / count, inputs

        if not self.layerwise:
            contrib, d, inputs = be.jvp(per_example, (zeros,), (tangents,), has_aux=True)
            dz = {n: _scale_rows(xp, d, tangents[n]) for n in names}
        else:
            dz, contrib, inputs = self._layerwise(be, per_example, zeros, tangents, names)
        return xp.sum(contrib), dz, inputs

    def _layerwise(self, be, per_example, zeros, tangents, names):
        xp = be.xp
        count = len(names)
        sel = {
            n: xp.reshape(
                xp.astype(xp.arange(count) == j, tangents[n].dtype), (count,) + (1,) * tangents[n].ndim
            )
            for j, n in enumerate(names)
        }
        stacked = {n: sel[n] * tangents[n][None] for n in names}
        contrib, d, inputs = be.vmap(lambda t: be.jvp(per_example, (zeros,), (t,), has_aux=True))(stacked)
        dz = {n: _scale_rows(xp, d[j], tangents[n]) for j, n in enumerate(names)}
        return dz, contrib[0], {n: v[0] for n, v in inputs.items()}


def perturbed_forward(be, model, params, x, perturb: dict, *, key=None):
    """``model``'s forward (a :class:`duogard.nn.Sequential`) with ``perturb[name]`` added to the
    outputs of the layers named in it: forward-activity's own traversal.

    Returns:
        ``(output, {name: input})``: the model's output and the inputs of the perturbed layers.
    """
    inputs = {}
    for i, layer in enumerate(model.layers):
        name = str(i)
        if name in perturb:
            inputs[name] = x
        x = layer.forward(be, params.get(name, {}), x, key=model.layer_key(be, key, i), train=key is not None)
        if name in perturb:
            x = x + perturb[name]
    return x, inputs


def _check_per_example(be, values, batch: int) -> None:
    """The loss's ``reduction="none"`` values: floating point, and one (or more) per example."""
    shape = tuple(values.shape)
    if not shape or shape[0] != batch:
        raise ValueError(
            f"forward-activity: the loss with reduction='none' must give one value per example, shape "
            f"({batch}, ...), got shape {shape}; a loss function for it takes reduction= (e.g. "
            "duogard.losses.cross_entropy)"
        )
    name = be.dtype_name(values.dtype)
    if not name.startswith(("float", "bfloat")):
        raise TypeError(
            f"forward-activity: the loss must be floating point to be differentiated, got {name}; an "
            "integer-valued loss (a count, an argmax) has no gradient: compute it in floating point"
        )


def _parameterless(layer) -> bool:
    return getattr(layer, "has_params", True) is False


def _scale_rows(xp, d, u):
    """D (B,) times u (B, ...): the per-example estimate of ∂loss/∂z."""
    return xp.reshape(d, (d.shape[0],) + (1,) * (u.ndim - 1)) * u


def _weight_grads(be, layer, p, a, gz):
    """Weight and bias gradients of one layer from its input ``a`` and output gradient ``gz``."""
    xp = be.xp
    if isinstance(layer, Linear):
        a2 = xp.reshape(a, (-1, a.shape[-1]))
        g2 = xp.reshape(gz, (-1, gz.shape[-1]))
        out = {"weight": xp.matmul(xp.matrix_transpose(g2), a2)}
        if "bias" in p:
            out["bias"] = xp.sum(g2, axis=0)
        return out
    # Conv2d: the weight gradient is the transpose of the convolution in w, applied to gz
    gw = be.conv2d_weight_grad(
        a,
        gz,
        p["weight"].shape,
        stride=layer.stride,
        padding=layer._pads(),
        dilation=layer.dilation,
        groups=layer.groups,
    )
    out = {"weight": gw}
    if "bias" in p:
        out["bias"] = xp.sum(gz, axis=(0, 2, 3))
    return out
