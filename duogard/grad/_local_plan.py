"""How the local forward-gradient estimators take a :class:`duogard.nn.Local` block apart.

A block's *sites* are its layers with parameters (its Linear, a mixer's TokenLinear and
GroupedLinear ...). The block's local loss is a sum of terms, one per group g, example b and
token t (:meth:`duogard.nn.Local.token_logits`; one token for a ``(batch, units)`` output).
Which terms a perturbation of a site's output can reach follows from the layers after the
site: if each of them computes group g of the block's units from group g of its input only,
and each token from the same token only, then the site's units of group g and token t reach
term (g, b, t) alone, and that term's directional derivative times the perturbation is an
unbiased estimate of their gradient with the variance of one group of one token. Where a
layer after the site mixes the groups (a Linear, a LayerNorm over all units) the estimate
uses the sum over the groups of each token's terms; where one mixes the tokens (a
TokenLinear), the sum over the tokens; where it is not known (a user's layer), the sum over
all terms of the example: still unbiased, with more variance. Every layer must keep the
examples apart (as all of duogard's do outside BatchNorm).
"""

from __future__ import annotations

from duogard.nn import Activation, Dropout, GroupedLinear, LayerNorm, Linear, Local, TokenLinear

__all__ = ["BlockPlan", "keeps", "combine", "site_grads", "per_term", "rows_are_units"]

_NOT_ELEMENTWISE = ("softmax", "log_softmax")


def keeps(layer, groups: int) -> tuple[bool, bool]:
    """``(groups kept, tokens kept)``: does ``layer`` compute each of ``groups`` consecutive
    groups of the last axis from the same group of its input only, and each token (the middle
    axis of ``(batch, tokens, units)``) from the same token only?
    """
    if isinstance(layer, Dropout) or (isinstance(layer, Activation) and layer.name not in _NOT_ELEMENTWISE):
        return True, True
    if isinstance(layer, Activation) and layer.options.get("axis", -1) == -1:  # softmax over the units
        return groups == 1, True
    if isinstance(layer, TokenLinear):
        return True, False
    if isinstance(layer, GroupedLinear) or (isinstance(layer, LayerNorm) and layer.normalized_ndim == 1):
        return layer.groups % groups == 0, True
    if isinstance(layer, Linear):
        return groups == 1, True
    return groups == 1, False


def rows_are_units(layer) -> bool:
    """Is axis 0 of each of the layer's params its output units (so group g owns a slice)?"""
    return isinstance(layer, (Linear, GroupedLinear)) or (
        isinstance(layer, LayerNorm) and layer.normalized_ndim == 1
    )


class BlockPlan:
    """A Local block's sites and, for each, which of its terms the site's output reaches.

    Attributes:
        index: the block's position in the model.
        block: the :class:`duogard.nn.Local`.
        sites: positions (in the block) of its layers with parameters.
        first: where the layers start to depend on parameters (the layers before run once).
        kept: ``{site: (groups kept, tokens kept)}``.
        shapes: ``{site: output shape without the batch axis}``.
    """

    def __init__(self, index: int, block: Local, params: dict, input_shape: tuple):
        self.index, self.block = index, block
        self.sites = [j for j in range(len(block.layers)) if params.get(str(j))]
        self.first = self.sites[0] if self.sites else len(block.layers)
        shapes = block.layer_shapes((1, *input_shape[1:]))
        out = shapes[-1]
        self.shapes = {j: tuple(shapes[j][1:]) for j in self.sites}
        self.kept = {}
        for j in self.sites:
            z = shapes[j]
            g_ok = len(z) == len(out) and z[-1] % block.groups == 0
            t_ok = len(z) == len(out) and tuple(z[1:-1]) == tuple(out[1:-1])
            for layer in block.layers[j + 1 :]:
                kg, kt = keeps(layer, block.groups)
                g_ok, t_ok = g_ok and kg, t_ok and kt
            self.kept[j] = (g_ok, t_ok)

    def prefix(self, be, p, x, key, train):
        """The layers before the first site (they do not depend on the parameters)."""
        for j in range(self.first):
            lk = None if key is None else self.block.layer_key(be, key, j)
            x = self.block.layers[j].forward(be, p.get(str(j), {}), x, key=lk, train=train)
        return x

    def rest(self, be, p, x, x0, key, train, site_params=None, deltas=None):
        """``(h, {site: its input})``: the block from its first site on, given the prefix's
        output ``x`` and the block's input ``x0`` (for the residual); ``site_params`` replaces
        the sites' params, ``deltas`` is added to their outputs.
        """
        inputs = {}
        for j in range(self.first, len(self.block.layers)):
            name = str(j)
            lk = None if key is None else self.block.layer_key(be, key, j)
            lp = site_params[name] if site_params is not None and name in site_params else p.get(name, {})
            if j in self.kept:
                inputs[name] = x
            x = self.block.layers[j].forward(be, lp, x, key=lk, train=train)
            if deltas is not None and name in deltas:
                x = x + deltas[name]
        return (x + x0 if self.block.residual else x), inputs


def combine(xp, d, u, groups: int, kept: tuple[bool, bool]):
    """The estimate of a site's output gradient from its K perturbations.

    Args:
        xp: the backend's array namespace.
        d: ``(K, G, B, T)``: each term's directional derivative along the K perturbations.
        u: ``(K, B, ..., units)``: the site's perturbations.
        groups: G.
        kept: the site's ``(groups kept, tokens kept)``.

    Returns:
        ``(B, ..., units)``: the mean over K of each unit's perturbation times the directional
        derivative of the terms it reaches.
    """
    g_ok, t_ok = kept
    k, b, c = u.shape[0], u.shape[1], u.shape[-1]
    if g_ok and t_ok:
        uu = xp.reshape(u, (k, b, d.shape[-1], groups, c // groups))
        dd = xp.permute_dims(d, (0, 2, 3, 1))[..., None]  # (K, B, T, G, 1)
    elif t_ok:
        uu = xp.reshape(u, (k, b, d.shape[-1], c))
        dd = xp.sum(d, axis=1)[..., None]  # (K, B, T, 1)
    elif g_ok:
        uu = xp.reshape(u, (k, b, -1, groups, c // groups))
        dd = xp.permute_dims(xp.sum(d, axis=3), (0, 2, 1))[:, :, None, :, None]  # (K, B, 1, G, 1)
    else:
        uu = xp.reshape(u, (k, b, -1))
        dd = xp.sum(d, axis=(1, 3))[:, :, None]  # (K, B, 1)
    return xp.reshape(xp.sum(uu * dd, axis=0) / k, tuple(u.shape[1:]))


def site_grads(be, layer, p, x, gz, key=None, train=False):
    """The gradient of a site's params from the gradient ``gz`` at its output and its input ``x``:
    ``Σ gz ⊗ x`` for a Linear (over the batch and the tokens), else the layer's own vector-
    Jacobian product (one linear map of its params for every layer with a weight).
    """
    xp = be.xp
    if isinstance(layer, Linear):
        g2 = xp.reshape(gz, (-1, gz.shape[-1]))
        out = {"weight": xp.matmul(xp.matrix_transpose(g2), xp.reshape(x, (-1, x.shape[-1])))}
        if layer.bias:
            out["bias"] = xp.sum(g2, axis=0)
        return out
    return be.grad(lambda lp: xp.sum(layer.forward(be, lp, x, key=key, train=train) * gz))(p)


def per_term(be, loss, logits, y, groups: int):
    """Each term's share of its group's batch-mean loss, ``(G, B, T)``, from ``(G, B, T, C)``
    logits (the derivative of term (g, b, t)'s share reaches token t only; see
    :meth:`duogard.nn.Local.token_logits`).
    """
    xp = be.xp
    g, b, t = logits.shape[0], logits.shape[1], logits.shape[2]
    targets = xp.broadcast_to(y[None, :, None], (g, b, t, *y.shape[1:]))
    targets = xp.reshape(targets, (g, b * t, *y.shape[1:]))
    values = loss(xp.reshape(logits, (g, b * t, -1)), targets, reduction="none")
    values = xp.reshape(values, (g, b, t, -1))
    return xp.sum(values, axis=-1) / (b * values.shape[-1])
