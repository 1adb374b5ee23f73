"""``be.attention``, the blockwise attention with the online softmax: its value and its JVP against
the plain math attention's (and the framework's own ``jvp`` of it) in float64, with causal,
boolean and additive masks, an uneven last block and broadcast heads; reverse mode, vmap over
tangents and jit; the two backends against each other; and a JVP whose memory is one block of
scores, not the ``(Lq, Lk)`` matrix."""

from __future__ import annotations

import math

import numpy as np
import pytest

F64 = dict(rtol=1e-10, atol=1e-12)

# (batch, query heads, key heads, Lq, Lk, D, Dv); Lk = 53 over blocks of 16: the last holds 5
SHAPES = (2, 3, 3, 37, 53, 8, 5)


def _inputs(*, heads_k=3, mask=None, seed=0):
    """q, k, v (and a mask), their tangents, in NumPy float64."""
    b, h, _, lq, lk, d, dv = SHAPES
    rng = np.random.default_rng(seed)
    arrays = [
        rng.standard_normal((b, h, lq, d)),
        rng.standard_normal((b, heads_k, lk, d)),
        rng.standard_normal((b, heads_k, lk, dv)),
    ]
    if mask == "padding":  # (B, 1, 1, Lk); batch 0 keeps no key at all: its rows are 0
        keep = rng.random((b, 1, 1, lk)) > 0.3
        keep[0] = False
        arrays.append(keep)
    elif mask == "additive":  # (B, 1, Lq, Lk), -inf where masked: a differentiable float mask
        live = rng.random((b, 1, lq, lk)) > 0.2
        arrays.append(np.where(live, rng.standard_normal((b, 1, lq, lk)), -np.inf))
    tangents = [rng.standard_normal(a.shape) for a in arrays if a.dtype != bool]
    return arrays, tangents


def _math(be, q, k, v, mask=None, causal=False, scale=None):
    """The math form: the whole (Lq, Lk) matrix of scores, softmax, rows without keys 0."""
    xp = be.xp
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = xp.matmul(q, xp.matrix_transpose(k)) * scale
    live = None
    if causal:
        live = be.asarray(np.tril(np.ones((q.shape[-2], k.shape[-2]), bool)))
    if mask is not None and mask.dtype == xp.bool:
        live = mask if live is None else xp.logical_and(live, mask)
    elif mask is not None:
        s = s + mask
    if live is not None:
        s = xp.where(live, s, xp.full_like(s, -math.inf))
    any_live = xp.any(s != -math.inf, axis=-1, keepdims=True)
    s = xp.where(any_live, s, xp.zeros_like(s))  # no NaN from a row of -inf (nor in its tangent)
    w = xp.where(any_live, be.softmax(s, axis=-1), xp.zeros_like(s))
    return xp.matmul(w, v)


CASES = {
    "plain": dict(),
    "causal": dict(causal=True),  # Lq < Lk: torch's is_causal, key j <= query i
    "padding": dict(mask="padding"),
    "causal-padding": dict(mask="padding", causal=True),
    "additive": dict(mask="additive"),
    "broadcast-heads": dict(heads_k=1, causal=True),  # k and v shared by the query heads
}


def _run(be, case, fn, arrays, tangents):
    """``be.jvp`` of ``fn`` along the tangents, the mask a constant unless it is additive."""
    opts = CASES[case]
    b = [be.asarray(a) for a in arrays]
    t = [be.asarray(a) for a in tangents]
    causal = opts.get("causal", False)
    if opts.get("mask") == "padding":
        return be.jvp(lambda q, k, v: fn(q, k, v, b[3], causal), b[:3], t)
    if opts.get("mask") == "additive":
        return be.jvp(lambda q, k, v, m: fn(q, k, v, m, causal), b, t)
    return be.jvp(lambda q, k, v: fn(q, k, v, None, causal), b[:3], t)


@pytest.mark.parametrize("case", list(CASES))
def test_attention_value_and_jvp_match_the_math_form(be, case):
    opts = CASES[case]
    arrays, tangents = _inputs(heads_k=opts.get("heads_k", 3), mask=opts.get("mask"))

    def blockwise(q, k, v, m, causal):
        return be.attention(q, k, v, mask=m, causal=causal, scale=0.3, block=16)

    def plain(q, k, v, m, causal):
        return _math(be, q, k, v, m, causal, scale=0.3)

    out, dout = _run(be, case, blockwise, arrays, tangents)
    want, dwant = _run(be, case, plain, arrays, tangents)
    assert tuple(out.shape) == SHAPES[:2] + (SHAPES[3], SHAPES[6]) and out.dtype == be.float64
    np.testing.assert_allclose(be.to_numpy(out), be.to_numpy(want), **F64)
    np.testing.assert_allclose(be.to_numpy(dout), be.to_numpy(dwant), **F64)
    if opts.get("mask") == "padding":  # a batch whose every key is masked: 0, as torch's math kernel
        assert not np.any(be.to_numpy(out)[0]) and not np.any(be.to_numpy(dout)[0])


@pytest.mark.parametrize("case", ["causal-padding", "additive"])
def test_attention_agrees_between_backends(both, case):
    opts = CASES[case]
    arrays, tangents = _inputs(mask=opts.get("mask"), seed=1)

    def blockwise(be):
        return lambda q, k, v, m, causal: be.attention(q, k, v, mask=m, causal=causal, block=16)

    (jo, jd), (to, td) = (_run(be, case, blockwise(be), arrays, tangents) for be in both)
    np.testing.assert_allclose(both[0].to_numpy(jo), both[1].to_numpy(to), **F64)
    np.testing.assert_allclose(both[0].to_numpy(jd), both[1].to_numpy(td), **F64)


@pytest.mark.parametrize("case", ["causal-padding", "additive", "broadcast-heads"])
def test_attention_gradient_matches_the_math_form(be, case):
    """Reverse mode (an additive mask's gradient too): JAX transposes the forward rule, torch runs
    each block's backward rule."""
    opts = CASES[case]
    arrays, _ = _inputs(heads_k=opts.get("heads_k", 3), mask=opts.get("mask"), seed=2)
    b = [be.asarray(a) for a in arrays]
    causal = opts.get("causal", False)
    fixed = b[3] if opts.get("mask") == "padding" else None
    argnums = (0, 1, 2, 3) if opts.get("mask") == "additive" else (0, 1, 2)

    def loss(fn):
        def f(q, k, v, m=fixed):
            return be.xp.sum(fn(q, k, v, m) ** 2)

        return f

    def blockwise(q, k, v, m):
        return be.attention(q, k, v, mask=m, causal=causal, block=16)

    def plain(q, k, v, m):
        return _math(be, q, k, v, m, causal=causal)

    primals = b[: len(argnums)]
    got = be.grad(loss(blockwise), argnums)(*primals)
    want = be.grad(loss(plain), argnums)(*primals)
    for g, w in zip(got, want):
        assert np.all(np.isfinite(be.to_numpy(g)))
        np.testing.assert_allclose(be.to_numpy(g), be.to_numpy(w), **F64)


def test_attention_jvp_under_vmap_and_jit(be):
    """K tangents at once (``vmap`` of ``jvp``, as the forward estimators run it), compiled; and
    a vmap over the queries with one shared tangent (the rule's arrays batched differently)."""
    arrays, _ = _inputs(seed=3)
    q, k, v = (be.asarray(a) for a in arrays)
    rng = np.random.default_rng(4)
    stack = be.asarray(rng.standard_normal((4, *arrays[1].shape)))

    def directional(f):
        return be.jit(lambda k, ts: be.vmap(lambda t: be.jvp(lambda kk: f(q, kk, v), (k,), (t,))[1])(ts))

    got = directional(lambda q, k, v: be.attention(q, k, v, block=16))(k, stack)
    want = directional(lambda q, k, v: _math(be, q, k, v))(k, stack)
    np.testing.assert_allclose(be.to_numpy(got), be.to_numpy(want), **F64)

    queries = be.asarray(rng.standard_normal((3, *arrays[0].shape)))
    dq = be.asarray(rng.standard_normal(arrays[0].shape))

    def per_query(f):
        return be.vmap(lambda qq: be.jvp(lambda x: f(x, k, v), (qq,), (dq,))[1])(queries)

    got = per_query(lambda q, k, v: be.attention(q, k, v, causal=True, block=16))
    want = per_query(lambda q, k, v: _math(be, q, k, v, causal=True))
    np.testing.assert_allclose(be.to_numpy(got), be.to_numpy(want), **F64)


def test_attention_in_float32_within_rounding_of_the_math_form(be):
    arrays, tangents = _inputs(seed=5)
    b = [be.asarray(a, dtype="float32") for a in arrays]
    t = [be.asarray(a, dtype="float32") for a in tangents]
    out, dout = be.jvp(lambda q, k, v: be.attention(q, k, v, causal=True, block=16), b, t)
    want, dwant = be.jvp(lambda q, k, v: _math(be, q, k, v, causal=True), b, t)
    assert out.dtype == be.float32 and dout.dtype == be.float32
    np.testing.assert_allclose(be.to_numpy(out), be.to_numpy(want), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(be.to_numpy(dout), be.to_numpy(dwant), rtol=1e-5, atol=1e-5)


def test_attention_jvp_holds_one_block_of_scores_not_the_matrix(be):
    """The JVP's step memory (XLA's temp bytes / the storages torch allocates) stays far under
    one (Lq, Lk) matrix of scores and grows with the length, not its square; the math form's
    holds several such matrices."""
    d, block = 8, 32

    def memory(length, fn):
        rng = np.random.default_rng(length)
        x = [be.asarray(rng.standard_normal((1, length, d))) for _ in range(6)]
        step = be.jit(lambda q, k, v, dq, dk, dv: be.jvp(fn, (q, k, v), (dq, dk, dv)))
        return be.step_memory(step, *x)

    def blockwise(q, k, v):
        return be.attention(q, k, v, causal=True, block=block)

    def plain(q, k, v):
        return _math(be, q, k, v, causal=True)

    small, large = memory(256, blockwise), memory(512, blockwise)
    matrix = 512 * 512 * 8
    assert 0 < large < matrix / 2, (large, matrix)
    assert large < 2.5 * small, (small, large)  # linear in the length (quadratic would be 4x)
    assert memory(512, plain) > 2 * matrix
