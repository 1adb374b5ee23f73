"""The LocalMixer (Ren et al. 2023) under the local estimators: its shape and params on both
backends, LG-BP's stop-gradient between blocks, LG-FG-A's and LG-FG-W's unbiasedness for the
local objective, and the same trajectory on JAX and torch.
"""

from __future__ import annotations

import numpy as np
import pytest

import duogard as dg
from duogard import nn, optim
from duogard.grad import local_losses, local_objective, supervised
from duogard.tree import tree_leaves, tree_map

from helpers import to_backend, to_numpy

LOCAL = ("local-backprop", "local-forward-activity", "local-forward", "forward-guess")


def _mixer(hidden=(8, 8), groups=2, classes=3, patch=2):
    return dg.train.build_model("local-mixer", classes, hidden=hidden, groups=groups, patch=patch)


def _setup(be, batch=3, side=4, dtype="float64", **kw):
    model = _mixer(**kw)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, 1, side, side)).astype(dtype)
    y = rng.integers(0, 3, batch)
    params = to_backend(be, model.init(0, x))
    return model, params, (be.asarray(x), be.asarray(y))


def _flat(be, tree):
    return np.concatenate([np.ravel(a) for a in tree_leaves(to_numpy(be, tree))])


def test_local_mixer_shape_and_params(be):
    model, params, (x, _) = _setup(be, batch=5, side=8, hidden=(8, 8, 8), groups=2)
    assert tuple(model.apply(params, x).shape) == (5, 3)
    shapes = tree_map(lambda a: tuple(a.shape), params)
    head = {"weight": (2, 3, 4), "bias": (2, 3)}
    # 16 tokens of 2x2 pixels; block 1 embeds them (Linear) and mixes the channels in groups
    assert shapes["1"] == {"1": {"weight": (8, 4), "bias": (8,)}, "5": {"weight": (8, 4), "bias": (8,)},
                           "head": head}  # fmt: skip
    # later blocks mix the tokens (16 x 16), then the channels: a Linear, then a grouped one
    for b in ("2", "3"):
        assert shapes[b] == {"1": {"weight": (16, 16), "bias": (16,)}, "5": {"weight": (8, 8), "bias": (8,)},
                             "9": {"weight": (8, 4), "bias": (8,)}, "head": head}  # fmt: skip
    assert shapes["6"] == {"weight": (3, 8), "bias": (3,)}
    assert [type(m).__name__ for m in model.layers] == ["Patches", "Local", "Local", "Local", "TokenMean",
                                                         "LayerNorm", "Linear"]  # fmt: skip
    assert not model[1].residual and model[2].residual and model[3].residual
    # a LayerNorm before and after every linear layer, then a ReLU
    kinds = [type(m).__name__ for m in model[2].layers]
    channels = ["LayerNorm", "Linear", "LayerNorm", "Activation"]
    channels += ["LayerNorm", "GroupedLinear", "LayerNorm", "Activation"]
    assert kinds == ["LayerNorm", "TokenLinear", "LayerNorm", "Activation", *channels]


def test_mixer_layers_compute_what_they_say(be):
    rng = np.random.default_rng(1)
    img = rng.normal(size=(2, 3, 4, 6))
    x = be.asarray(img)
    tokens = be.to_numpy(nn.Patches(2).apply({}, x))
    assert tokens.shape == (2, 6, 12)
    np.testing.assert_array_equal(tokens[1, 4], img[1, :, 2:4, 2:4].ravel())  # row 1, column 1
    t = rng.normal(size=(2, 6, 4))
    tl = nn.TokenLinear(5)
    p = tl.init(0, t.shape)
    got = be.to_numpy(tl.apply(to_backend(be, p), be.asarray(t)))
    want = np.einsum("st,btc->bsc", p["weight"], t) + p["bias"][:, None]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    gl = nn.GroupedLinear(6, 2)
    p = gl.init(0, t.shape)
    got = be.to_numpy(gl.apply(to_backend(be, p), be.asarray(t)))
    for g in range(2):
        want = t[..., 2 * g : 2 * g + 2] @ p["weight"][3 * g : 3 * g + 3].T + p["bias"][3 * g : 3 * g + 3]
        np.testing.assert_allclose(got[..., 3 * g : 3 * g + 3], want, rtol=1e-12)
    ln = nn.LayerNorm(groups=2, elementwise_affine=False)
    got = be.to_numpy(ln.apply({}, be.asarray(t)))
    half = t[..., :2]
    want = (half - half.mean(-1, keepdims=True)) / np.sqrt(half.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(got[..., :2], want, rtol=1e-9)
    np.testing.assert_allclose(be.to_numpy(nn.TokenMean().apply({}, be.asarray(t))), t.mean(1), rtol=1e-12)


def test_token_logits_reach_their_own_token(be):
    """Token t's logits have the heads' value and a derivative that reaches token t only."""
    block = nn.Local(nn.Linear(8), num_classes=3, groups=2, head_norm=True)
    rng = np.random.default_rng(2)
    p = to_backend(be, block.init(0, (2, 5, 3)))
    h = be.asarray(rng.normal(size=(2, 5, 8)))
    logits = be.to_numpy(block.token_logits(be, p, h))
    assert logits.shape == (2, 2, 5, 3)
    np.testing.assert_allclose(
        logits, np.repeat(be.to_numpy(block.heads(be, p, h))[:, :, None], 5, 2), rtol=1e-12
    )
    tangent = np.zeros((2, 5, 8))
    tangent[:, 3] = rng.normal(size=(2, 8))
    _, dt = be.jvp(lambda a: block.token_logits(be, p, a), (h,), (be.asarray(tangent),))
    dt = be.to_numpy(dt)
    assert np.abs(dt[:, :, 3]).max() > 1e-2 and not np.any(dt[:, :, [0, 1, 2, 4]])


def test_local_backprop_on_the_mixer_stops_the_gradient_between_blocks(be):
    model, params, batch = _setup(be, hidden=(8, 8, 8))
    lf = supervised(model)
    _, grads = dg.estimator("local-backprop")(lf, params, batch)
    _, exact = be.value_and_grad(local_objective(lf))(params, batch)
    np.testing.assert_allclose(_flat(be, grads), _flat(be, exact), rtol=1e-10, atol=1e-12)
    for k, name in enumerate(("1", "2", "3")):
        own = be.grad(lambda p, b, k=k: local_losses(lf, p, b)[1][k])(params, batch)
        np.testing.assert_allclose(_flat(be, grads[name]), _flat(be, own[name]), rtol=1e-10, atol=1e-13)
        others = [n for n in ("1", "2", "3", "6") if n != name]
        assert not any(np.any(_flat(be, own[n])) for n in others)
    # and a finite difference of block 2's own loss (its input does not move with its weights)
    w = to_numpy(be, params)
    for leaf, index in (
        (("2", "1", "weight"), (3, 1)),
        (("2", "5", "weight"), (2, 0)),
        (("2", "9", "bias"), (5,)),
    ):
        fd = []
        for sign in (1, -1):
            moved = tree_map(np.copy, w)
            target = moved[leaf[0]][leaf[1]][leaf[2]]
            target[index] += sign * 1e-6
            fd.append(float(local_losses(lf, to_backend(be, moved), batch)[1][1]))
        got = to_numpy(be, grads)[leaf[0]][leaf[1]][leaf[2]][index]
        assert abs(got) > 1e-3 and got == pytest.approx((fd[0] - fd[1]) / 2e-6, rel=1e-5)


@pytest.mark.parametrize("method", ["local-forward-activity", "local-forward"])
def test_local_forward_gradients_on_the_mixer_are_unbiased(be, method):
    """The mean over many keys is the exact gradient of the local objective (float64, within
    five standard errors, coordinate by coordinate); heads and the output layer are exact.
    """
    model, params, batch = _setup(be)
    lf = supervised(model)
    exact = _flat(be, dg.estimator("local-backprop")(lf, params, batch)[1])
    est = dg.estimator(method)
    step = be.jit(lambda p, b, k: est(lf, p, b, k)[1])
    n = 300
    draws = np.stack([_flat(be, step(params, batch, be.fold_in(be.key(7), i))) for i in range(n)])
    mean, sem = draws.mean(0), draws.std(0) / np.sqrt(n)
    noisy = np.concatenate([
        np.full(np.size(a), path[0] in ("1", "2") and path[1] != "head")
        for path, a in _leaves_with_paths(to_numpy(be, params))
    ])  # fmt: skip
    # block 1: the patch embedding (4 pixels -> 8) and the grouped Linear (2 groups of 4 -> 4);
    # block 2: the token mixing (4 tokens), the Linear (8 -> 8) and the grouped Linear
    assert noisy.sum() == (8 * 4 + 8) + (8 * 4 + 8) + (4 * 4 + 4) + (8 * 8 + 8) + (8 * 4 + 8)
    np.testing.assert_allclose(
        draws[:, ~noisy], np.broadcast_to(exact[~noisy], draws[:, ~noisy].shape), rtol=1e-9, atol=1e-13
    )
    live = noisy & (sem > 0)
    np.testing.assert_allclose(mean[noisy & ~live], exact[noisy & ~live], atol=1e-13)
    err = np.abs(mean - exact)[live] - 1e-12 * np.abs(exact).max()
    assert (err / sem[live]).max() < 5.0, (err / sem[live]).max()
    e2e = _flat(be, dg.estimator("backprop")(lf, params, batch)[1])
    assert (np.abs(mean - e2e)[live] / sem[live]).max() > 10.0


def _leaves_with_paths(tree, path=()):
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from _leaves_with_paths(tree[k], (*path, k))
    else:
        yield path, tree


@pytest.mark.integration
@pytest.mark.parametrize("method", ("backprop", *LOCAL))
def test_mixer_follows_the_same_trajectory_on_both_backends(both, digits, method):
    """Through fit on the digits (16 tokens of 2x2 pixels, portable draws): the same losses and
    params on JAX and torch for 100 steps in float64, and for the first 15 in float32.

    Rounding is all that differs, but this model's training amplifies it: in float32 the two
    runs part (past 5e-5 in the loss) after 20 to 80 steps, backprop's too, and in float64 a
    mixer of 8 channels in groups of 4 parts by step 20 (LayerNorms over a few units after
    every linear layer); with 16 channels in groups of 8 the float64 runs stay within 1e-9.
    """
    model = _mixer(hidden=(16, 16), groups=2, classes=10)
    for dtype, steps in (("float64", 100), ("float32", 15)):
        data = digits if dtype == "float32" else dg.data.load("digits", dtype="float64")
        params = model.init(0, data.example_input)
        runs = [
            dg.fit(model, params, data, optimizer=optim.sgd(0.05), estimator=dg.estimator(method),
                   backend=b.name, steps=steps, batch_size=16, callbacks=[])
            for b in both
        ]  # fmt: skip
        a, b = (np.array([r["loss"] for r in run.history]) for run in runs)
        exact = dtype == "float64"
        np.testing.assert_allclose(a, b, rtol=1e-7 if exact else 5e-5)
        for pa, pb in zip(tree_leaves(runs[0].params), tree_leaves(runs[1].params)):
            np.testing.assert_allclose(
                both[0].to_numpy(pa), both[1].to_numpy(pb), rtol=1e-3, atol=1e-6 if exact else 5e-4
            )
        if exact:
            assert a[-10:].mean() < a[:10].mean()  # and it learns


@pytest.mark.integration
def test_parity_runs_the_mixer_in_lockstep(both, digits):
    """Blocks of several sites give nested tangents ({block: {site: u}}): parity shares them."""
    model = _mixer(hidden=(16, 16), groups=2, classes=10)
    for method in ("local-forward-activity", "local-forward"):
        rep = dg.parity.compare_backends(
            model, "cross_entropy", optim.sgd(0.05), method, digits, steps=5, batch_size=16
        )
        assert rep.first_divergence is None, rep.table()
