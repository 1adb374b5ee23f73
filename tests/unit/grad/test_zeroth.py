"""The rivals at equal memory: zeroth-order estimates (``estimator("spsa")``,
duogard.grad._zeroth), MeZO's lean step, and checkpointed backprop.

The theory, checked on both backends in float64: the two-point difference is exact for a
quadratic (so the mean over many queries tends to the gradient), it tends to the directional
derivative ∇f·z as ε → 0 (against the forward gradient's JVP along the same tangents), and for
normal z the estimate is unbiased for the gradient of the Gaussian-smoothed loss (a quartic,
whose smoothed gradient differs from its gradient). Then the plumbing: the perturbations are
the forward estimator's tangents, the step's data-parallel, parity and given-tangent paths
take SPSA with no special case, and it trains. MeZO's in-place step equals the ordinary one
to rounding. Last, the other rival at equal memory: backprop with activation checkpointing
(``estimator("backprop", checkpoint=True)``) equals backprop.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import duogard as dg
from duogard import nn, optim
from duogard.grad._checkpoint import segment_length
from duogard.methods import parse_method
from duogard.tree import tree_leaves, tree_map

from helpers import one_rank_env, to_backend


def _np(be, tree):
    return [np.asarray(be.to_numpy(a), dtype=np.float64) for a in tree_leaves(tree)]


def _flat(be, tree):
    return np.concatenate([a.ravel() for a in _np(be, tree)])


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(8), nn.tanh, nn.Linear(3))


@pytest.fixture(scope="module")
def small():
    """A tiny float64 classification problem: (model, params, x, y)."""
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((5, 4)), rng.integers(0, 3, 5)
    model = _mlp()
    return model, model.init(0, x, dtype="float64"), x, y


def _problem(be, small):
    model, p0, x, y = small
    return dg.grad.supervised(model), to_backend(be, p0), (be.asarray(x), be.asarray(y))


# ------------------------------------------------------------------------ options and plumbing
def test_spsa_options_and_errors():
    est = dg.estimator("spsa", num_queries=4, eps=1e-2, distribution="rademacher")
    assert (est.num_queries, est.num_tangents, est.eps, est.distribution) == (4, 4, 0.01, "rademacher")
    assert repr(est) == (
        "estimator('spsa', num_queries=4, eps=0.01, distribution='rademacher', "
        "generator='portable', lean=False)"
    )
    for bad, needle in (
        ({"num_queries": 0}, "num_queries must be a positive int, got 0"),
        ({"num_queries": 2.0}, "num_queries must be a positive int"),
        ({"eps": 0.0}, "eps must be a positive finite number, got 0.0"),
        ({"eps": float("inf")}, "eps must be a positive finite number"),
        ({"distribution": "uniform"}, "distribution must be one of"),
        ({"generator": "mine"}, "spsa: "),
    ):
        with pytest.raises(ValueError, match=needle):
            dg.estimator("spsa", **bad)
    with pytest.raises(TypeError, match="unknown option num_tangents"):
        dg.estimator("spsa", num_tangents=2)
    spec = parse_method("spsa:num_queries=4,eps=0.01,lean=true,lr=0.1")
    assert spec.estimator.num_queries == 4 and spec.estimator.eps == 0.01 and spec.estimator.lean
    assert spec.lr == 0.1 and spec.label == "spsa(num_queries=4,eps=0.01,lean=True)"


@pytest.mark.parametrize("k", [1, 3])
def test_spsa_differences_along_the_forward_tangents(be, small, k):
    """ds[i] = (f(θ + εz_i) − f(θ − εz_i)) / 2ε along the forward estimator's tangents; the loss
    is the mean of the 2K evaluations; every way of asking gives the same estimate.
    """
    loss_fn, params, batch = _problem(be, small)
    est = dg.estimator("spsa", num_queries=k, eps=1e-2, distribution="rademacher")
    key = be.fold_in(be.key(3), 7)
    value, ds, vtree = est.directional(loss_fn, params, batch, key)
    fwd = dg.estimator("forward", num_tangents=k, distribution="rademacher")
    for a, b in zip(_np(be, vtree), _np(be, fwd.tangent_tree(params, key))):
        np.testing.assert_array_equal(a, b)  # the same perturbations, drawn by the same code
    zs = [np.asarray(be.to_numpy(t)) for t in tree_leaves(vtree)]
    plus, minus = [], []
    for i in range(k):
        for sign, out in ((1, plus), (-1, minus)):
            moved = tree_map(lambda p, z, s=sign: p + s * 1e-2 * z[i], params, vtree)
            out.append(float(loss_fn(moved, batch)))
    plus, minus = np.array(plus), np.array(minus)
    np.testing.assert_allclose(np.asarray(be.to_numpy(ds)), (plus - minus) / 2e-2, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(float(value), np.mean((plus + minus) / 2), rtol=1e-14)
    # the estimate: the mean of d_i z_i, by __call__, combine, factored and given flat tangents
    want = np.concatenate([(np.tensordot(np.asarray(be.to_numpy(ds)), z, axes=1) / k).ravel() for z in zs])
    loss, g = est(loss_fn, params, batch, key)
    np.testing.assert_allclose(_flat(be, g), want, rtol=1e-12, atol=1e-14)
    assert float(loss) == float(value)
    np.testing.assert_array_equal(_flat(be, est.combine(ds, vtree)), _flat(be, g))
    given = est.sample(loss_fn, params, batch, key)
    np.testing.assert_array_equal(_flat(be, est.estimate(loss_fn, params, batch, given)[1]), _flat(be, g))
    if k == 1:
        _, d, v = est.factored(loss_fn, params, batch, key)
        np.testing.assert_allclose(_flat(be, tree_map(lambda t: d * t, v)), _flat(be, g), rtol=1e-15)
    else:
        assert est.factored(loss_fn, params, batch, key) is None


def test_spsa_is_the_same_on_both_backends(both, small):
    """The portable generator gives both frameworks the same perturbations, so the same estimate."""
    out = []
    for be in both:
        loss_fn, params, batch = _problem(be, small)
        est = dg.estimator("spsa", num_queries=2)
        loss, g = est(loss_fn, params, batch, be.fold_in(be.key(0), 1))
        out.append((float(loss), _flat(be, g)))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-13)
    # ε = 1e-3 divides the losses' rounding by 2ε: 1e-16 relative becomes ~1e-13
    np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------------------ theory
def _quadratic(be):
    """f(θ) = ½ θᵀAθ + bᵀθ over params {"a": (2,), "b": (2, 2)}, with its exact gradient."""
    rng = np.random.default_rng(2)
    m = rng.standard_normal((6, 6))
    a_mat, b_vec = m @ m.T / 6 + np.eye(6), rng.standard_normal(6)
    theta = {"a": rng.standard_normal(2), "b": rng.standard_normal((2, 2))}
    flat = np.concatenate([theta["a"], theta["b"].ravel()])
    a_be, b_be = be.asarray(a_mat), be.asarray(b_vec)

    def loss(params, batch):
        xp = be.xp
        t = xp.concat([params["a"], xp.reshape(params["b"], (-1,))])
        return 0.5 * xp.sum(t * xp.matmul(a_be, t)) + xp.sum(b_be * t)

    return loss, to_backend(be, theta), a_mat @ flat + b_vec


def _queries(be, est, loss, params, n):
    """``n`` single queries (keys ``fold_in(key(0), i)``) of a one-query estimator, one compiled
    program each call: ``(values (n,), ds (n,), z (n, P))``.
    """
    key0 = be.key(0)
    one = be.jit(lambda i: est.directional(loss, params, None, be.fold_in(key0, i)))
    out = [one(be.asarray(np.asarray(i, dtype=np.uint32))) for i in range(n)]
    values = np.array([float(v) for v, _, _ in out])
    ds = np.array([float(d[0]) for _, d, _ in out])
    z = np.stack([np.concatenate([a.ravel() for a in _np(be, t)]) for _, _, t in out])
    return values, ds, z


def test_spsa_is_exact_on_a_quadratic_and_its_mean_is_the_gradient(be):
    """For a quadratic the central difference is exact at any ε: d_k = ∇f·z_k. The mean of
    d_k z_k over many queries tends to ∇f (E[z zᵀ] = I): within 5 standard errors.
    """
    loss, params, grad = _quadratic(be)
    k = 3
    est = dg.estimator("spsa", num_queries=k, eps=0.5)
    _, ds, vtree = est.directional(loss, params, None, be.key(0))
    z = np.concatenate([np.reshape(a, (k, -1)) for a in _np(be, vtree)], axis=1)  # (K, n)
    np.testing.assert_allclose(np.asarray(be.to_numpy(ds)), z @ grad, rtol=1e-10, atol=1e-10)
    n = 1000
    _, ds, z = _queries(be, dg.estimator("spsa", eps=0.5), loss, params, n)
    np.testing.assert_allclose(ds, z @ grad, rtol=1e-10, atol=1e-10)
    samples = ds[:, None] * z
    mean, se = samples.mean(0), samples.std(0, ddof=1) / math.sqrt(n)
    assert np.all(np.abs(mean - grad) < 5 * se), (mean, grad, se)


def test_spsa_is_unbiased_for_the_smoothed_loss_not_the_loss(be):
    """f(θ) = Σ θ⁴: the Gaussian-smoothed f_ε(θ) = E f(θ + εu) has ∇f_ε = 4θ³ + 12ε²θ, and for
    normal z, E[d z] = ∇f_ε (Stein's lemma). With ε = 1 the mean of many queries lands on ∇f_ε,
    and far from ∇f = 4θ³; the reported loss estimates f_ε(θ) = Σ θ⁴ + 6ε²θ² + 3ε⁴.
    """
    theta = np.array([1.0, -0.5, 0.8])
    params = {"t": be.asarray(theta)}

    def loss(p, batch):
        return be.xp.sum(p["t"] ** 4)

    n, eps = 2000, 1.0
    values, ds, z = _queries(be, dg.estimator("spsa", eps=eps), loss, params, n)
    samples = ds[:, None] * z
    mean, se = samples.mean(0), samples.std(0, ddof=1) / math.sqrt(n)
    smoothed, exact = 4 * theta**3 + 12 * eps**2 * theta, 4 * theta**3
    assert np.all(np.abs(mean - smoothed) < 5 * se), (mean, smoothed, se)
    assert np.all(np.abs(mean - exact) > 5 * se), (mean, exact, se)
    f_eps = np.sum(theta**4 + 6 * eps**2 * theta**2 + 3 * eps**4)
    assert abs(values.mean() - f_eps) < 5 * values.std(ddof=1) / math.sqrt(n), (values.mean(), f_eps)


def test_spsa_tends_to_the_directional_derivative_as_eps_shrinks(be, small):
    """For a fixed z, d(ε) → ∇f·z (the forward gradient's JVP along the same tangent) with an
    error O(ε²): a tenth of ε gives about a hundredth of the error.
    """
    loss_fn, params, batch = _problem(be, small)
    key = be.key(11)
    _, jvp, _ = dg.estimator("forward", num_tangents=2, jvp="framework").directional(
        loss_fn, params, batch, key
    )
    jvp = np.asarray(be.to_numpy(jvp))
    errors = []
    for eps in (1e-1, 1e-2, 1e-3):
        _, ds, _ = dg.estimator("spsa", num_queries=2, eps=eps).directional(loss_fn, params, batch, key)
        errors.append(np.max(np.abs(np.asarray(be.to_numpy(ds)) - jvp)))
    assert errors[2] < 1e-5 * np.max(np.abs(jvp)), errors
    for big, small_ in zip(errors, errors[1:]):
        assert 30 < big / small_ < 300, errors


# ------------------------------------------------------------------------ the step's callers
def test_spsa_runs_data_parallel_with_k_plus_one_numbers(digits, monkeypatch):
    """The in-process one-rank pattern of test_step: the collective carries K + 1 numbers and one
    rank follows the single-process run bitwise.
    """
    be = one_rank_env(monkeypatch)  # one rank, no group joined
    model = nn.Sequential(nn.Flatten(), nn.Linear(8), nn.relu, nn.Linear(10))
    p0 = model.init(0, digits.example_input)
    est = dg.estimator("spsa", num_queries=3)
    tr = dg.Trainer(model, estimator=est, optimizer=optim.sgd(0.01), backend="torch")
    reduced = []
    dp = dg.train.DataParallel()
    real = dp.reduce
    monkeypatch.setattr(dp, "reduce", lambda loss, ds: reduced.append(tuple(ds.shape)) or real(loss, ds))
    r = dg.fit(model, p0, digits, trainer=tr, steps=3, distributed=dp, callbacks=[])
    assert dp.exchange == "directional" and dp.numbers_per_step == 4 and reduced == [(3,)] * 3
    single = dg.fit(model, p0, digits, trainer=tr, steps=3, callbacks=[])
    for a, b in zip(_np(be, r.params), _np(be, single.params)):
        np.testing.assert_array_equal(a, b)


def test_spsa_parity_shares_the_perturbations(digits):
    """A parity run draws the perturbations once and gives both backends the same ones."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(8), nn.relu, nn.Linear(10))
    rep = dg.parity.compare_backends(
        model, "cross_entropy", optim.sgd(0.01), "spsa", digits, steps=2, dtype="float64", calibrate=False
    )
    assert rep.first_divergence is None, rep.records


def test_spsa_trains_on_digits(be, digits):
    """The loss falls within 100 steps (a small MLP; 4 queries, SGD)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(16), nn.relu, nn.Linear(10))
    p0 = model.init(0, digits.example_input)
    res = dg.fit(
        model,
        p0,
        digits,
        estimator=dg.estimator("spsa", num_queries=4),
        optimizer=optim.sgd(0.1),
        backend=be.name,
        steps=100,
        batch_size=64,
        callbacks=[],
    )
    first = np.mean([h["loss"] for h in res.history[:10]])
    last = np.mean([h["loss"] for h in res.history[-10:]])
    assert last < 0.85 * first, (first, last)  # measured: 2.30 -> 1.44


# ------------------------------------------------------------------------ MeZO's lean step
def _digits_mlp(digits, dtype="float64"):
    model = nn.Sequential(nn.Flatten(), nn.Linear(8), nn.relu, nn.Linear(10))
    return model, model.init(0, digits.example_input, dtype=dtype)


def test_zo_lean_is_chosen_and_checked():
    from duogard.step import choose_update

    sgd, lean, plain = optim.sgd(0.1), dg.estimator("spsa", lean=True), dg.estimator("spsa")
    assert choose_update(sgd, lean) == "zo-lean" and choose_update(sgd, plain, "lean") == "zo-lean"
    assert choose_update(sgd, plain) == "sgd-factored"  # one query: p -= lr d z
    assert choose_update(sgd, dg.estimator("spsa", num_queries=2)) == "sgd-in-place"
    assert choose_update(optim.adam(1e-3), plain) == "optimizer"
    for est, update in ((lean, "auto"), (plain, "zo-lean")):  # lean needs plain SGD, as forward's
        with pytest.raises(ValueError, match="estimator spsa\\(lean=True\\) applies the SGD update itself"):
            choose_update(optim.adam(1e-3), est, update)
    with pytest.raises(ValueError, match="update='sgd-lean' needs a forward estimator"):
        choose_update(sgd, plain, "sgd-lean")
    with pytest.raises(ValueError, match="update='zo-lean' needs an spsa estimator"):
        choose_update(sgd, dg.estimator("forward"), "zo-lean")


@pytest.mark.parametrize("k, weight_decay", [(1, 0.0), (2, 0.1)])
def test_zo_lean_equals_the_non_lean_step(be, digits, k, weight_decay):
    """The in-place MeZO step against the same estimator through the ordinary step, float64, 5
    steps: equal to rounding (restoring θ ± εz drifts by a few units in the last place; the
    differences divide the losses' rounding by 2ε).
    """
    model, p0 = _digits_mlp(digits)
    opt = optim.sgd(optim.exponential_decay(0.05, rate=0.1), weight_decay=weight_decay)
    runs = []
    for lean in (True, False):
        est = dg.estimator("spsa", num_queries=k, lean=lean)
        tr = dg.Trainer(model, estimator=est, optimizer=opt, backend=be.name)
        runs.append(dg.fit(model, p0, digits, trainer=tr, steps=5, batch_size=16, callbacks=[]))
    assert runs[0].update_strategy == "zo-lean" and runs[1].update_strategy != "zo-lean"
    for a, b in zip(_np(be, runs[0].params), _np(be, runs[1].params)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(
        [h["loss"] for h in runs[0].history], [h["loss"] for h in runs[1].history], rtol=1e-12
    )
    np.testing.assert_allclose(
        [h["grad_norm"] for h in runs[0].history], [h["grad_norm"] for h in runs[1].history], rtol=1e-7
    )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_zo_lean_restores_the_params_to_a_few_ulp_in_place(be, digits, dtype):
    """After ``+εz, −2εz, +εz`` each entry is within 3 units in the last place of max(|p|,
    |p ± εz|) of where it was (the drift MeZO has too); torch perturbs the very tensors given.
    """
    model, p0 = _digits_mlp(digits, dtype)
    est = dg.estimator("spsa", num_queries=2, eps=1e-2, lean=True)
    tr = dg.Trainer(model, estimator=est, optimizer=optim.sgd(0.1), backend=be.name)
    lean = dg.grad.ZerothLeanStep(est, tr.loss_fn, be, tr.optimizer)
    params = to_backend(be, tree_map(np.copy, p0))  # torch wraps NumPy memory: perturb a copy
    ptrs = [a.data_ptr() for a in tree_leaves(params)] if be.name == "torch" else None
    x, y = (be.asarray(a) for a in digits.batch_at(0, 8, seed=0))
    out, value, ds, finite = lean.directional(params, dg.step.Batch(x, y), be.key(0))
    assert bool(be.to_numpy(finite))
    if ptrs is not None:
        assert [a.data_ptr() for a in tree_leaves(out)] == ptrs
    z = _np(be, est.tangent_tree(to_backend(be, p0), be.key(0)))
    ulp = np.finfo(dtype).eps
    drifted = 0
    for a, b, zi in zip(_np(be, out), tree_leaves(p0), z):
        b = b.astype(np.float64)
        scale = np.abs(b) + 1e-2 * np.abs(zi).max(0)
        assert np.all(np.abs(a - b) <= 3 * ulp * scale)
        drifted += int(np.sum(a != b))
    _, want, _ = est.directional(tr.loss_fn, to_backend(be, p0), dg.step.Batch(x, y), be.key(0))
    # the differences: the losses' rounding over 2ε
    tol = 1e-9 if dtype == "float64" else 3e-2
    np.testing.assert_allclose(np.asarray(be.to_numpy(ds)), np.asarray(be.to_numpy(want)), rtol=tol, atol=tol)
    if dtype == "float32":
        assert drifted > 0  # the drift is real: not claimed away


def test_zo_lean_refuses_a_non_finite_loss(be, digits):
    model, p0 = _digits_mlp(digits, "float32")
    tr = dg.Trainer(
        model, estimator=dg.estimator("spsa", lean=True), optimizer=optim.sgd(0.1), backend=be.name
    )
    params, state = tr.init_state(p0)
    before = _np(be, params)
    bad = digits.x_train[:8].copy()
    bad[0, 0, 0, 0] = np.nan
    new, new_state, loss, gsq = tr.step(
        params, state, be.asarray(bad), be.asarray(digits.y_train[:8]), be.key(0)
    )
    assert not math.isfinite(float(loss)) and math.isnan(float(gsq))
    for a, b in zip(_np(be, new), before):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # restored, to the drift
    assert float(optim.step_count(new_state)) == 0


def test_zo_lean_keeps_the_callers_params_and_learns_with_dropout(be, digits):
    """fit hands the lean step its own copy; a model with dropout runs with its model key."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(16), nn.relu, nn.Dropout(0.1), nn.Linear(10))
    p0 = model.init(0, digits.example_input)
    given = to_backend(be, p0)
    before = [a.copy() for a in tree_leaves(p0)]
    est = dg.estimator("spsa", num_queries=4, lean=True)
    res = dg.fit(
        model,
        given,
        digits,
        estimator=est,
        optimizer=optim.sgd(0.1),
        backend=be.name,
        steps=100,
        callbacks=[],
    )
    assert res.update_strategy == "zo-lean"
    for a, b, c in zip(tree_leaves(p0), before, tree_leaves(given)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(np.asarray(be.to_numpy(c)), b)
    first = np.mean([h["loss"] for h in res.history[:10]])
    last = np.mean([h["loss"] for h in res.history[-10:]])
    assert last < 0.85 * first, (first, last)  # measured: 2.30 -> 1.65


def test_zo_lean_cannot_run_data_parallel(digits, monkeypatch):
    one_rank_env(monkeypatch)  # one rank, no group joined
    model, p0 = _digits_mlp(digits, "float32")
    est = dg.estimator("spsa", lean=True)
    with pytest.raises(ValueError, match=r"spsa\(lean=True\) updates the params inside its own step"):
        dg.fit(
            model,
            p0,
            digits,
            estimator=est,
            optimizer=optim.sgd(0.01),
            backend="torch",
            steps=1,
            distributed=True,
            callbacks=[],
        )


# ------------------------------------------------------------------------ checkpointed backprop
def _dropout_mlp():
    return nn.Sequential(nn.Linear(8), nn.tanh, nn.Dropout(0.3), nn.Linear(8), nn.relu, nn.Linear(3))


@pytest.mark.parametrize("every", [1, 2, 4, None])
def test_checkpointed_backprop_equals_backprop(be, every):
    """Same loss and gradient to rounding, dropout in training mode included (the recomputed
    segments see the same keys, so the same masks); and the segments really are checkpointed.
    """
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((6, 5)), rng.integers(0, 3, 6)
    calls = []
    # a layer that saves its input for the backward pass (torch recomputes only what is unpacked)
    counted = nn.Lambda(lambda a: calls.append(1) or a * a, name="square")
    model = nn.Sequential(*_dropout_mlp().layers[:2], counted, *_dropout_mlp().layers[2:])
    params = to_backend(be, model.init(0, x, dtype="float64"))
    loss_fn = dg.grad.supervised(model)
    batch = (be.asarray(x), be.asarray(y), be.key(3))
    want_loss, want = dg.estimator("backprop")(loss_fn, params, batch)
    assert len(calls) == 1
    est = dg.estimator("backprop", checkpoint=True, checkpoint_every=every)
    loss, grads = est(loss_fn, params, batch)
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-15)
    for a, b in zip(_np(be, grads), _np(be, want)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    if be.name == "torch":  # the segment holding the counter ran again in the backward pass
        assert len(calls) == 3
    else:
        import jax

        every = every or segment_length(len(model.layers))  # None: ⌈√7⌉ = 3
        jaxpr = str(jax.make_jaxpr(lambda p: est(loss_fn, p, batch))(params))
        assert jaxpr.count("prevent_cse=") == -(-len(model.layers) // every), jaxpr  # one remat each


def test_a_compiled_checkpointed_step_recomputes_on_jax():
    """XLA:CPU used to expand jax.checkpoint's optimisation barriers early and merge the
    recomputation back into the forward pass (CSE): the compiled program then held every
    activation. duogard's jit keeps them: the compiled gradient has more matrix products."""
    pytest.importorskip("jax")
    be = dg.backend("jax")
    model = nn.Sequential(
        nn.Linear(16), nn.relu, nn.Linear(16), nn.relu, nn.Linear(16), nn.relu, nn.Linear(3)
    )
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((8, 5)), rng.integers(0, 3, 8)
    params = to_backend(be, model.init(0, x))
    batch, loss_fn = (be.asarray(x), be.asarray(y)), dg.grad.supervised(model)
    dots = []
    for est in (dg.estimator("backprop"), dg.estimator("backprop", checkpoint=True, checkpoint_every=2)):
        program = be.jit(lambda p, est=est: est(loss_fn, p, batch)[1])
        dots.append(program.lower(params).compile().as_text().count(" dot("))
    assert dots[1] > dots[0], dots


def test_checkpointed_backprop_trains_as_backprop(be, digits):
    """Through the Trainer's (jitted on JAX) step: the same params after 4 steps, float64."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(8), nn.relu, nn.Linear(10))
    p0 = model.init(0, digits.example_input, dtype="float64")
    runs = [
        dg.fit(
            model, p0, digits, estimator=est, optimizer=optim.sgd(0.1), backend=be.name, steps=4, callbacks=[]
        )
        for est in (dg.estimator("backprop"), dg.estimator("backprop", checkpoint=True, checkpoint_every=2))
    ]
    for a, b in zip(_np(be, runs[0].params), _np(be, runs[1].params)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_checkpoint_options_and_losses_it_cannot_segment(be):
    with pytest.raises(TypeError, match="checkpoint must be True or False, got int 1"):
        dg.estimator("backprop", checkpoint=1)  # typed, as every estimator's bool option
    for bad, needle in (
        ({"checkpoint": True, "checkpoint_every": 0}, "checkpoint_every must be a positive int, got 0"),
        ({"checkpoint_every": 2}, "checkpoint_every=2 needs checkpoint=True"),
    ):
        with pytest.raises(ValueError, match=needle):
            dg.estimator("backprop", **bad)
    assert repr(dg.estimator("backprop")) == "estimator('backprop')"
    assert [segment_length(n) for n in (1, 2, 4, 5, 9, 10, 18)] == [1, 2, 2, 3, 3, 4, 5]  # ⌈√L⌉
    spec = parse_method("backprop:checkpoint=true,checkpoint_every=2")
    assert spec.estimator.checkpoint and spec.estimator.checkpoint_every == 2
    params = {"w": be.asarray(np.ones(3))}
    with pytest.raises(ValueError, match=r"checkpoint=True segments the loss layer by layer.*supervised"):
        dg.estimator("backprop", checkpoint=True)(lambda p, b: be.xp.sum(p["w"] ** 2), params, None)


def test_torch_checkpoint_under_torch_func_is_a_clear_error():
    torch = pytest.importorskip("torch")
    f = dg.backend("torch").checkpoint(lambda w: torch.tanh(w).sum())
    with pytest.raises(RuntimeError, match="cannot run under a torch.func transform"):
        torch.func.grad(f)(torch.ones(3, dtype=torch.float64))


def test_spsa_lean_is_a_typed_bool():
    with pytest.raises(TypeError, match="spsa: lean must be True or False, got str 'false'"):
        dg.estimator("spsa", lean="false")  # a non-empty string is truthy: refused, not read as True
