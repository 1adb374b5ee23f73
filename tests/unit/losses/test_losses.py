"""Losses (duogard.losses) on both backends, against torch.nn.functional, NumPy formulas and each
other: values for every reduction, gradients through each backend's own autodiff, stability for
huge logits, and errors that name both shapes.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
scipy_special = pytest.importorskip("scipy.special")

import torch.nn.functional as F  # noqa: E402

import duogard as dg  # noqa: E402
from duogard import losses  # noqa: E402

from helpers import TOL  # noqa: E402

DTYPES = ("float32", "float64")
REDUCTIONS = ("mean", "sum", "none")
N, C = 5, 4


def assert_close(actual, expected, dtype, **override):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), **{**TOL[dtype], **override})


def _reduce(values, reduction):
    return {"mean": np.mean, "sum": np.sum, "none": lambda v: v}[reduction](values)


def _log_softmax(x, axis=-1):
    return scipy_special.log_softmax(x.astype(np.float64), axis=axis)


def _np_ce_labels(x, y, reduction, label_smoothing=0.0):
    """torch's definition: (1 - eps) * NLL of the label + eps * mean over classes of -log p."""
    logp = _log_softmax(x)
    nll = -np.take_along_axis(logp, y[..., None].astype(np.int64), axis=-1)[..., 0]
    smooth = -logp.mean(axis=-1)
    return _reduce((1 - label_smoothing) * nll + label_smoothing * smooth, reduction)


def _np_ce_probs(x, p, reduction, label_smoothing=0.0):
    p = p * (1 - label_smoothing) + label_smoothing / x.shape[-1]
    return _reduce(-(p * _log_softmax(x)).sum(axis=-1), reduction)


def _np_bce(x, t, reduction):
    x = x.astype(np.float64)
    return _reduce(np.logaddexp(0.0, x) - x * t, reduction)


# ----------------------------------------------------------------------------- cases
# id -> (duogard loss, torch loss, NumPy formula, inputs(rng, dtype) -> (prediction, target), options)


def _labels(rng, dtype, shape=(N, C), label_dtype=np.int64):
    return (2 * rng.standard_normal(shape)).astype(dtype), rng.integers(0, shape[-1], shape[:-1]).astype(
        label_dtype
    )


def _probs(rng, dtype, shape=(N, C)):
    return (2 * rng.standard_normal(shape)).astype(dtype), rng.dirichlet(
        np.ones(shape[-1]), shape[:-1]
    ).astype(dtype)


def _pair(rng, dtype, shape=(3, 2, 4)):
    pred, target = rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype)
    pred[0, 0] = target[0, 0]  # l1's kink: its gradient there must be torch's (0)
    return pred, target


def _bce_inputs(rng, dtype):
    logits = (3 * rng.standard_normal((N, 3))).astype(dtype)
    logits[0] = 0.0  # max(x, 0)'s kink: the gradient must still be sigmoid(0) - t
    return logits, rng.uniform(0, 1, (N, 3)).astype(dtype)


CASES = {
    "ce_labels": (losses.cross_entropy, F.cross_entropy, _np_ce_labels, _labels, {}),
    "ce_labels_int32": (
        losses.cross_entropy,
        lambda x, y, **k: F.cross_entropy(x, y.long(), **k),
        _np_ce_labels,
        lambda rng, dt: _labels(rng, dt, label_dtype=np.int32),
        {},
    ),
    "ce_labels_smoothing": (
        losses.cross_entropy,
        F.cross_entropy,
        _np_ce_labels,
        _labels,
        {"label_smoothing": 0.1},
    ),
    "ce_probs": (losses.cross_entropy, F.cross_entropy, _np_ce_probs, _probs, {}),
    "ce_probs_smoothing": (
        losses.cross_entropy,
        F.cross_entropy,
        _np_ce_probs,
        _probs,
        {"label_smoothing": 0.25},
    ),
    "ce_single_example": (
        losses.cross_entropy,
        F.cross_entropy,
        _np_ce_labels,
        lambda rng, dt: _labels(rng, dt, shape=(C,)),
        {},
    ),
    "nll": (
        losses.nll_loss,
        F.nll_loss,
        lambda x, y, r: _reduce(-np.take_along_axis(x, y[:, None], 1)[:, 0], r),
        lambda rng, dt: (lambda x, y: (_log_softmax(x).astype(dt), y))(*_labels(rng, dt)),
        {},
    ),
    "mse": (losses.mse, F.mse_loss, lambda a, b, r: _reduce((a.astype(np.float64) - b) ** 2, r), _pair, {}),
    "l1": (losses.l1, F.l1_loss, lambda a, b, r: _reduce(np.abs(a.astype(np.float64) - b), r), _pair, {}),
    "bce_with_logits": (
        losses.binary_cross_entropy_with_logits,
        F.binary_cross_entropy_with_logits,
        _np_bce,
        _bce_inputs,
        {},
    ),
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_matches_torch_and_numpy(be, case, dtype, reduction):
    fn, torch_fn, formula, inputs, options = CASES[case]
    pred, target = inputs(np.random.default_rng(0), dtype)
    out = fn(be.asarray(pred), be.asarray(target), reduction=reduction, **options)
    assert be.dtype_name(out.dtype) == dtype
    expected = torch_fn(
        torch.as_tensor(pred), torch.as_tensor(target), reduction=reduction, **options
    ).numpy()
    assert tuple(out.shape) == expected.shape
    assert_close(be.to_numpy(out), expected, dtype)
    assert_close(be.to_numpy(out), formula(pred, target, reduction, **options), dtype)


def test_default_reduction_is_mean(be):
    pred, target = _labels(np.random.default_rng(0), "float64")
    x, y = be.asarray(pred), be.asarray(target)
    assert float(losses.cross_entropy(x, y)) == pytest.approx(
        float(losses.cross_entropy(x, y, reduction="mean"))
    )
    assert float(losses.cross_entropy(x, y)) == pytest.approx(_np_ce_labels(pred, target, "mean"), rel=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_over_another_axis(be, dtype):
    """``axis=1`` for (N, C, L) logits, which is how torch lays out per-position classes."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, C, 3)).astype(dtype)
    y = rng.integers(0, C, (2, 3))
    p = rng.dirichlet(np.ones(C), (2, 3)).transpose(0, 2, 1).astype(dtype)
    for target in (y, p):
        out = losses.cross_entropy(be.asarray(x), be.asarray(target), axis=1, reduction="none")
        expected = F.cross_entropy(torch.as_tensor(x), torch.as_tensor(target), reduction="none").numpy()
        assert tuple(out.shape) == (2, 3)
        assert_close(be.to_numpy(out), expected, dtype)


# ----------------------------------------------------------------------------- gradients


@functools.cache
def _grads(backend_name, case, dtype, reduction):
    """Loss value and its gradient w.r.t. the prediction (and the float target) through the
    backend's own autodiff (cached: several tests use them)."""
    be = dg.backend(backend_name)
    fn, _, _, inputs, options = CASES[case]
    pred, target = inputs(np.random.default_rng(0), dtype)
    float_target = np.issubdtype(target.dtype, np.floating)
    argnums = (0, 1) if float_target else 0

    def f(x, t):
        return fn(x, t, reduction=reduction, **options)

    value, g = be.jit(be.value_and_grad(f, argnums=argnums))(be.asarray(pred), be.asarray(target))
    g = g if float_target else (g,)
    return float(value), [be.to_numpy(a) for a in g]


@pytest.mark.parametrize("reduction", ("mean", "sum"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_grad_matches_torch_autograd(be, case, dtype, reduction):
    _, torch_fn, _, inputs, options = CASES[case]
    pred, target = inputs(np.random.default_rng(0), dtype)
    value, grads = _grads(be.name, case, dtype, reduction)
    tp = torch.tensor(pred, requires_grad=True)
    tt = torch.tensor(target, requires_grad=np.issubdtype(target.dtype, np.floating))
    ref = torch_fn(tp, tt, reduction=reduction, **options)
    ref.backward()
    assert value == pytest.approx(ref.item(), rel=TOL[dtype]["rtol"])
    ref_grads = [tp.grad.numpy()] + ([tt.grad.numpy()] if tt.requires_grad else [])
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == np.dtype(dtype)
        assert_close(g, r, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_grad_agrees_between_backends(both, case, dtype):
    (vj, gj), (vt, gt) = (_grads(be.name, case, dtype, "mean") for be in both)
    assert vj == pytest.approx(vt, rel=TOL[dtype]["rtol"])
    for a, b in zip(gj, gt, strict=True):
        assert_close(a, b, dtype)


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_jvp_matches_grad(be, case):
    """Forward mode (what a forward gradient uses): jvp along v == <grad, v>, kinks included."""
    fn, _, _, inputs, options = CASES[case]
    pred, target = inputs(np.random.default_rng(0), "float64")
    _, (g, *_) = _grads(be.name, case, "float64", "mean")
    v = np.random.default_rng(1).standard_normal(pred.shape)
    tb = be.asarray(target)
    value, tangent = be.jvp(lambda x: fn(x, tb, **options), (be.asarray(pred),), (be.asarray(v),))
    assert float(tangent) == pytest.approx(float(np.sum(g * v)), rel=1e-10, abs=1e-12)
    assert float(value) == pytest.approx(_grads(be.name, case, "float64", "mean")[0], rel=1e-12)


# ----------------------------------------------------------------------------- stability


def _huge_logits(dtype):
    x = np.array([[1e4, 0.0, -1e4, 5e3], [-1e4, -1e4, -1e4, -1e4 + 1.0], [3e4, -3e4, 1e-3, 0.0]])
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_stable_for_huge_logits(be, dtype):
    x = _huge_logits(dtype)
    y = np.array([1, 3, 0])
    p = np.array([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.2, 0.2, 0.2, 0.4]], dtype)
    cases = [(y, {}), (y, {"label_smoothing": 0.1}), (p, {}), (p, {"label_smoothing": 0.1})]
    for target, options in cases:
        out = be.to_numpy(
            losses.cross_entropy(be.asarray(x), be.asarray(target), reduction="none", **options)
        )
        # exact reference: float64 torch on the same (representable) values
        ref = F.cross_entropy(
            torch.as_tensor(x, dtype=torch.float64),
            torch.as_tensor(target if target.dtype.kind == "i" else target.astype(np.float64)),
            reduction="none",
            **options,
        ).numpy()
        assert np.all(np.isfinite(out))
        assert_close(out, ref, dtype)
    # the per-example values by hand: 1e4, log(3 e^-1 + 1) (no overflow to inf or nan)
    out = be.to_numpy(losses.cross_entropy(be.asarray(x), be.asarray(y), reduction="none"))
    np.testing.assert_allclose(out[:2], [1e4, np.log1p(3 * np.exp(-1.0))], rtol=1e-6)
    # and the gradient is finite: softmax - onehot
    _, g = be.value_and_grad(lambda z: losses.cross_entropy(z, be.asarray(y), reduction="sum"))(be.asarray(x))
    ref = scipy_special.softmax(x.astype(np.float64), axis=-1) - np.eye(C)[y]
    assert np.all(np.isfinite(be.to_numpy(g)))
    assert_close(be.to_numpy(g), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bce_with_logits_stable_for_huge_logits(be, dtype):
    x = np.array([1e4, -1e4, 1e4, -1e4, 3e4, -3e4, 0.0, 88.0, -104.0]).astype(dtype)
    t = np.array([0.0, 1.0, 1.0, 0.0, 0.3, 0.7, 0.5, 1.0, 0.0]).astype(dtype)
    out = be.to_numpy(losses.binary_cross_entropy_with_logits(be.asarray(x), be.asarray(t), reduction="none"))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[:6], [1e4, 1e4, 0.0, 0.0, 0.7 * 3e4, 0.7 * 3e4], rtol=1e-6)
    assert_close(out, _np_bce(x, t.astype(np.float64), "none"), dtype)
    ref = F.binary_cross_entropy_with_logits(
        torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(t, dtype=torch.float64), reduction="none"
    )
    assert_close(out, ref.numpy(), dtype)
    _, g = be.value_and_grad(
        lambda z: losses.binary_cross_entropy_with_logits(z, be.asarray(t), reduction="sum")
    )(be.asarray(x))
    assert_close(be.to_numpy(g), scipy_special.expit(x.astype(np.float64)) - t, dtype)


def test_masked_logits_with_integer_labels_are_finite(be):
    """-inf logits (masked classes) that are not the label give a finite loss, as in torch."""
    x = np.array([[0.0, -np.inf, 1.0], [-np.inf, 2.0, -1.0]])
    y = np.array([0, 1])
    for fn, inp, tfn in (
        (losses.cross_entropy, x, F.cross_entropy),
        (losses.nll_loss, _log_softmax(x), F.nll_loss),
    ):
        out = fn(be.asarray(inp), be.asarray(y), reduction="none")
        ref = tfn(torch.as_tensor(inp), torch.as_tensor(y), reduction="none").numpy()
        assert np.all(np.isfinite(ref))
        assert_close(be.to_numpy(out), ref, "float64")
        _, g = be.value_and_grad(lambda z, fn=fn: fn(z, be.asarray(y)))(be.asarray(inp))
        tz = torch.tensor(inp, requires_grad=True)
        tfn(tz, torch.as_tensor(y)).backward()
        assert_close(be.to_numpy(g), tz.grad.numpy(), "float64")


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("fn", [losses.mse, losses.l1, losses.binary_cross_entropy_with_logits])
def test_elementwise_losses_name_both_shapes(be, fn):
    with pytest.raises(ValueError, match=rf"{fn.__name__}.*\(3,\).*\(3, 1\)"):
        fn(be.asarray(np.zeros(3)), be.asarray(np.zeros((3, 1))))


def test_classification_losses_name_both_shapes(be):
    logits = be.asarray(np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"cross_entropy.*\(4,\).*\(4, 3\).*\(4, 1\)"):
        losses.cross_entropy(logits, be.asarray(np.zeros((4, 1), np.int64)))
    with pytest.raises(ValueError, match=r"cross_entropy.*\(4, 3\).*\(4, 2\)"):
        losses.cross_entropy(logits, be.asarray(np.full((4, 2), 0.5)))
    with pytest.raises(ValueError, match=r"nll_loss.*\(4,\).*\(4, 3\).*\(5,\)"):
        losses.nll_loss(logits, be.asarray(np.zeros(5, np.int64)))
    with pytest.raises(ValueError, match=r"nll_loss: labels must be integers"):
        losses.nll_loss(logits, be.asarray(np.zeros(4)))
    with pytest.raises(ValueError, match=r"cross_entropy: label_smoothing must be in \[0, 1\], got 1\.5"):
        losses.cross_entropy(logits, be.asarray(np.zeros(4, np.int64)), label_smoothing=1.5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_reduction_raises(be, case):
    fn, _, _, inputs, options = CASES[case]
    pred, target = inputs(np.random.default_rng(0), "float64")
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"):
        fn(be.asarray(pred), be.asarray(target), reduction="avg", **options)


def test_get_by_name():
    assert losses.get("cross_entropy") is losses.cross_entropy
    assert losses.get("mse") is losses.mse
    custom = lambda pred, target: pred  # noqa: E731
    assert losses.get(custom) is custom
    with pytest.raises(ValueError, match=r"unknown loss 'foo'.*cross_entropy.*mse"):
        losses.get("foo")


@pytest.mark.parametrize("labels,bad,at", [([10, 10, 10, 10], 10, 0), ([0, 1, -1, 2], -1, 2)])
@pytest.mark.parametrize("fn,options", [("cross_entropy", {}), ("cross_entropy", {"label_smoothing": 0.1}),
                                        ("nll_loss", {})])  # fmt: skip
def test_labels_outside_the_classes_raise_or_give_nan_when_traced(be, fn, options, labels, bad, at):
    """A label outside [0, C) used to count as 0 (loss 0.0 for all-10 labels with 10 classes).
    Concrete labels raise, naming the label; traced ones (vmapped) make their rows' losses NaN
    while the other rows keep torch's values."""
    x = np.random.default_rng(0).normal(size=(4, 10))
    f = functools.partial(getattr(losses, fn), reduction="none", **options)
    inp = _log_softmax(x) if fn == "nll_loss" else x
    with pytest.raises(ValueError, match=rf"{fn}: labels must be in \[0, 10\), got {bad} \(at index {at}\)"):
        f(be.asarray(inp), be.asarray(np.array(labels)))
    y = np.array(labels)
    out = be.to_numpy(be.vmap(f)(be.asarray(inp), be.asarray(y)))
    ok = (y >= 0) & (y < 10)
    assert np.isnan(out[~ok]).all()
    # labels closed over by a compiled function are traced there too (JAX); torch's be.jit is eager
    closed = be.jit(lambda z: f(z, be.asarray(y)))
    if be.name == "jax":
        np.testing.assert_array_equal(np.isnan(be.to_numpy(closed(be.asarray(inp)))), ~ok)
    else:
        with pytest.raises(ValueError, match=rf"{fn}: labels must be in \[0, 10\)"):
            closed(be.asarray(inp))
    tfn = F.nll_loss if fn == "nll_loss" else functools.partial(F.cross_entropy, **options)
    ref = tfn(torch.as_tensor(inp[ok]), torch.as_tensor(y[ok]), reduction="none").numpy()
    assert_close(out[ok], ref, "float64")
