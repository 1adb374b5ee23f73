"""The hand-written torch baselines, without duogard: ``torch.func`` steps, ``loss.backward()``, and
forward-mode rules written out by hand (:func:`manual_jvp`)."""

from __future__ import annotations

import contextlib

from ._common import LR, METHODS

__all__ = ["manual_jvp", "torch_apply", "torch_draw", "torch_draw_rank1", "torch_hand", "torch_leaves"]


def torch_apply(ops, layers, x, eps=None, inputs=None, pre=None):
    """The model's forward pass in bare torch (``torch.nn.functional``).

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
    import torch
    import torch.nn.functional as F

    h, i = x, 0
    for op in ops:
        if op in ("linear", "conv"):
            if inputs is not None:
                inputs.append(h)
            w, b = layers[i]["weight"], layers[i]["bias"]
            h = F.linear(h, w, b) if op == "linear" else F.conv2d(h, w, b, padding=1)
            if pre is not None:
                pre.append(h)
            if eps is not None:
                h = h + eps[i]
            i += 1
        elif op == "relu":
            h = torch.relu(h)
        elif op == "pool":
            h = F.max_pool2d(h, 2)
        elif op == "flatten":
            h = h.flatten(1)
    return h


def torch_leaves(layers):
    """The layers' tensors in layer order: weight, bias, weight, bias, ..."""
    return [layer[k] for layer in layers for k in ("weight", "bias")]


def torch_draw(shapes, dist):
    """One tensor of each shape in ``shapes``, normal or (``dist="rademacher"``) Rademacher."""
    import torch

    if dist == "rademacher":  # what a user writes: random bits, then 2b - 1
        return [torch.empty(s).bernoulli_(0.5).mul_(2).sub_(1) for s in shapes]
    return [torch.randn(s) for s in shapes]


def torch_draw_rank1(shapes, k, dist):
    """K rank-1 tangents per leaf: ``(u, w)`` with ``u`` ``(K, out)`` and ``w`` ``(K, *rest)`` for
    a leaf of two or more axes (the tangent ``u ⊗ w``), a dense ``(K, *shape)`` tensor otherwise."""
    out = []
    for s in shapes:
        if len(s) >= 2:
            u, w = torch_draw([(k, s[0]), (k, *s[1:])], dist)
            out.append((u, w))
        else:
            out.append(torch_draw([(k, *s)], dist)[0])
    return out


def _pre_shapes(ops, layers, x):
    """The shapes of the layers' pre-activations."""
    import torch

    zs = []
    with torch.no_grad():
        torch_apply(ops, layers, x, pre=zs)
    return [tuple(z.shape) for z in zs]


def torch_hand(ops, layers_np, x_np, y_np, method, impl):
    """A hand-written torch step (torch.func, autograd or hand-written JVP rules, then in-place SGD).

    Args:
        ops: the op list.
        layers_np: per-layer NumPy params.
        x_np: the input batch.
        y_np: the labels.
        method: a key of ``METHODS``.
        impl: ``"hand"`` (``torch.func``), ``"hand-autograd"`` (``loss.backward()``, backprop only)
            or ``"hand-jvp"`` (:func:`manual_jvp`, forward methods only).

    Returns:
        ``(run, draw)`` as for :func:`duogard_bench.hand_jax.jax_hand` (``draw`` only for
        ``impl="hand"``).
    """
    import torch
    import torch.func
    import torch.nn.functional as F

    torch.manual_seed(0)
    layers = [{k: torch.tensor(v) for k, v in layer.items()} for layer in layers_np]
    leaves = torch_leaves(layers)
    x, y = torch.tensor(x_np), torch.tensor(y_np)
    batch = x.shape[0]
    kinds = [op for op in ops if op in ("linear", "conv")]
    est, opts = METHODS[method]
    shapes = [tuple(t.shape) for t in leaves]

    def rebuild(flat):
        return [{"weight": flat[2 * i], "bias": flat[2 * i + 1]} for i in range(len(flat) // 2)]

    def loss(*flat):
        return F.cross_entropy(torch_apply(ops, rebuild(flat), x), y)

    sample = None
    if est == "backprop" and impl == "hand":
        gv = torch.func.grad_and_value(loss, argnums=tuple(range(len(leaves))))

        def step():
            g, value = gv(*leaves)
            with torch.no_grad():
                torch._foreach_add_(leaves, list(g), alpha=-LR)
            return value
    elif est == "backprop":  # hand-autograd: loss.backward()
        for t in leaves:
            t.requires_grad_(True)

        def step():
            value = F.cross_entropy(torch_apply(ops, layers, x), y)
            value.backward()
            with torch.no_grad():
                torch._foreach_add_(leaves, [t.grad for t in leaves], alpha=-LR)
            for t in leaves:
                t.grad = None
            return value.detach()
    elif est == "forward" and opts.get("tangents") == "rank1":
        k, dist = opts["num_tangents"], opts["distribution"]

        def sample():
            return torch_draw_rank1(shapes, k, dist)

        def step():  # the factored forward pass (manual_jvp), then a rank-1 update per weight
            v = sample()
            value, d = manual_jvp(ops, layers, rebuild(v), x, y, k)
            _sgd_rank1(leaves, v, d, k)
            return value
    elif est == "forward":
        k, dist = opts["num_tangents"], opts["distribution"]
        tshapes = shapes if k == 1 else [(k, *s) for s in shapes]

        def sample():
            return torch_draw(tshapes, dist)

        if impl == "hand-jvp":

            def step():
                v = sample()
                if k == 1:
                    v = [t[None] for t in v]
                value, d = manual_jvp(ops, layers, rebuild(v), x, y, k)
                _sgd_forward(leaves, v, d, k)
                return value
        elif k == 1:

            def step():
                v = sample()
                value, d = torch.func.jvp(loss, tuple(leaves), tuple(v))
                torch._foreach_add_(leaves, v, alpha=-LR * float(d))
                return value
        else:

            def one(*t):
                return torch.func.jvp(loss, tuple(leaves), t)

            batched = torch.func.vmap(one)

            def step():
                v = sample()
                values, d = batched(*v)
                for p, t in zip(leaves, v):
                    p.add_(torch.tensordot(d, t, dims=1), alpha=-LR / k)
                return values[0]
    else:  # forward-activity
        pre_shapes = _pre_shapes(ops, layers, x)
        zeros = tuple(torch.zeros(s) for s in pre_shapes)

        def sample():
            return torch_draw(pre_shapes, opts.get("distribution", "normal"))

        def per_example(*eps):
            inputs = []
            z = torch_apply(ops, layers, x, eps=eps, inputs=inputs)
            return F.cross_entropy(z, y, reduction="none") / batch, inputs

        def step():
            u = sample()
            per, dper, inputs = torch.func.jvp(per_example, zeros, tuple(u), has_aux=True)
            with torch.no_grad():
                for kind, layer, a, ui in zip(kinds, layers, inputs, u):
                    gz = ui.mul_(dper.reshape((-1,) + (1,) * (ui.ndim - 1)))
                    if kind == "linear":
                        gw, gb = gz.T @ a, gz.sum(0)
                    else:
                        gw = torch.nn.grad.conv2d_weight(a, layer["weight"].shape, gz, padding=1)
                        gb = gz.sum((0, 2, 3))
                    layer["weight"].add_(gw, alpha=-LR)
                    layer["bias"].add_(gb, alpha=-LR)
            return per.sum()

    def run():
        with torch.no_grad() if impl != "hand-autograd" else contextlib.nullcontext():
            return step()

    def draw():
        sample()

    return run, (draw if sample is not None and impl == "hand" else None)


def _sgd_forward(leaves, v, d, k):
    """params -= lr * mean_k(d_k v_k), in place; ``v`` leaves carry a leading K axis."""
    import torch

    if k == 1:
        torch._foreach_add_(leaves, [t[0] for t in v], alpha=-LR * float(d[0]))
    else:
        for p, t in zip(leaves, v):
            p.add_(torch.tensordot(d, t, dims=1), alpha=-LR / k)


def _sgd_rank1(leaves, v, d, k):
    """params -= lr * mean_k(d_k u_k ⊗ w_k), in place: ``addr_`` for K = 1, one ``addmm_`` for K > 1
    (weights seen as ``(out, rest)`` matrices); dense leaves (biases) as in :func:`_sgd_forward`."""
    for p, t in zip(leaves, v):
        if isinstance(t, tuple):
            u, w = t
            mat = p.view(p.shape[0], -1)
            if k == 1:
                mat.addr_(u[0], w[0].reshape(-1), alpha=-LR * float(d[0]))
            else:
                mat.addmm_((u * d[:, None]).T, w.reshape(k, -1), alpha=-LR / k)
        elif k == 1:
            p.add_(t[0], alpha=-LR * float(d[0]))
        else:
            p.add_(d @ t, alpha=-LR / k)


def manual_jvp(ops, layers, tangents, x, y, k):
    """Loss and its K directional derivatives, with forward-mode rules written by hand.

    The input has no tangent, so the first layer's tangent is the layer applied to the weight
    tangent only.

    Args:
        ops: the op list.
        layers: per-layer params (torch tensors).
        tangents: the layers' structure with a leading K axis on every leaf; a weight's may be
            a pair ``(u, w)`` of rank-1 factors (``u`` ``(K, out)``, ``w`` ``(K, *rest)``): its
            tangent is ``u ⊗ w``, carried through the layer factored.
        x: the input batch.
        y: the labels.
        k: the number of tangents K.

    Returns:
        ``(value, d)``: the mean cross-entropy and its K directional derivatives, shape ``(K,)``.
    """
    import torch
    import torch.nn.functional as F

    h, hd, i = x, None, 0
    for op in ops:
        if op == "linear":
            w, b = layers[i]["weight"], layers[i]["bias"]
            vw, vb = tangents[i]["weight"], tangents[i]["bias"]
            z = F.linear(h, w, b)
            if isinstance(vw, tuple):  # x (u wᵀ)ᵀ = (x·w) uᵀ: a (K, B) product, then an outer product
                u, wf = vw
                zd = torch.addcmul(vb[:, None, :], (wf @ h.T)[:, :, None], u[:, None, :])
            else:
                zd = torch.baddbmm(vb[:, None, :], h.expand(k, *h.shape), vw.transpose(1, 2))  # (K, B, O)
            if hd is not None:
                zd += hd @ w.T
            h, hd, i = z, zd, i + 1
        elif op == "conv":
            w, b = layers[i]["weight"], layers[i]["bias"]
            vw, vb = tangents[i]["weight"], tangents[i]["bias"]
            out = w.shape[0]
            z = F.conv2d(h, w, b, padding=1)
            n, _, hh, ww = z.shape
            if isinstance(vw, tuple):  # conv(x, u ⊗ k) = u ⊗ conv(x, k): K output channels
                u, kf = vw
                t = F.conv2d(h, kf, padding=1).transpose(0, 1)[:, :, None]  # (K, B, 1, H, W)
                zd = torch.addcmul(vb[:, None, :, None, None], t, u[:, None, :, None, None])
            else:
                # one conv with the K weight tangents stacked on the output channels
                zd = F.conv2d(h, vw.reshape(k * out, *w.shape[1:]), vb.reshape(-1), padding=1)
                zd = zd.view(n, k, out, hh, ww).transpose(0, 1)
            if hd is not None:
                zd = zd + F.conv2d(hd.reshape(k * n, *hd.shape[2:]), w, padding=1).view(k, n, out, hh, ww)
            h, hd, i = z, zd, i + 1
        elif op == "relu":
            mask = h > 0
            h, hd = torch.relu(h), hd * mask
        elif op == "pool":
            h, idx = F.max_pool2d(h, 2, return_indices=True)
            kk, n, c = hd.shape[:3]
            flat_idx = idx.flatten(2).expand(kk, -1, -1, -1)
            hd = hd.reshape(kk, n, c, -1).gather(3, flat_idx).view(kk, *h.shape)
        elif op == "flatten":
            h, hd = h.flatten(1), (None if hd is None else hd.flatten(2))
    logp = torch.log_softmax(h, dim=-1)
    value = -logp.gather(1, y[:, None]).mean()
    probs = logp.exp()
    picked = hd.gather(2, y.expand(hd.shape[0], -1)[..., None])[..., 0]
    d = ((hd * probs).sum(-1) - picked).mean(-1)  # (K,)
    return value, d
