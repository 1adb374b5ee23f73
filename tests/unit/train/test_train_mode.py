"""Training steps run a model in training mode (dropout with its own key, state updated by the
step), evaluation in eval mode, on both backends alike (duogard's own layers; ported torch
modules are in test_aten_port.py).
"""

from __future__ import annotations

import numpy as np
import pytest

import duogard as dg
from duogard import losses, nn, optim
from duogard.nn import Module
from duogard.step import MODEL_KEY
from duogard.train import Trainer


def _dropout_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(16), nn.relu, nn.Dropout(0.5), nn.Linear(10))


def test_has_train_mode_follows_the_layers():
    assert _dropout_model().has_train_mode
    assert not nn.Sequential(nn.Linear(3), nn.Dropout(0.0)).has_train_mode
    assert not nn.Sequential(nn.Linear(3), nn.relu).has_train_mode


@pytest.mark.parametrize("estimator", ["backprop", "forward"])
def test_fit_trains_dropout_in_training_mode_with_the_steps_model_key(be, digits, estimator):
    model = _dropout_model()
    params = model.init(0, digits.example_input)
    res = dg.fit(model, params, digits, estimator=estimator, backend=be, steps=1, callbacks=[], seed=3)
    x, y = (be.asarray(a) for a in digits.batch_at(0, 64, seed=3))
    p = dg.tree.tree_map(be.asarray, params)
    model_key = be.fold_in(be.fold_in(be.key(3), 0), MODEL_KEY)
    train_loss = float(losses.cross_entropy(model.apply(p, x, train=True, key=model_key), y))
    eval_loss = float(losses.cross_entropy(model.apply(p, x), y))
    np.testing.assert_allclose(res.history[0]["loss"], train_loss, rtol=1e-6)
    assert abs(train_loss - eval_loss) > 1e-3  # dropout was on: not the eval-mode loss
    # evaluation runs in eval mode: deterministic, equal to the plain apply
    ev = Trainer(model, backend=be).evaluate(p, digits.x_test[:50], digits.y_test[:50])
    logits = model.apply(p, be.asarray(digits.x_test[:50]))
    np.testing.assert_allclose(
        ev["loss"], float(losses.cross_entropy(logits, be.asarray(digits.y_test[:50]))), rtol=1e-5
    )


def test_dropout_trajectories_agree_across_backends(both, digits):
    """The model key and its masks are duogard's portable ones: the same run on JAX and torch."""
    model = _dropout_model()
    params = model.init(0, digits.example_input)
    est = dg.estimator("forward", num_tangents=2, distribution="rademacher")
    runs = [
        dg.fit(
            model, params, digits, estimator=est, backend=b, steps=8, callbacks=[], optimizer=optim.sgd(0.05)
        )
        for b in both
    ]
    a, b = ([r["loss"] for r in run.history] for run in runs)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    for name in ("1", "4"):
        np.testing.assert_allclose(
            both[0].to_numpy(runs[0].params[name]["weight"]),
            both[1].to_numpy(runs[1].params[name]["weight"]),
            rtol=1e-5,
            atol=1e-6,
        )


class RunningCenter(Module):
    """A user's stateful layer: subtract the batch mean in training, the running mean in eval;
    the running mean follows ``m <- (1 - a) m + a * batch_mean`` (batch norm's scheme).
    """

    has_params = False
    has_train_mode = True
    has_state = True
    momentum = 0.25

    def initial_state(self):
        return {"running_mean": np.zeros(64, np.float32)}

    def forward(self, be, params, x, *, key=None, train=False):
        x = be.xp.reshape(x, (x.shape[0], -1))
        return x - (be.xp.mean(x, axis=0) if train else params["running_mean"])

    def update_state(self, params, x, *, key=None):
        xp = dg.backend_of(x).xp
        batch_mean = xp.mean(xp.reshape(x, (x.shape[0], -1)), axis=0)
        return {"running_mean": (1 - self.momentum) * params["running_mean"] + self.momentum * batch_mean}


class CenteredLogreg(Module):
    """RunningCenter then a Linear layer, as one flat-params model (like a ported torch module)."""

    has_train_mode = True
    has_state = True

    def __init__(self):
        self.center, self.linear = RunningCenter(), nn.Linear(10)

    def initial_state(self):
        return self.center.initial_state()

    def init_params(self, rng, input_shape, dtype):
        p, shape = self.linear.init_params(rng, (input_shape[0], 64), dtype)
        return {"weight": p["weight"], "bias": p["bias"]}, shape

    def forward(self, be, params, x, *, key=None, train=False):
        z = self.center.forward(be, params, x, train=train)
        return self.linear.forward(be, {"weight": params["weight"], "bias": params["bias"]}, z)

    def update_state(self, params, x, *, key=None):
        return self.center.update_state(params, x, key=key)


@pytest.mark.parametrize("estimator", ["backprop", "forward"])
def test_state_is_updated_by_each_step_and_seen_by_no_estimator(be, digits, estimator):
    model = CenteredLogreg()
    params = model.init(0, digits.example_input)
    steps = 4
    res = dg.fit(model, params, digits, estimator=estimator, backend=be, steps=steps, callbacks=[])
    # the running mean, recomputed in NumPy over the run's batches
    m = np.zeros(64)
    for s in range(steps):
        xb, _ = digits.batch_at(s, 64, seed=0)
        m = 0.75 * m + 0.25 * xb.reshape(64, -1).mean(axis=0)
    np.testing.assert_allclose(be.to_numpy(res.params["running_mean"]), m, rtol=1e-5, atol=1e-6)
    trainer = Trainer(model, estimator=estimator, backend=be)
    assert trainer.state_names == ("running_mean",)
    p0, opt_state = trainer.init_state(params)  # the initial state is added where missing
    assert set(p0) == {"weight", "bias", "running_mean"}
    # evaluation uses the state (eval mode: the running mean, not the batch mean)
    x_test = digits.x_test[:40]
    ev = trainer.evaluate(res.params, x_test, digits.y_test[:40])
    z = x_test.reshape(40, -1) - m
    logits = z @ be.to_numpy(res.params["weight"]).T + be.to_numpy(res.params["bias"])
    ref = losses.cross_entropy(be.asarray(logits.astype(np.float32)), be.asarray(digits.y_test[:40]))
    np.testing.assert_allclose(ev["loss"], float(ref), rtol=1e-4)


def test_a_refused_step_keeps_the_state(be, digits):
    model = CenteredLogreg()
    trainer = Trainer(model, backend=be, optimizer=optim.sgd(0.1))
    params, opt_state = trainer.init_state(model.init(0, digits.example_input))
    x, y = digits.batch_at(0, 64)
    x = x.copy()
    x[0, 0, 0, 0] = np.nan  # a non-finite loss: the step is refused
    before = be.to_numpy(params["running_mean"]).copy()
    new, _, value, _ = trainer.step(params, opt_state, be.asarray(x), be.asarray(y), be.key(0))
    assert not np.isfinite(float(value))
    np.testing.assert_array_equal(be.to_numpy(new["running_mean"]), before)


def test_lean_refuses_a_model_with_a_training_mode(be):
    with pytest.raises(ValueError, match="training mode.*lean=False"):
        Trainer(
            _dropout_model(),
            estimator=dg.estimator("forward", lean=True),
            backend=be,
            optimizer=optim.sgd(0.1),
        )


def test_parity_runs_dropout_in_training_mode_on_both_sides(both, digits):
    model = _dropout_model()
    opt = optim.sgd(0.05)
    report = dg.parity.compare_backends(
        model, "cross_entropy", opt, "backprop", digits, steps=3, dtype="float32"
    )
    assert report.first_divergence is None
    # training mode: step 1's loss is the dropout loss with the step's model key, not eval mode's
    be = both[0]
    params = dg.tree.tree_map(be.asarray, model.init(0, digits.example_input))
    x, y = (be.asarray(a) for a in digits.batch_at(0, 64, seed=0))
    model_key = be.fold_in(be.fold_in(be.key(0), 0), MODEL_KEY)
    train_loss = float(losses.cross_entropy(model.apply(params, x, train=True, key=model_key), y))
    np.testing.assert_allclose(report.records[0]["loss_a"], train_loss, rtol=1e-6)
    eval_loss = float(losses.cross_entropy(model.apply(params, x), y))
    assert abs(report.records[0]["loss_b"] - eval_loss) > 1e-3


def test_fit_trains_a_ported_module_with_dropout_and_batch_norm_alike_on_both_backends(both, digits):
    """A torch module with Dropout and BatchNorm: training mode in the steps, the running
    statistics carried as state, and the same trajectory and state on JAX and torch.
    """
    torch = pytest.importorskip("torch")
    from torch import nn as tnn

    torch.manual_seed(0)
    module = tnn.Sequential(
        tnn.Flatten(),
        tnn.Linear(64, 24),
        tnn.BatchNorm1d(24),
        tnn.ReLU(),
        tnn.Dropout(0.3),
        tnn.Linear(24, 10),
    )
    model = dg.from_torch(module, torch.zeros(2, 1, 8, 8))
    assert model.has_train_mode and model.has_state
    est = dg.estimator("forward", num_tangents=2)
    runs = [
        dg.fit(model, model.trainable(), digits, estimator=est, backend=b, steps=4, callbacks=[], seed=1)
        for b in both
    ]
    a, b = ([r["loss"] for r in run.history] for run in runs)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    for name in ("2.running_mean", "2.running_var", "1.weight"):
        np.testing.assert_allclose(
            both[0].to_numpy(runs[0].params[name]),
            both[1].to_numpy(runs[1].params[name]),
            rtol=1e-5,
            atol=1e-6,
        )
    assert int(both[1].to_numpy(runs[1].params["2.num_batches_tracked"])) == 4
    # the running mean moved from its initial zeros with each step's batch statistics
    assert np.abs(both[1].to_numpy(runs[1].params["2.running_mean"])).max() > 1e-3
    assert not np.any(model.params["2.running_mean"])  # the model's own buffers are untouched
