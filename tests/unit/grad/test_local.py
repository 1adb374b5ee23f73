"""Local losses: nn.Local blocks, the local objective and its estimators (LG-BP, LG-FG-A,
LG-FG-W), guessed tangents; checked against their definitions on both backends.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import duogard as dg
from duogard import losses, nn, optim
from duogard.grad import local_losses, local_objective, supervised
from duogard.tree import tree_leaves, tree_map

from helpers import to_backend, to_numpy

LOCAL = ("local-backprop", "local-forward-activity", "local-forward", "forward-guess")


def _norm():
    return nn.LayerNorm(elementwise_affine=False)


def _model(groups=2, width=8, classes=3, head_norm=False):
    opts = dict(num_classes=classes, groups=groups, head_norm=head_norm)
    block = lambda: nn.Local(_norm(), nn.Linear(width), nn.relu, **opts)  # noqa: E731
    return nn.Sequential(nn.Flatten(), block(), block(), _norm(), nn.Linear(classes))


def _setup(be, dtype="float64", batch=5, **kw):
    model = _model(**kw)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, 2, 3)).astype(dtype)
    y = rng.integers(0, 3, batch)
    params = to_backend(be, model.init(0, x))
    return model, params, (be.asarray(x), be.asarray(y))


def _flat(be, tree):
    return np.concatenate([np.ravel(a) for a in tree_leaves(to_numpy(be, tree))])


# ------------------------------------------------------------------------------------ the layer
def test_local_block_params_and_forward(be):
    model, params, (x, _) = _setup(be)
    shapes = tree_map(lambda a: tuple(a.shape), params)
    assert shapes["1"] == {
        "1": {"weight": (8, 6), "bias": (8,)},
        "head": {"weight": (2, 3, 4), "bias": (2, 3)},
    }
    assert shapes["4"] == {"weight": (3, 8), "bias": (3,)}
    # apply runs the layers only: the same numbers as the model without heads
    plain = nn.Sequential(nn.Flatten(), _norm(), nn.Linear(8), nn.relu, _norm(), nn.Linear(8), nn.relu,
                          _norm(), nn.Linear(3))  # fmt: skip
    pp = {"2": params["1"]["1"], "5": params["2"]["1"], "8": params["4"]}
    np.testing.assert_allclose(
        be.to_numpy(model.apply(params, x)), be.to_numpy(plain.apply(pp, x)), rtol=1e-12
    )
    # the heads: group g's linear map of the block's units of group g
    h = nn.Sequential(*model[1].layers).apply({"1": params["1"]["1"]}, model[0].apply({}, x))
    logits = be.to_numpy(model[1].heads(be, params["1"], h))
    hn, w, b = (
        be.to_numpy(h),
        be.to_numpy(params["1"]["head"]["weight"]),
        be.to_numpy(params["1"]["head"]["bias"]),
    )
    for g in range(2):
        np.testing.assert_allclose(logits[g], hn[:, 4 * g : 4 * g + 4] @ w[g].T + b[g], rtol=1e-12)
    # head_norm: each head reads its group normalised (zero mean, unit variance, eps 1e-5)
    normed = nn.Local(*model[1].layers, num_classes=3, groups=2, head_norm=True)
    logits = be.to_numpy(normed.heads(be, params["1"], h))
    for g in range(2):
        hg = hn[:, 4 * g : 4 * g + 4]
        hg = (hg - hg.mean(1, keepdims=True)) / np.sqrt(hg.var(1, keepdims=True) + 1e-5)
        np.testing.assert_allclose(logits[g], hg @ w[g].T + b[g], rtol=1e-9, atol=1e-12)


def test_local_block_errors():
    with pytest.raises(ValueError, match="groups must be a positive int"):
        nn.Local(nn.Linear(4), num_classes=3, groups=0)
    with pytest.raises(ValueError, match="units divisible by groups"):
        nn.Local(nn.Linear(6), num_classes=3, groups=4).init(0, (2, 5))
    est = dg.estimator("local-forward-activity")
    mlp = nn.Sequential(nn.Linear(4), nn.relu, nn.Linear(3))
    be = dg.backend("jax")
    p = to_backend(be, mlp.init(0, (2, 5)))
    batch = (be.asarray(np.zeros((2, 5), np.float32)), be.asarray(np.array([0, 1])))
    with pytest.raises(TypeError, match="no nn.Local block"):
        est(supervised(mlp), p, batch, be.key(0))
    inside = nn.Sequential(nn.Linear(4), nn.Local(nn.Linear(4), num_classes=3), nn.Linear(3))
    with pytest.raises(TypeError, match="has parameters but is outside any nn.Local block"):
        est(supervised(inside), to_backend(be, inside.init(0, (2, 5))), batch, be.key(0))
    with pytest.raises(ValueError, match="must be its input's"):
        nn.Local(nn.Linear(4), num_classes=3, residual=True).init(0, (2, 5))


def test_which_terms_each_site_reaches():
    """Every layer with params is a site; the layers after it say which losses it reaches."""
    from duogard.grad._local_plan import BlockPlan

    def kept(block, shape):
        return BlockPlan(1, block, block.init(0, shape), shape).kept

    norm = lambda **kw: nn.LayerNorm(elementwise_affine=False, **kw)  # noqa: E731
    # local-mlp's block: the Linear's groups stay apart
    assert kept(nn.Local(norm(), nn.Linear(4), nn.relu, num_classes=3, groups=2), (2, 5)) == {1: (True, True)}
    # a second Linear, a softmax or a LayerNorm over all units mixes the groups
    two = nn.Local(nn.Linear(4), nn.relu, nn.Linear(4), num_classes=3, groups=2)
    assert kept(two, (2, 5)) == {0: (False, True), 2: (True, True)}
    assert kept(nn.Local(nn.Linear(4), nn.softmax, num_classes=3, groups=2), (2, 5)) == {0: (False, True)}
    affine = nn.Local(nn.LayerNorm(), nn.Linear(4), norm(), num_classes=3, groups=2)
    assert kept(affine, (2, 5)) == {0: (False, True), 1: (False, True)}
    # a mixer's block: token mixing reaches every group of its token, the channel MLP one group
    mixer = nn.Local(norm(), nn.TokenLinear(3), norm(), nn.relu, nn.Linear(4), norm(groups=2), nn.relu,
                     nn.GroupedLinear(4, 2), norm(groups=4), num_classes=3, groups=2)  # fmt: skip
    assert kept(mixer, (2, 3, 4)) == {1: (False, True), 4: (True, True), 7: (True, True)}
    # a token mixing after a site mixes its tokens (each unit on its own); then a Linear its groups
    late = nn.Local(nn.Linear(4), nn.TokenLinear(3), num_classes=3, groups=2)
    assert kept(late, (2, 3, 4)) == {0: (True, False), 1: (True, True)}
    both = nn.Local(nn.Linear(4), nn.TokenLinear(3), nn.Linear(4), num_classes=3, groups=2)
    assert kept(both, (2, 3, 4)) == {0: (False, False), 1: (False, True), 2: (True, True)}


# -------------------------------------------------------------------- the objective and LG-BP
def test_local_backprop_is_the_gradient_of_the_local_objective(be):
    model, params, batch = _setup(be)
    lf = supervised(model)
    loss, grads = dg.estimator("local-backprop")(lf, params, batch)
    task, blocks = local_losses(lf, params, batch)
    assert float(loss) == pytest.approx(float(lf(params, batch)), rel=1e-12) == pytest.approx(float(task))
    _, exact = be.value_and_grad(local_objective(lf))(params, batch)
    np.testing.assert_allclose(_flat(be, grads), _flat(be, exact), rtol=1e-10, atol=1e-12)
    # each block learns from its own heads only: block 1's gradient is that of its own loss
    own = be.grad(lambda p, b: local_losses(lf, p, b)[1][0])(params, batch)
    for name in ("1", "head"):
        np.testing.assert_allclose(_flat(be, grads["1"][name]), _flat(be, own["1"][name]), rtol=1e-10)
    assert not np.any(_flat(be, own["2"])) and not np.any(_flat(be, own["4"]))
    # and a block's loss is the sum over its groups of each head's batch-mean loss
    h = nn.Sequential(*model[1].layers).apply({"1": params["1"]["1"]}, model[0].apply({}, batch[0]))
    logits = model[1].heads(be, params["1"], h)
    want = sum(float(losses.cross_entropy(logits[g], batch[1])) for g in range(2))
    assert float(blocks[0]) == pytest.approx(want, rel=1e-12)


def test_end_to_end_estimators_leave_the_heads_idle(be):
    model, params, batch = _setup(be)
    _, grads = dg.estimator("backprop")(supervised(model), params, batch)
    assert not np.any(_flat(be, grads["1"]["head"]))


# ------------------------------------------------------------------------------ unbiasedness
@pytest.mark.parametrize("method", ["local-forward-activity", "local-forward"])
@pytest.mark.parametrize("distribution", ["normal", "rademacher"])
def test_local_forward_gradients_are_unbiased(be, method, distribution):
    """The mean over many keys is the exact gradient of the local objective (float64, within
    five standard errors of the mean, coordinate by coordinate); heads and the output part
    are exact for every key.
    """
    model, params, batch = _setup(be, batch=3, width=4, head_norm=True)
    lf = supervised(model)
    exact = _flat(be, dg.estimator("local-backprop")(lf, params, batch)[1])
    est = dg.estimator(method, distribution=distribution)
    step = be.jit(lambda p, b, k: est(lf, p, b, k)[1])
    n = 200
    draws = np.stack([_flat(be, step(params, batch, be.fold_in(be.key(7), i))) for i in range(n)])
    mean, sem = draws.mean(0), draws.std(0) / np.sqrt(n)
    # which coordinates are the blocks' Linears (estimated); the rest is exact for every key
    noisy = np.concatenate([
        np.full(np.size(a), path[0] in ("1", "2") and path[1] != "head")
        for path, a in _leaves_with_paths(to_numpy(be, params))
    ])  # fmt: skip
    assert noisy.sum() == (4 * 6 + 4) + (4 * 4 + 4)
    np.testing.assert_allclose(
        draws[:, ~noisy], np.broadcast_to(exact[~noisy], draws[:, ~noisy].shape), rtol=1e-9, atol=1e-13
    )
    live = noisy & (sem > 0)  # (a unit dead on every example has a zero gradient, exactly)
    np.testing.assert_allclose(mean[noisy & ~live], exact[noisy & ~live], atol=1e-13)
    # (a coordinate that every key gets exactly right, up to rounding, has sem ~ 1e-18)
    err = np.abs(mean - exact)[live] - 1e-12 * np.abs(exact).max()
    assert (err / sem[live]).max() < 5.0, (err / sem[live]).max()
    # and the test has power: the end-to-end gradient is not what these estimate
    e2e = _flat(be, dg.estimator("backprop")(lf, params, batch)[1])
    assert (np.abs(mean - e2e)[live] / sem[live]).max() > 10.0


def _leaves_with_paths(tree, path=()):
    """``(path, leaf)`` in the order of ``tree_leaves`` (sorted keys)."""
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from _leaves_with_paths(tree[k], (*path, k))
    else:
        yield path, tree


# ------------------------------------------------------------------------------ guessed tangents
def test_forward_guess_projects_the_gradient_onto_the_local_gradient(be):
    model, params, batch = _setup(be)
    lf = supervised(model)
    loss, est = dg.estimator("forward-guess")(lf, params, batch, be.key(0))
    _, true = dg.estimator("backprop")(lf, params, batch)
    _, guess = dg.estimator("local-backprop")(lf, params, batch)
    assert float(loss) == pytest.approx(float(lf(params, batch)), rel=1e-12)
    for part in ("1", "2", "4"):
        g = {k: v for k, v in guess[part].items() if k != "head"}
        t = {k: v for k, v in true[part].items() if k != "head"}
        e = {k: v for k, v in est[part].items() if k != "head"}
        v, f = _flat(be, g), _flat(be, t)
        np.testing.assert_allclose(_flat(be, e), (f @ v) / (v @ v) * v, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(_flat(be, est["4"]), _flat(be, true["4"]), rtol=1e-9)  # output: exact
    for part in ("1", "2"):  # heads: their exact local gradient
        np.testing.assert_allclose(_flat(be, est[part]["head"]), _flat(be, guess[part]["head"]), rtol=1e-12)


# -------------------------------------------------------------------- same numbers, both backends
@pytest.mark.integration
@pytest.mark.parametrize("method", LOCAL)
def test_local_methods_follow_the_same_trajectory_on_both_backends(both, digits, method):
    """The first 100 steps of each method: the same losses and params on JAX and torch (float32,
    portable draws), through fit."""
    model = dg.train.build_model("local-mlp", 10, hidden=(16, 16), groups=2)
    params = model.init(0, digits.example_input)
    runs = [
        dg.fit(model, params, digits, optimizer=optim.sgd(0.05), estimator=dg.estimator(method),
               backend=b.name, steps=100, batch_size=16, callbacks=[])
        for b in both
    ]  # fmt: skip
    a, b = (np.array([r["loss"] for r in run.history]) for run in runs)
    # normal tangents are equal to float rounding (each framework's float32 log, cos and sin
    # differ in the last bit for a fifth of the numbers), and 100 noisy weight-perturbed steps
    # amplify that: 1.3e-4 in the loss and 6.4e-4 in a param by step 100 for local-forward (the
    # noisiest: weight perturbation); the others stay within 5e-5 and 5e-4
    noisy = method == "local-forward"
    np.testing.assert_allclose(a, b, rtol=3e-4 if noisy else 5e-5)
    for pa, pb in zip(tree_leaves(runs[0].params), tree_leaves(runs[1].params)):
        np.testing.assert_allclose(
            both[0].to_numpy(pa), both[1].to_numpy(pb), rtol=1e-3, atol=1.5e-3 if noisy else 5e-4
        )
    assert a[-10:].mean() < a[:10].mean()  # and it learns


# ------------------------------------------------------------------ through the CLI, no special case
@pytest.mark.integration
def test_cli_trains_checkpoints_resumes_and_compares_local_models(capsys, tmp_path):
    from duogard.cli import main

    ck, js = tmp_path / "ck", tmp_path / "s.json"
    base = ["train", "--model", "local-mlp", "--hidden", "8,8", "--groups", "2", "--batch-size", "16",
            "--grad", "local-forward-activity:distribution=rademacher", "--quiet"]  # fmt: skip
    assert main([*base, "--steps", "4", "--checkpoint", str(ck)]) == 0
    assert main([*base, "--steps", "6", "--resume", str(ck), "--json", str(js)]) == 0
    summary = json.loads(js.read_text())
    assert summary["steps"] == 6 and 0.0 <= summary["test_accuracy"] <= 1.0
    assert "local MLP 64-8-8-10 (LayerNorm, 2 local heads a layer)" in capsys.readouterr().out
    out = tmp_path / "cmp"
    methods = "backprop;local-backprop;local-forward-activity;local-forward;forward-guess"
    argv = ["compare", "--model", "local-mlp", "--hidden", "8", "--groups", "2", "--steps", "3",
            "--methods", methods, "--backends", "jax", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    runs = json.loads((out / "compare.json").read_text())["runs"]
    assert [r["method"] for r in runs] == methods.split(";")
    assert main(["train", "--model", "local-mlp", "--hidden", "8", "--groups", "3", "--steps", "1"]) == 2
    assert "--groups 3 must divide every hidden size" in capsys.readouterr().err


@pytest.mark.integration
def test_parity_runs_local_methods_in_lockstep(both, digits):
    model = dg.train.build_model("local-mlp", 10, hidden=(8,), groups=2)
    for method in ("local-forward-activity", "local-forward"):
        rep = dg.parity.compare_backends(
            model, "cross_entropy", optim.sgd(0.05), method, digits, steps=5, batch_size=16
        )
        assert rep.first_divergence is None, rep.table()


def test_local_forward_activity_with_k_tangents_is_the_mean_of_k_estimates(be):
    model, params, batch = _setup(be, batch=3, width=4, head_norm=True)
    lf = supervised(model)
    one = dg.estimator("local-forward-activity")
    three = dg.estimator("local-forward-activity", num_tangents=3, distribution="rademacher")
    drawn = three.sample(lf, params, batch, be.key(3))
    assert tuple(drawn["1"].shape) == (3, 3, 4)
    each = [
        _flat(be, one.estimate(lf, params, batch, {n: u[i] for n, u in drawn.items()})[1]) for i in range(3)
    ]
    np.testing.assert_allclose(
        _flat(be, three.estimate(lf, params, batch, drawn)[1]), sum(each) / 3, rtol=1e-12
    )
    with pytest.raises(ValueError, match="num_tangents must be a positive int"):
        dg.estimator("local-forward-activity", num_tangents=0)
