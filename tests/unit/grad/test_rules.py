"""duogard's hand-written forward rules agree with the frameworks' own jvp (and are used on torch)."""

from __future__ import annotations

import numpy as np
import pytest

import duogard as dg
from duogard import losses, nn
from duogard.grad import FlatView
from duogard.grad._rules import plan

MODELS = {
    "mlp": (
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(12), nn.relu, nn.Linear(8), nn.tanh, nn.Linear(5)),
        (6, 1, 4, 4),
    ),
    "cnn": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 3, padding="same"),
            nn.relu,
            nn.MaxPool2d(2),
            nn.Conv2d(4, 3, padding=1),
            nn.sigmoid,
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(5),
        ),
        (4, 2, 8, 8),
    ),
    "mix": (
        lambda: nn.Sequential(
            nn.Conv2d(4, 3, stride=2, groups=1),
            nn.leaky_relu,
            nn.Flatten(),
            nn.Dropout(0.3),
            nn.Linear(7),
            nn.gelu,
            nn.Linear(5),
        ),
        (3, 2, 9, 9),
    ),
    "grouped": (
        lambda: nn.Sequential(nn.Conv2d(4, 3, groups=2, bias=False), nn.relu, nn.Flatten(), nn.Linear(5)),
        (3, 2, 6, 6),
    ),
}


def _setup(be, name, loss, dtype):
    make, shape = MODELS[name]
    model = make()
    rng = np.random.default_rng(1)
    x = rng.normal(size=shape).astype(dtype)
    y = (
        rng.integers(0, 5, size=shape[0])
        if loss is losses.cross_entropy
        else rng.normal(size=(shape[0], 5)).astype(dtype)
    )
    params = dg.tree.tree_map(be.asarray, model.init(0, x))
    return dg.supervised(model, loss), params, (be.asarray(x), be.asarray(y))


def _jitted(be, est, obj):
    """est.estimate compiled as one function (JAX; torch runs eagerly): fast and as in training."""
    return be.jit(lambda p, b, t: est.estimate(obj, p, b, t))


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("loss", [losses.cross_entropy, losses.mse], ids=["ce", "mse"])
@pytest.mark.parametrize("k", [1, 3])
def test_rules_equal_framework_jvp(be, name, loss, k):
    obj, params, batch = _setup(be, name, loss, "float64")
    assert plan(obj, batch) is not None
    framework = dg.estimator("forward", num_tangents=k, jvp="framework")
    rules = dg.estimator("forward", num_tangents=k, jvp="rules")
    tangents = framework.sample(obj, params, batch, be.key(3))
    l1, g1 = _jitted(be, framework, obj)(params, batch, tangents)
    l2, g2 = _jitted(be, rules, obj)(params, batch, tangents)
    flat = FlatView.of(params)
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-12)
    np.testing.assert_allclose(
        be.to_numpy(flat.flatten(be, g2)), be.to_numpy(flat.flatten(be, g1)), rtol=1e-9, atol=1e-12
    )


def test_rules_projection_and_float32(be):
    obj, params, batch = _setup(be, "cnn", losses.cross_entropy, "float32")
    for kw in ({"num_tangents": 4, "projection": True}, {"num_tangents": 2, "distribution": "rademacher"}):
        a = dg.estimator("forward", jvp="framework", **kw)
        b = dg.estimator("forward", jvp="rules", **kw)
        t = a.sample(obj, params, batch, be.key(0))
        flat = FlatView.of(params)
        ga = be.to_numpy(flat.flatten(be, _jitted(be, a, obj)(params, batch, t)[1]))
        gb = be.to_numpy(flat.flatten(be, _jitted(be, b, obj)(params, batch, t)[1]))
        np.testing.assert_allclose(gb, ga, rtol=1e-4, atol=1e-5 * np.abs(ga).max())


def test_rules_not_planned_for_other_losses(be):
    model = nn.Sequential(nn.Linear(4), nn.LayerNorm(), nn.Linear(3))
    x = be.asarray(np.ones((2, 5), np.float64))
    y = be.asarray(np.array([0, 1]))
    params = dg.tree.tree_map(be.asarray, model.init(0, x))
    obj = dg.supervised(model)
    assert plan(obj, (x, y)) is None  # LayerNorm has params and no rule here
    assert plan(lambda p, b: 0.0, (x, y)) is None  # arbitrary user code
    assert plan(dg.supervised(nn.Sequential(nn.Linear(3)), losses.l1), (x, y)) is None
    with pytest.raises(ValueError, match="jvp='rules' covers"):
        dg.estimator("forward", jvp="rules")(obj, params, (x, y), be.key(0))
    # auto falls back to the framework's jvp and still gives the right answer
    auto = dg.estimator("forward", num_tangents=2)
    fw = dg.estimator("forward", num_tangents=2, jvp="framework")
    t = auto.sample(obj, params, (x, y), be.key(1))
    flat = FlatView.of(params)
    np.testing.assert_allclose(
        be.to_numpy(flat.flatten(be, auto.estimate(obj, params, (x, y), t)[1])),
        be.to_numpy(flat.flatten(be, fw.estimate(obj, params, (x, y), t)[1])),
        rtol=1e-12,
    )


def test_bad_jvp_option():
    with pytest.raises(ValueError, match="jvp must be one of"):
        dg.estimator("forward", jvp="fast")


def test_auto_uses_rules_on_torch_only(both):
    jx, th = both
    assert th.fast_jvp_rules is True and jx.fast_jvp_rules is False


@pytest.fixture
def rules_calls(monkeypatch):
    """A list that gets one entry each time the forward estimator runs the hand-written rules."""
    import duogard.grad._forward as fwd

    calls = []
    real = fwd.sequential_loss_jvp
    monkeypatch.setattr(fwd, "sequential_loss_jvp", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_auto_path_calls_the_rules_where_the_backend_prefers_them(be, rules_calls):
    calls = rules_calls
    obj, params, batch = _setup(be, "mlp", losses.cross_entropy, "float64")
    dg.estimator("forward")(obj, params, batch, be.key(0))
    assert len(calls) == (1 if be.fast_jvp_rules else 0)
    # K > 1: the rules on every backend (one stacked product for the K tangents)
    dg.estimator("forward", num_tangents=3)(obj, params, batch, be.key(0))
    assert len(calls) == (2 if be.fast_jvp_rules else 1)


def test_k_tangents_in_one_product_match_k_separate_jvps(be):
    """The stacked (B, K, ...) rules give, for each of the K tangents, the framework's own jvp."""
    obj, params, batch = _setup(be, "cnn", losses.cross_entropy, "float64")
    est = dg.estimator("forward", num_tangents=3, jvp="rules")
    vtree = est.tangent_tree(params, be.key(5))
    _, ds = est._directional(obj, params, batch, vtree)
    for i in range(3):
        vi = dg.tree.tree_map(lambda t, i=i: t[i], vtree)
        _, di = be.jvp(lambda p: obj(p, batch), (params,), (vi,))
        np.testing.assert_allclose(float(ds[i]), float(di), rtol=1e-10, atol=1e-12)


def test_auto_path_keeps_the_framework_jvp_for_convolutions(be, rules_calls):
    calls = rules_calls
    obj, params, batch = _setup(be, "cnn", losses.cross_entropy, "float64")
    dg.estimator("forward")(obj, params, batch, be.key(0))
    assert calls == []  # torch's own forward AD is as fast for convolutions (benchmarks/RESULTS.md)
    dg.estimator("forward", jvp="rules")(obj, params, batch, be.key(0))
    assert calls == [1]


def test_the_objective_says_whether_the_forward_rules_apply(be):
    """The rules path follows the objective's own declaration (``loss_rule``), which a user can
    turn off; the numbers are the framework jvp's either way."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(5), nn.relu, nn.Linear(3))
    x = be.asarray(np.random.default_rng(0).normal(size=(4, 2, 3)))
    y = be.asarray(np.array([0, 1, 2, 1]))
    params = dg.tree.tree_map(be.asarray, model.init(0, np.zeros((4, 2, 3))))
    on, off = (
        dg.grad.supervised(model, "cross_entropy"),
        dg.grad.supervised(model, "cross_entropy", forward_rules=False),
    )
    assert on.loss_rule == "cross_entropy" and off.loss_rule is None
    assert dg.grad.supervised(model, "mse").loss_rule == "mse"
    assert dg.grad.supervised(model, lambda out, t: dg.losses.mse(out, t)).loss_rule is None
    assert plan(on, (x, y)) is not None and plan(off, (x, y)) is None
    est = dg.estimator("forward", num_tangents=3)
    a = est(on, params, (x, y), be.key(1))
    b = est(off, params, (x, y), be.key(1))
    np.testing.assert_allclose(float(a[0]), float(b[0]), rtol=1e-12)
    for u, v in zip(dg.tree.tree_leaves(a[1]), dg.tree.tree_leaves(b[1])):
        np.testing.assert_allclose(be.to_numpy(u), be.to_numpy(v), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="jvp='rules' covers"):
        dg.estimator("forward", jvp="rules")(off, params, (x, y), be.key(1))
    with pytest.raises(TypeError, match="forward_rules must be True or False"):
        dg.grad.supervised(model, "mse", forward_rules="no")
