"""Cross-framework parity (issue 5): JAX and torch in lockstep with shared batches and tangents.

Acceptance: MLP and CNN; backprop and forward (K = 1 and 4); SGD and Adam; 100 steps on
digits: the relative param difference at step 100 is <= 1e-4 in float32 and <= 1e-10 in
float64; a planted difference is caught at the right step.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import duogard as dg
from duogard import optim
from duogard.parity import ParityReport, compare_backends, default_tolerance
from duogard.testing import assert_backends_agree
from duogard.train import build_model

from helpers import AVAILABLE

pytestmark = pytest.mark.skipif(len(AVAILABLE) < 2, reason="needs both jax and torch installed")

BATCH = 32
STEPS = 100
TOL = {"float32": 1e-4, "float64": 1e-10}
ESTIMATORS = {
    "backprop": lambda: "backprop",
    "forward-K1": lambda: dg.estimator("forward", num_tangents=1),
    "forward-K4": lambda: dg.estimator("forward", num_tangents=4),
}
OPTIMIZERS = {"sgd": lambda: optim.sgd(0.05), "adam": lambda: optim.adam(1e-3)}


MODELS = {
    "mlp": lambda: build_model("mlp", 10, hidden=(16,)),
    "cnn": lambda: build_model("cnn", 10, channels=4, cnn_hidden=16),
}

# every MLP combination; for the (slower) CNN, a set that still meets every estimator with
# every optimizer and every dtype, and every optimizer with every dtype
MLP_CASES = [("mlp", e, o, d) for e in ESTIMATORS for o in OPTIMIZERS for d in ("float32", "float64")]
CNN_CASES = [
    ("cnn", "backprop", "sgd", "float32"),
    ("cnn", "backprop", "adam", "float64"),
    ("cnn", "forward-K1", "adam", "float32"),
    ("cnn", "forward-K1", "sgd", "float64"),
    ("cnn", "forward-K4", "sgd", "float32"),
    ("cnn", "forward-K4", "adam", "float64"),
]


@pytest.mark.integration
@pytest.mark.parametrize("model,est,opt,dtype", MLP_CASES + CNN_CASES)
def test_backends_agree_after_100_steps(digits, model, est, opt, dtype):
    rep = compare_backends(
        MODELS[model](),
        "cross_entropy",
        OPTIMIZERS[opt](),
        ESTIMATORS[est](),
        digits,
        steps=STEPS,
        batch_size=BATCH,
        dtype=dtype,
    )
    assert isinstance(rep, ParityReport) and rep.dtype == dtype and rep.tol == TOL[dtype]
    assert [r["step"] for r in rep.records] == list(range(1, STEPS + 1))
    final = rep.final
    assert final["param_rel"] <= TOL[dtype], rep.table()
    assert rep.first_divergence is None, rep.table()
    # both sides trained (the same way): the loss moved, and equally on both
    first = rep.records[0]
    assert abs(final["loss_a"] - first["loss_a"]) > 1e-3
    assert final["loss_a"] == pytest.approx(final["loss_b"], rel=10 * TOL[dtype])


# ----------------------------------------------------------------------------- planted differences


def _mlp():
    return MODELS["mlp"]()


def test_planted_adam_eps_is_caught_at_step_1(digits):
    # identical params and batch at step 1, so the gradients agree; the first update already
    # differs (eps 1e-3 against |g| ~ 1e-3 and below), so the params diverge at step 1
    opt = {"jax": optim.adam(1e-3, eps=1e-8), "torch": optim.adam(1e-3, eps=1e-3)}
    rep = compare_backends(_mlp(), "cross_entropy", opt, "backprop", digits, steps=5, batch_size=BATCH)
    assert rep.first_divergence == 1
    r1 = rep.records[0]
    assert r1["grad_rel"] < 1e-5 < 1e-4 < r1["param_rel"]
    assert "DIVERGE beyond rel 0.0001 first at step 1" in rep.table()
    # the control: the same eps on both sides agrees
    same = compare_backends(
        _mlp(), "cross_entropy", optim.adam(1e-3, eps=1e-3), "backprop", digits, steps=5, batch_size=BATCH
    )
    assert same.first_divergence is None


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_planted_schedule_difference_is_caught_at_step_11(digits, dtype):
    # StepLR-style decay: lr = 0.05 * 0.5 ** floor(count / step_size) with count = 0 at the first
    # update; step sizes 10 and 20 agree for updates 1..10 and differ from update 11 on
    opt = {
        "jax": optim.sgd(optim.step_decay(0.05, step_size=10, gamma=0.5)),
        "torch": optim.sgd(optim.step_decay(0.05, step_size=20, gamma=0.5)),
    }
    rep = compare_backends(
        _mlp(), "cross_entropy", opt, "backprop", digits, steps=15, batch_size=BATCH, dtype=dtype
    )
    assert rep.first_divergence == 11, rep.table(every=1)
    assert max(r["param_rel"] for r in rep.records[:10]) <= TOL[dtype]
    r11 = rep.records[10]
    assert r11["grad_rel"] <= TOL[dtype] < r11["param_rel"]  # same params in, different step out


# ----------------------------------------------------------------------------- the one-line assertion


def test_assert_backends_agree_passes_when_they_agree(digits):
    rep = assert_backends_agree(
        _mlp(), "cross_entropy", optim.adam(1e-3), dg.estimator("forward", num_tangents=2), digits, steps=10
    )
    assert rep.first_divergence is None and len(rep.records) == 10


def test_assert_backends_agree_names_step_leaf_and_distance(digits):
    opt = {"jax": optim.adam(1e-3, eps=1e-8), "torch": optim.adam(1e-3, eps=1e-3)}
    with pytest.raises(AssertionError) as info:
        assert_backends_agree(_mlp(), "cross_entropy", opt, "backprop", digits, steps=5)
    msg = str(info.value)
    rep = compare_backends(_mlp(), "cross_entropy", opt, "backprop", digits, steps=5, batch_size=32)
    r1 = rep.records[0]
    assert "diverge at step 1 of 5" in msg
    leaf = re.search(r"leaf '([^']+)'", msg).group(1)
    assert leaf == r1["worst_leaf"] and re.fullmatch(r"[13]\.(weight|bias)", leaf)
    assert f"relative param difference {r1['param_rel']:.3e}" in msg
    assert "rtol 0.0001" in msg


# ----------------------------------------------------------------------------- shared tangents


def test_forward_tangents_are_shared(digits):
    # drawn independently, two K=1 forward gradients would be nearly orthogonal (rel ~ 1.4)
    rep = compare_backends(
        _mlp(),
        "cross_entropy",
        optim.sgd(0.05),
        dg.estimator("forward", num_tangents=1),
        digits,
        steps=1,
        batch_size=BATCH,
    )
    assert rep.records[0]["grad_rel"] < 1e-5
    assert rep.records[0]["loss_a"] == pytest.approx(rep.records[0]["loss_b"], rel=1e-6)


# ----------------------------------------------------------------------------- arguments


def test_default_tolerance():
    assert default_tolerance("float32") == 1e-4 and default_tolerance("float64") == 1e-10


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"backends": ("jax",)}, "backends"),
        ({"dtype": "float16"}, "dtype"),
    ],
)
def test_bad_arguments(digits, kw, match):
    with pytest.raises(ValueError, match=match):
        compare_backends(_mlp(), "cross_entropy", optim.sgd(0.1), "backprop", digits, steps=1, **kw)


def test_grad_difference_is_relative_to_the_runs_gradient_scale():
    """A step whose gradient is nearly zero (a forward gradient with d ≈ 0) compares its rounding
    against the run's typical gradient norm, not against its own tiny norm."""
    import numpy as np

    from duogard.parity import _diff

    a, b = {"w": np.array([1e-7, 0.0])}, {"w": np.array([2e-7, 0.0])}
    assert _diff(a, b)[1] == pytest.approx(0.5)  # against its own norm: 50%
    assert _diff(a, b, floor=1.0)[1] == pytest.approx(1e-7)  # against the run's scale
    big_a, big_b = {"w": np.array([1.0, 2.0])}, {"w": np.array([1.1, 2.0])}
    assert _diff(big_a, big_b, floor=1e-3)[1] == pytest.approx(0.1 / np.sqrt(1.1**2 + 4))  # a real gap stays


# ----------------------------------------------------------------------------- calibrated float32 verdict


def test_float32_verdict_is_calibrated_on_a_float64_reference(digits):
    """float32: a step diverges only beyond tol AND 10x the run's own float32 rounding (a float64
    run of the same steps and tangents on torch): a faithful run passes and says so."""
    rep = compare_backends(
        _mlp(), "cross_entropy", optim.sgd(0.05), dg.estimator("forward"), digits, steps=12, batch_size=BATCH
    )
    assert rep.reference == "torch" and rep.first_divergence is None, rep.table(every=1)
    r = rep.records[-1]
    assert 0 < r["param_rounding"] < 1e-4 and r["grad_rounding"] > 0  # float32 vs float64 of one backend
    assert "float32 rounding of a float64 run on torch" in rep.table()
    # a tol below float32 rounding: uncalibrated it cries wolf at once, calibrated it does not
    tiny = dict(steps=6, batch_size=BATCH, tol=1e-9)
    loud = compare_backends(
        _mlp(), "cross_entropy", optim.sgd(0.05), "backprop", digits, calibrate=False, **tiny
    )
    calm = compare_backends(_mlp(), "cross_entropy", optim.sgd(0.05), "backprop", digits, **tiny)
    assert loud.first_divergence == 1 and calm.first_divergence is None, calm.table(every=1)


@pytest.mark.parametrize("planted", ["activation", "transposed-weight"])
def test_calibrated_verdict_still_catches_a_one_op_difference_at_its_first_step(digits, planted):
    """A real one-op difference is far above rounding: caught at step 1 where it acts from the start."""
    model = _mlp()
    p0 = model.init(0, digits.example_input, dtype="float32")
    if planted == "activation":  # one side computes leaky_relu where the other has relu
        from duogard import nn

        other = nn.Sequential(*[nn.leaky_relu if layer is nn.relu else layer for layer in model.layers])
        kw = {"model": {"jax": model, "torch": other}, "params": p0}
    else:  # the first weight handed over transposed (and reshaped back) on one side
        name = next(k for k, v in p0.items() if v)
        w = p0[name]["weight"]
        q = {k: dict(v) for k, v in p0.items()}
        q[name]["weight"] = np.ascontiguousarray(w.reshape(w.shape[::-1]).T)
        assert not np.array_equal(q[name]["weight"], w)
        kw = {"model": model, "params": {"jax": p0, "torch": q}}
    rep = compare_backends(loss="cross_entropy", optimizer=optim.sgd(0.05), estimator="backprop",
                           data=digits, steps=3, batch_size=BATCH, **kw)  # fmt: skip
    assert rep.reference is not None and rep.first_divergence == 1, rep.table(every=1)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sides_hold_their_own_copies_of_the_params(digits, dtype):
    """torch (and JAX on CPU) may wrap NumPy memory; the SGD strategies update in place: each
    side copies the initial params, so neither the caller's arrays nor the other side see an
    update (they did: torch's in-place step raced JAX's asynchronous read of the same memory).
    """
    model = build_model("mlp", 10, hidden=(8,))
    params = model.init(0, digits.example_input, dtype=dtype)
    before = [a.copy() for a in dg.tree.tree_leaves(params)]
    rep = compare_backends(
        model, "cross_entropy", optim.sgd(0.05), "forward", digits, steps=2, dtype=dtype, params=params
    )
    assert rep.first_divergence is None
    for a, b in zip(dg.tree.tree_leaves(params), before):
        np.testing.assert_array_equal(a, b)


def test_compare_is_a_deprecated_alias_of_compare_backends():
    """``parity.compare`` was renamed (``duogard.compare_methods`` is the main job, a different
    comparison). The old name still works for one release, with a DeprecationWarning naming the
    new one."""
    import duogard.parity as parity

    with pytest.warns(DeprecationWarning, match=r"duogard\.parity\.compare is deprecated.*compare_backends"):
        old = parity.compare
    assert old is compare_backends
    with pytest.warns(DeprecationWarning, match="compare_backends"):
        from duogard.parity import compare  # noqa: F401
    assert "compare" not in parity.__all__ and "compare_backends" in parity.__all__
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        parity.nope  # noqa: B018
