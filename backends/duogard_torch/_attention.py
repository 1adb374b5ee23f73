"""Attention on PyTorch over key blocks with the online softmax, and its one-pass forward-mode rule.

A loop over key blocks (views of k and v) carrying the running row maximum ``m``, normaliser
``l`` and unnormalised output ``o``; each block is one ``torch.autograd.Function`` with its own
rules. Its ``jvp`` reuses the block's weights ``p``, which its ``forward`` just computed: the
tangents go through the same pass as the values (``ds = dq kᵀ + q dkᵀ``, ``dl' = α dl + Σ p·ds``,
``do' = α do + (p·ds) v + p dv``), and one block of scores is alive at a time. A single Function
over all the blocks could not: torch runs its ``jvp`` after its whole ``forward``, so it would
compute every block's weights twice. torch's own fused kernels (flash, memory-efficient, its CPU
flash kernel) have no forward-mode rule at all. ``backward`` is the block's reverse rule; each
block keeps its weights for it, as the math form keeps its matrix.
"""

from __future__ import annotations

import math

import torch


def attention(q, k, v, *, mask=None, causal=False, scale=None, block=512):
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    lq, lk = q.shape[-2], k.shape[-2]
    block = max(1, min(int(block), lk))
    keep = bias = None
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = mask
        else:
            bias = mask.to(dtype)
    lead = torch.broadcast_shapes(*(a.shape[:-2] for a in (q, k, v, bias, keep) if a is not None))
    m = torch.full((*lead, lq, 1), -math.inf, dtype=dtype, device=q.device)
    norm = torch.zeros((*lead, lq, 1), dtype=dtype, device=q.device)
    o = torch.zeros((*lead, lq, v.shape[-1]), dtype=dtype, device=q.device)
    qs = q * scale
    queries = torch.arange(lq, device=q.device)[:, None]
    for start in range(0, lk, block):
        stop = min(start + block, lk)
        live = None
        if causal:  # torch's is_causal: key j <= query i
            live = torch.arange(start, stop, device=q.device) <= queries
        if keep is not None:
            part = _keys(keep, start, stop, dim=-1)
            live = part if live is None else live & part
        b = None if bias is None else _keys(bias, start, stop, dim=-1)
        kb, vb = _keys(k, start, stop), _keys(v, start, stop)
        m, norm, o, _, _ = _Block.apply(qs, kb, vb, b, live, m, norm, o)
    # a row with every key masked: 0, as torch's math kernel
    return o / torch.where(norm > 0, norm, 1.0)


def _keys(x, start, stop, dim=-2):
    """``x``'s keys ``start:stop`` along ``dim`` (a view; all of them where ``x`` broadcasts there)."""
    return x if x.shape[dim] == 1 else x.narrow(dim, start, stop - start)


class _Block(torch.autograd.Function):
    """One key block of the online softmax: ``(m, l, o)`` to ``(m', l', o')``, with the block's
    weights ``p = exp(s - m')`` and the rescaling ``α = exp(m - m')`` as outputs that its rules
    reuse (not differentiable; ``m'`` neither: it cancels from the attention's output).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(qs, kb, vb, bias, live, m, norm, o):
        s = qs @ kb.transpose(-2, -1)
        if bias is not None:
            s = s + bias
        if live is not None:
            s = s.masked_fill(~live, -math.inf)
        top = torch.maximum(m, s.amax(dim=-1, keepdim=True))
        safe = torch.where(torch.isneginf(top), 0.0, top)  # a row with no live key yet: p = 0
        p = s.sub_(safe).exp_()  # s is this function's own: in place
        alpha = torch.exp(m - safe)
        return top, alpha * norm + p.sum(dim=-1, keepdim=True), alpha * o + p @ vb, p, alpha

    @staticmethod
    def setup_context(ctx, inputs, output):
        qs, kb, vb, bias, _, _, _, _ = inputs
        _, _, _, p, alpha = output
        ctx.mark_non_differentiable(output[0], p, alpha)
        ctx.save_for_forward(qs, kb, vb, p, alpha)
        ctx.save_for_backward(qs, kb, vb, p, alpha)
        ctx.bias_shape = None if bias is None else bias.shape

    @staticmethod
    def jvp(ctx, dqs, dkb, dvb, dbias, _dlive, _dm, dl, do):
        qs, kb, vb, p, alpha = ctx.saved_tensors
        if dqs is not None and dkb is not None:  # dq kᵀ + q dkᵀ as one product
            ds = torch.cat((dqs, qs), dim=-1) @ torch.cat((kb, dkb), dim=-1).transpose(-2, -1)
        elif dqs is not None or dkb is not None:
            ds = dqs @ kb.transpose(-2, -1) if dkb is None else qs @ dkb.transpose(-2, -1)
        else:
            ds = None
        own = ds is not None  # an array of this rule's, which it may overwrite
        if dbias is not None:
            ds = dbias if ds is None else ds + dbias
        dl2 = None if dl is None else alpha * dl
        do2 = None if do is None else alpha * do
        if ds is not None:
            pds = ds.mul_(p) if own and _may_overwrite(ds, p) else p * ds
            dl2 = _plus(dl2, pds.sum(dim=-1, keepdim=True))
            do2 = _plus(do2, pds @ vb)
        if dvb is not None:
            do2 = _plus(do2, p @ dvb)
        return None, _or_zero(dl2, alpha), _or_zero(do2, alpha, vb.shape[-1]), None, None

    @staticmethod
    def backward(ctx, _gm, gl, go, _gp, _galpha):
        qs, kb, vb, p, alpha = ctx.saved_tensors
        dp = None if go is None else go @ vb.transpose(-2, -1)
        if gl is not None:
            dp = gl if dp is None else dp + gl
        ds = None if dp is None else p * dp
        g_qs = g_kb = g_vb = g_bias = None
        if ds is not None:
            g_qs, g_kb = ds @ kb, ds.transpose(-2, -1) @ qs
            if ctx.bias_shape is not None:
                g_bias = ds.sum_to_size(ctx.bias_shape)
        if go is not None:
            g_vb = p.transpose(-2, -1) @ go
        g_l = None if gl is None else alpha * gl
        g_o = None if go is None else alpha * go
        return g_qs, g_kb, g_vb, g_bias, None, None, g_l, g_o


def _may_overwrite(target, other) -> bool:
    """Whether ``target.mul_(other)`` is allowed: under vmap (``generate_vmap_rule`` runs the
    rules on batched tensors) only where ``target`` is batched wherever ``other`` is.
    """
    batched = torch._C._functorch.is_batchedtensor
    return batched(target) or not batched(other)


def _plus(a, b):
    return b if a is None else a + b


def _or_zero(t, alpha, width=1):
    """``t``, or zeros of the running state's shape where no tangent reached it."""
    return t if t is not None else alpha.new_zeros((*alpha.shape[:-1], width))
