"""The lean forward-gradient SGD step (``estimator("forward", lean=True)``, duogard.grad._lean).

The lean step never builds a whole tangent: each leaf's tangent comes from its own key, is
drawn for the JVP and drawn again for an in-place update. Its numbers must be those of the
same estimator used the ordinary way followed by ``optim.sgd``: that is the reference here
(itself checked against finite differences and reverse mode in test_estimators). Its memory
is measured in ``duogard bench`` (section 3), not here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import duogard as dg
from duogard import losses, nn, optim
from duogard.train import Evaluate, NonFiniteError, Trainer, build_model, fit

from helpers import to_backend


@pytest.fixture(scope="module")
def mlp():
    return build_model("mlp", 10, hidden=(12, 8))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return rng.standard_normal((6, 1, 8, 8)), rng.integers(0, 10, 6)


def _np(be, tree):
    return [np.asarray(be.to_numpy(a)) for a in dg.tree.tree_leaves(tree)]


def _reference_step(tr, est, opt, params, state, x, y, key):
    """The ordinary way: the estimator's (loss, grads), then sgd's update."""
    be = tr.be
    loss, grads = est(tr.loss_fn, params, (x, y), key)
    updates, state = opt.update(grads, state, params)
    new = optim.apply_updates(params, updates)
    gsq = sum(float(np.sum(g.astype(np.float64) ** 2)) for g in _np(be, grads))
    return _np(be, new), state, float(loss), gsq


@pytest.mark.parametrize(
    "distribution, k, weight_decay",
    [
        ("normal", 1, 0.0),
        ("rademacher", 1, 0.1),
        ("normal", 3, 0.1),
        ("rademacher", 3, 0.0),
    ],
)
def test_lean_step_equals_the_estimate_then_sgd(be, mlp, batch, distribution, k, weight_decay):
    est = dg.estimator("forward", lean=True, num_tangents=k, distribution=distribution)
    opt = optim.sgd(optim.exponential_decay(0.1, rate=0.3), weight_decay=weight_decay)
    tr = Trainer(mlp, optimizer=opt, estimator=est, backend=be.name)
    assert tr.update_strategy == "sgd-lean"
    p0 = mlp.init(0, batch[0], dtype="float64")
    x, y = be.asarray(batch[0]), be.asarray(batch[1])
    params, state = tr.init_state(p0)
    ref_params, ref_state = tr.init_state(p0)
    for step in range(2):  # the schedule moves: the rate must follow the optimizer's state
        key = be.fold_in(be.key(5), step)
        want, ref_state, want_loss, want_gsq = _reference_step(tr, est, opt, ref_params, ref_state, x, y, key)
        params, state, loss, gsq = tr.step(params, state, x, y, key)
        np.testing.assert_allclose(float(loss), want_loss, rtol=1e-12)
        np.testing.assert_allclose(float(gsq), want_gsq, rtol=1e-9)
        for got, exp in zip(_np(be, params), want):
            np.testing.assert_allclose(got, exp, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(
            float(optim.current_learning_rate(state)),
            float(optim.current_learning_rate(ref_state)),
            rtol=1e-12,
        )
        ref_params = to_backend(be, dg.tree.tree_unflatten(dg.tree.tree_structure(p0), want))


def test_lean_sample_draws_each_leaf_from_its_own_key(be, mlp, batch):
    est = dg.estimator("forward", lean=True, num_tangents=2, distribution="rademacher")
    params = to_backend(be, mlp.init(0, batch[0], dtype="float32"))
    key = be.key(3)
    v = np.asarray(be.to_numpy(est.sample(None, params, batch, key)))
    leaves = dg.tree.tree_leaves(params)
    assert v.shape == (2, sum(int(np.prod(a.shape)) for a in leaves))
    start = 0
    for i, a in enumerate(leaves):
        size = int(np.prod(a.shape))
        own = be.to_numpy(be.rademacher(be.fold_in(key, i), (2, *a.shape), dtype=a.dtype))
        np.testing.assert_array_equal(v[:, start : start + size], np.reshape(own, (2, size)))
        start += size
    # and the estimate built from it is unbiased in the usual sense: g = (∇f·v) v per tangent
    loss_fn = dg.grad.supervised(mlp, losses.cross_entropy)
    xb, yb = be.asarray(batch[0].astype(np.float32)), be.asarray(batch[1])
    _, g = est(loss_fn, params, (xb, yb), key)
    _, true = dg.estimator("backprop")(loss_fn, params, (xb, yb))
    gt = np.concatenate([np.ravel(be.to_numpy(t)) for t in dg.tree.tree_leaves(true)])
    ge = np.concatenate([np.ravel(be.to_numpy(t)) for t in dg.tree.tree_leaves(g)])
    np.testing.assert_allclose(ge, (v @ gt) @ v / 2, rtol=1e-4, atol=1e-6)


def test_fit_lean_keeps_the_callers_params_and_learns(be, digits):
    model = build_model("mlp", 10, hidden=(32,))
    p0 = model.init(0, digits.example_input)
    before = [a.copy() for a in dg.tree.tree_leaves(p0)]
    given = to_backend(
        be, p0
    )  # backend arrays too: a torch in-place update or a JAX donation must not reach them
    est = dg.estimator("forward", lean=True, num_tangents=8, distribution="rademacher")
    res = fit(
        model,
        given,
        digits,
        estimator=est,
        optimizer=optim.sgd(0.03),
        backend=be.name,
        steps=300,
        batch_size=64,
        callbacks=[Evaluate()],
    )
    for a, b, c in zip(dg.tree.tree_leaves(p0), before, dg.tree.tree_leaves(given)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(np.asarray(be.to_numpy(c)), b)
    first = np.mean([h["loss"] for h in res.history[:20]])
    assert res.final_loss < 0.75 * first, (res.final_loss, first)
    assert res.test_accuracy > 0.5, res.test_accuracy  # chance: 0.1
    assert all(math.isfinite(h["grad_norm"]) and h["grad_norm"] > 0 for h in res.history)


def test_fit_lean_equals_fit_with_the_same_estimator_unfused(be, digits):
    """The Trainer's lean step against the same estimator through a plain step."""
    model = build_model("mlp", 10, hidden=(16,))
    p0 = model.init(0, digits.example_input, dtype="float64")
    est = dg.estimator("forward", lean=True, distribution="normal")
    lean = fit(
        model,
        p0,
        digits,
        estimator=est,
        optimizer=optim.sgd(0.01),
        backend=be.name,
        steps=15,
        batch_size=16,
        callbacks=[],
    )
    tr = Trainer(model, optimizer=optim.sgd(0.01), estimator="backprop", backend=be.name)
    params, state = tr.init_state(p0)
    key0 = be.key(0)
    for step in range(15):
        xb, yb = (be.asarray(a) for a in digits.batch_at(step, 16, seed=0))
        _, g = est(tr.loss_fn, params, (xb, yb), be.fold_in(key0, step))
        u, state = tr.optimizer.update(g, state, params)
        params = optim.apply_updates(params, u)
    for a, b in zip(_np(be, lean.params), _np(be, params)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_lean_nan_leaves_params_unchanged(be, digits):
    model = build_model("mlp", 10, hidden=(16,))
    p0 = model.init(0, digits.example_input)
    x = digits.x_train.copy()
    est = dg.estimator("forward", lean=True)
    tr = Trainer(model, optimizer=optim.sgd(0.05), estimator=est, backend=be.name)
    params, state = tr.init_state(p0)
    bad = x[:8].copy()
    bad[0, 0, 0, 0] = np.nan
    before = _np(be, params)
    new, new_state, loss, gsq = tr.step(
        params, state, be.asarray(bad), be.asarray(digits.y_train[:8]), be.key(0)
    )
    assert not math.isfinite(float(loss)) and math.isnan(float(gsq))
    for a, b in zip(_np(be, new), before):
        np.testing.assert_array_equal(a, b)
    assert float(optim.step_count(new_state)) == 0
    with pytest.raises(NonFiniteError, match="non-finite loss"):
        fit(
            model,
            p0,
            digits,
            estimator=est,
            optimizer=optim.sgd(1e30),
            backend=be.name,
            steps=30,
            callbacks=[],
        )


@pytest.mark.parametrize(
    "opt, needle",
    [
        (optim.sgd(0.1, momentum=0.9), "without momentum"),
        (optim.adam(1e-3), "without momentum"),
    ],
)
def test_lean_needs_plain_sgd(be, mlp, opt, needle):
    with pytest.raises(ValueError, match=needle) as info:
        Trainer(mlp, optimizer=opt, estimator=dg.estimator("forward", lean=True), backend=be.name)
    assert "optimizer" in str(info.value) and "lean=True" in str(info.value)


def test_lean_needs_a_model_the_rules_cover(be):
    model = nn.Sequential(nn.Flatten(), nn.Linear(8), nn.LayerNorm(), nn.Linear(3))
    with pytest.raises(ValueError, match="lean=True.*Sequential"):
        Trainer(
            model, optimizer=optim.sgd(0.1), estimator=dg.estimator("forward", lean=True), backend=be.name
        )


@pytest.mark.parametrize("opts", [{"orthogonal": True}, {"projection": True}])
def test_lean_does_not_combine_with_orthogonal_or_projection(opts):
    with pytest.raises(ValueError, match="lean=True"):
        dg.estimator("forward", lean=True, **opts)


def test_lean_conv_model_matches_the_unfused_step(be):
    model = build_model("cnn", 10, channels=3, hidden=(8,))
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((4, 1, 8, 8)), rng.integers(0, 10, 4)
    est = dg.estimator("forward", lean=True, num_tangents=2)
    opt = optim.sgd(0.05)
    tr = Trainer(model, optimizer=opt, estimator=est, backend=be.name)
    p0 = model.init(0, x, dtype="float64")
    params, state = tr.init_state(p0)
    ref, ref_state = tr.init_state(p0)
    xb, yb, key = be.asarray(x), be.asarray(y), be.key(9)
    want, _, want_loss, _ = _reference_step(tr, est, opt, ref, ref_state, xb, yb, key)
    params, state, loss, _ = tr.step(params, state, xb, yb, key)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-12)
    for got, exp in zip(_np(be, params), want):
        np.testing.assert_allclose(got, exp, rtol=1e-9, atol=1e-12)


def test_plain_sgd_is_the_type_of_a_momentum_free_sgd():
    assert isinstance(optim.sgd(0.1), optim.PlainSGD) and optim.sgd(0.1).weight_decay == 0.0
    assert optim.sgd(0.1, weight_decay=0.2).weight_decay == 0.2
    init, update = optim.sgd(0.1)  # still a GradientTransformation pair
    assert callable(init) and callable(update)
    for opt in (optim.sgd(0.1, momentum=0.5), optim.adam(), optim.chain(optim.clip(1.0), optim.sgd(0.1))):
        assert not isinstance(opt, optim.PlainSGD)


def test_plain_sgd_advance_matches_update(be):
    opt = optim.sgd(optim.step_decay(0.5, step_size=2, gamma=0.1), weight_decay=0.01)
    params = to_backend(be, {"w": np.ones(3)})
    state = opt.init(params)
    spec = opt
    for _ in range(5):
        expected = float(optim.current_learning_rate(state))
        lr, advanced = spec.advance(state)
        _, state = opt.update(params, state, params)
        assert float(lr) == expected
        for a, b in zip(dg.tree.tree_leaves(advanced), dg.tree.tree_leaves(state)):
            np.testing.assert_array_equal(np.asarray(be.to_numpy(a)), np.asarray(be.to_numpy(b)))


def test_add_scaled_(be):
    t = be.asarray(np.array([1.0, 2.0, 3.0]))
    v = be.asarray(np.array([1.0, -1.0, 0.5]))
    out = be.add_scaled_(t, v, be.asarray(np.array(-2.0)))
    np.testing.assert_array_equal(np.asarray(be.to_numpy(out)), [-1.0, 4.0, 2.0])
    out2 = be.add_scaled_(out, v, 0.5)
    np.testing.assert_array_equal(np.asarray(be.to_numpy(out2)), [-0.5, 3.5, 2.25])
    assert out2.dtype == t.dtype
