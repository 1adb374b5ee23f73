"""Rank-1 tangents (``estimator("forward", tangents="rank1")``): the factors, the forward rules
that carry them, the rank-1 updates, and the estimator's first and second moments against the
formulas (both backends, and the two backends against each other)."""

from __future__ import annotations

import numpy as np
import pytest

import duogard as dg
from duogard import losses, nn, optim
from duogard.grad import supervised
from duogard.train import Trainer, build_model
from duogard.tree import Rank1

from helpers import to_backend


def _np(be, tree):
    return [np.asarray(be.to_numpy(a)) for a in dg.tree.tree_leaves(tree)]


def test_rank1_dense_combine_and_gram_follow_numpy(be):
    rng = np.random.default_rng(0)
    u, w, c = rng.standard_normal((3, 4)), rng.standard_normal((3, 2, 5)), rng.standard_normal(3)
    r = Rank1(be.asarray(u), be.asarray(w))
    dense = np.einsum("km,kn->kmn", u, w.reshape(3, -1)).reshape(3, 4, 2, 5)
    assert r.shape == (3, 4, 2, 5)
    np.testing.assert_allclose(be.to_numpy(r.dense(be.xp)), dense, rtol=1e-12)
    np.testing.assert_allclose(
        be.to_numpy(r.combine(be.xp, be.asarray(c))), np.tensordot(c, dense, 1), rtol=1e-12
    )
    flat = dense.reshape(3, -1)
    np.testing.assert_allclose(be.to_numpy(r.gram(be.xp)), flat @ flat.T, rtol=1e-12)
    with pytest.raises(ValueError, match="Rank1: u must be"):
        Rank1(be.asarray(u), be.asarray(w[:2]))


def test_rank1_draws_factor_weights_and_keep_biases_dense(be):
    params = to_backend(be, {"b": np.zeros(3), "w": np.zeros((3, 4)), "k": np.zeros((2, 3, 2, 2))})
    est = dg.estimator("forward", tangents="rank1", num_tangents=2, distribution="rademacher")
    tree = est.tangent_tree(params, be.key(0))
    assert isinstance(tree["w"], Rank1) and tree["w"].shape == (2, 3, 4)
    assert isinstance(tree["k"], Rank1) and tree["k"].shape == (2, 2, 3, 2, 2)
    assert not isinstance(tree["b"], Rank1) and tuple(tree["b"].shape) == (2, 3)
    flat = np.asarray(be.to_numpy(est.sample(None, params, None, be.key(0))))  # formed for sharing
    assert flat.shape == (2, 3 + 12 + 24) and set(np.unique(flat)) == {-1.0, 1.0}


@pytest.fixture(scope="module")
def digits_batch():
    data = dg.data.load("digits", seed=0)
    return data.x_train[:8].astype(np.float64), data.y_train[:8]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("k", [1, 3])
def test_rules_carry_the_factors_to_the_framework_s_numbers(be, digits_batch, kind, k):
    """The rules' (x·w) uᵀ and u ⊗ conv(x, k) against the framework's jvp along u wᵀ formed dense."""
    x, y = digits_batch
    model = (
        build_model(kind, 10, channels=2, cnn_hidden=5)
        if kind == "cnn"
        else build_model(kind, 10, hidden=(7, 5))
    )
    params = to_backend(be, model.init(0, x, dtype="float64"))
    lf, batch = supervised(model, losses.cross_entropy), (be.asarray(x), be.asarray(y))
    key = be.key(3)

    # each under the backend's jit: one program on JAX, not a dispatch (and a compile) per op
    def run(jvp):
        est = dg.estimator("forward", tangents="rank1", num_tangents=k, jvp=jvp)
        return be.jit(lambda p, b, key: est(lf, p, b, key))(params, batch, key)

    got, want = run("rules"), run("framework")
    assert float(got[0]) == pytest.approx(float(want[0]), rel=1e-12)
    for a, b in zip(_np(be, got[1]), _np(be, want[1])):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def _linear_objective(be, grads):
    """f(θ) = Σ_l <G_l, θ_l>: ∇f = G exactly, and every directional derivative is exact."""

    def loss_fn(params, batch):
        return sum(be.xp.sum(params[n] * be.asarray(grads[n])) for n in grads)

    return loss_fn


@pytest.mark.parametrize("distribution", ["normal", "rademacher"])
def test_rank1_estimate_is_unbiased_with_the_derived_second_moment(be, distribution):
    """E[g] = ∇f, and E|g|² = P|∇f|² + Σ_l e_l |∇_l f|² with e_l = 2m + 2n + 4 for a rank-1
    normal leaf (m, n), 2 for a dense normal leaf, 0 with Rademacher factors (|v|² = P)."""
    rng = np.random.default_rng(1)
    grads = {"b": rng.standard_normal(3) * 0.3, "w": rng.standard_normal((3, 4))}
    params = to_backend(be, {"b": np.zeros(3), "w": np.zeros((3, 4))})
    n, total = 40_000, 15
    est = dg.estimator("forward", tangents="rank1", num_tangents=n, distribution=distribution)
    tree = est.tangent_tree(params, be.key(11))
    v = {"b": np.asarray(be.to_numpy(tree["b"])), "w": np.asarray(be.to_numpy(tree["w"].dense(be.xp)))}
    d = sum(np.tensordot(v[k].reshape(n, -1), grads[k].ravel(), 1) for k in v)
    g = {k: d.reshape((n,) + (1,) * grads[k].ndim) * v[k] for k in v}
    sq = sum((g[k].reshape(n, -1) ** 2).sum(1) for k in g)
    # unbiased: every coordinate's mean within 4.5 standard errors of ∇f
    for k in g:
        mean, se = g[k].mean(0), g[k].std(0) / np.sqrt(n)
        assert np.all(np.abs(mean - grads[k]) < 4.5 * se), k
    gw, gb = float((grads["w"] ** 2).sum()), float((grads["b"] ** 2).sum())
    if distribution == "rademacher":
        assert np.all(sum((v[k].reshape(n, -1) ** 2).sum(1) for k in v) == total)  # |v|² = P exactly
        want = total * (gw + gb)
        other = total * (gw + gb) + (2 * 3 + 2 * 4 + 4) * gw + 2 * gb  # normal factors
    else:
        want = total * (gw + gb) + (2 * 3 + 2 * 4 + 4) * gw + 2 * gb
        other = (total + 2) * (gw + gb)  # dense normal tangents: the formula must tell them apart
    assert sq.mean() == pytest.approx(want, rel=0.06)
    assert abs(sq.mean() - other) > 0.15 * want
    # and the estimator returns exactly d v for one of these tangents
    est1 = dg.estimator("forward", tangents="rank1", distribution=distribution)
    loss, g1 = est1(_linear_objective(be, grads), params, None, be.key(5))
    v1 = est1.tangent_tree(params, be.key(5))
    dense1 = {
        k: np.asarray(be.to_numpy(t.dense(be.xp) if isinstance(t, Rank1) else t))[0] for k, t in v1.items()
    }
    d1 = sum(float(np.sum(dense1[k] * grads[k])) for k in dense1)
    np.testing.assert_allclose(np.asarray(be.to_numpy(g1["w"])), d1 * dense1["w"], rtol=1e-9, atol=1e-12)


def test_projection_with_rank1_tangents_equals_it_with_the_tangents_formed(be, digits_batch):
    x, y = digits_batch
    model = build_model("mlp", 10, hidden=(5,))
    params = to_backend(be, model.init(0, x, dtype="float64"))
    lf, batch = supervised(model, losses.cross_entropy), (be.asarray(x), be.asarray(y))
    est = dg.estimator("forward", tangents="rank1", num_tangents=3, projection=True)
    flat = est.sample(lf, params, batch, be.key(2))  # the same tangents, dense
    got, want = est(lf, params, batch, be.key(2)), est.estimate(lf, params, batch, flat)
    for a, b in zip(_np(be, got[1]), _np(be, want[1])):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("strategy", ["sgd-factored", "sgd-lean"])
def test_rank1_updates_give_the_numbers_of_update_then_apply(be, digits_batch, strategy):
    """The rank-1 update (addr_ / fused) against opt.update + apply_updates on the estimate."""
    x, y = digits_batch
    mlp = build_model("mlp", 10, hidden=(6,))
    p0 = mlp.init(0, x, dtype="float64")
    est = dg.estimator("forward", tangents="rank1", lean=strategy == "sgd-lean")
    opt = optim.sgd(optim.exponential_decay(0.1, rate=0.1), weight_decay=0.01)
    chained = optim.chain(
        optim.add_decayed_weights(0.01), optim.scale_by_learning_rate(optim.exponential_decay(0.1, rate=0.1))
    )
    fast = Trainer(mlp, optimizer=opt, estimator=est, backend=be.name)
    slow = Trainer(
        mlp, optimizer=chained, estimator=dg.estimator("forward", tangents="rank1"), backend=be.name
    )
    assert fast.update_strategy == strategy and slow.update_strategy == "optimizer"
    p, s = fast.init_state(p0)
    q, t = slow.init_state(p0)
    xb, yb = be.asarray(x), be.asarray(y)
    for step in range(3):
        key = be.fold_in(be.key(0), step)
        p, s, lp, gp = fast.step(p, s, xb, yb, key)
        q, t, lq, gq = slow.step(q, t, xb, yb, key)
        assert float(lp) == pytest.approx(float(lq), rel=1e-12)
        assert float(gp) == pytest.approx(float(gq), rel=1e-9)
    for a, b in zip(_np(be, p), _np(be, q)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_rank1_runs_give_the_same_trajectory_on_both_backends(both):
    """Portable tangents: the same seed gives the same rank-1 tangents, so the same run."""
    data = dg.data.load("digits", seed=0)
    model = nn.Sequential(nn.Conv2d(2, 3, padding=1), nn.relu, nn.Flatten(), nn.Linear(10))
    params = model.init(0, data.example_input)
    runs = [
        dg.fit(model, params, data, loss=losses.cross_entropy, optimizer=optim.sgd(0.05), backend=b.name,
               estimator=dg.estimator("forward", tangents="rank1", num_tangents=2), steps=25, callbacks=[])
        for b in both
    ]  # fmt: skip
    a, b = (np.array([r["loss"] for r in run.history]) for run in runs)
    np.testing.assert_allclose(a, b, rtol=2e-5)
    assert a[-5:].mean() < a[:5].mean()  # and it learns


def test_rank1_options_are_checked():
    with pytest.raises(ValueError, match="tangents must be one of"):
        dg.estimator("forward", tangents="rank2")
    with pytest.raises(ValueError, match="orthogonal=True.*not rank-1"):
        dg.estimator("forward", tangents="rank1", orthogonal=True, num_tangents=2)
    with pytest.raises(ValueError, match="forward: generator must be one of"):
        dg.estimator("forward", generator="mt19937")
    with pytest.raises(ValueError, match="forward-activity: generator must be one of"):
        dg.estimator("forward-activity", generator="mt19937")
